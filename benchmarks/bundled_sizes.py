"""IoU and mBA of a checkpoint on the bundled images resized to several sizes.

For each size, the bundled BIG-layout objects (``crm_jax/assets/demo_big``) are resized so that
their longer side is that many pixels (image: area interpolation down, linear up; gt and coarse
seg: the same, then thresholded at 127, so they stay binary as BIG's are), refined with the full
multi-scale loop, and scored by ``crm_jax.evaluation.evaluate`` (the published metrics); one row
per size and ``min_side`` (``--min-sides``; 0 is the published loop, see docs/refinement.md)
gives the coarse and refined IoU and mBA at the final scale.

    .venv/bin/python benchmarks/bundled_sizes.py                     # the bundled checkpoint
    .venv/bin/python benchmarks/bundled_sizes.py --checkpoint DIR --sizes 128 256 --min-sides 0

This is a measure of accuracy, not of speed: nothing is compared with PyTorch.
"""

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_SIZES = (128, 256, 512, 1024, 2048)


def resized_copy(data: str, out_dir: str, long_side: int) -> None:
  """The BIG objects of ``data`` written to ``out_dir`` with their longer side ``long_side``."""
  import cv2
  from crm_jax.data.synthesis import binarize_gt
  from crm_jax.evaluation import list_objects
  from crm_jax.io import read_image, read_mask, write_image
  os.makedirs(out_dir, exist_ok=True)
  triples, _ = list_objects(data)
  for t in triples:
    image = read_image(t.image)
    h, w = image.shape[:2]
    factor = long_side / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    write_image(os.path.join(out_dir, f"{t.name}_im.png"),
                cv2.resize(image, size, interpolation=interp))
    for role, path in (("gt", t.gt), ("seg", t.seg)):
      mask = cv2.resize(read_mask(path), size, interpolation=interp)
      write_image(os.path.join(out_dir, f"{t.name}_{role}.png"), binarize_gt(mask))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default=None, help="default: the bundled checkpoint")
  parser.add_argument("--data", default=None, help="a BIG-layout folder (default: the bundled set)")
  parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
  parser.add_argument("--min-sides", type=int, nargs="+", default=None,
                      help="the Refiner's min_side values to compare (default: 0, the published "
                           "loop, and crm_jax.scales.SMALL_SIDE)")
  parser.add_argument("--output", default=None,
                      help="keep the resized sets and refined masks here (default: a temporary "
                           "folder)")
  args = parser.parse_args(argv)

  from crm_jax import bundled
  from crm_jax.checkpoint import load_model
  from crm_jax.constants import SCALES
  from crm_jax.evaluation import evaluate
  from crm_jax.metrics import scale_key
  from crm_jax.refine import Refiner, enable_compilation_cache

  from crm_jax.scales import SMALL_SIDE
  enable_compilation_cache()
  checkpoint = args.checkpoint or bundled.DEMO_CHECKPOINT
  data = args.data or bundled.DEMO_DATA
  config, variables = load_model(checkpoint)
  min_sides = args.min_sides if args.min_sides is not None else (0, SMALL_SIDE)
  refiners = {m: Refiner(config, variables, min_side=m, warn_small=False) for m in min_sides}
  final = scale_key(SCALES[-1])
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = args.output or tmp
    for size in args.sizes:
      sized = os.path.join(root, f"data_{size}")
      resized_copy(data, sized, size)
      for min_side, refiner in refiners.items():
        result = evaluate(sized, None, os.path.join(root, f"refined_{size}_min{min_side}"),
                          SCALES, progress=False, log=lambda *_: None, refiner=refiner,
                          overwrite=True)
        m = result["scales"][final]
        rows.append((size, min_side, m["old_iou"], m["iou"], m["old_mba"], m["mba"],
                     m["num_images"]))
        print(f"{size:>5} px, min_side {min_side}: IoU {m['old_iou']:.4f} -> {m['iou']:.4f}, "
              f"mBA {m['old_mba']:.4f} -> {m['mba']:.4f}", flush=True)
  print(f"\ncheckpoint {checkpoint}; scales {list(SCALES)}; metrics at scale {final}")
  print("| long side | min_side | coarse IoU | refined IoU | coarse mBA | refined mBA | images |")
  print("|---|---|---|---|---|---|---|")
  for size, min_side, old_iou, iou, old_mba, mba, n in rows:
    print(f"| {size} | {min_side} | {old_iou:.4f} | {iou:.4f} | {old_mba:.4f} | {mba:.4f} | "
          f"{n} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
