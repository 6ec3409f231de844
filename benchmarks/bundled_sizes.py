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
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_SIZES = (128, 256, 512, 1024, 2048)


def resized_copy(data: str, out_dir: str, long_side: int,
                 coarse_factor: Optional[int] = None) -> None:
  """The BIG objects of ``data`` written to ``out_dir`` with their longer side ``long_side``;
  with ``coarse_factor`` the coarse masks are made again from the resized gt, by a segmenter at
  1/``coarse_factor`` of that size (``synthesis.lowres_segmenter_mask``, which made the bundled
  set's coarse masks at 1/16 of 2K)."""
  import cv2
  from crm_jax.data.synthesis import binarize_gt, lowres_segmenter_mask
  from crm_jax.evaluation import list_objects
  from crm_jax.io import read_image, read_mask
  from crm_jax.outputs import write_image
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
    gt, seg = (binarize_gt(cv2.resize(read_mask(path), size, interpolation=interp))
               for path in (t.gt, t.seg))
    if coarse_factor is not None:
      seg = lowres_segmenter_mask(gt, factor=coarse_factor)
    write_image(os.path.join(out_dir, f"{t.name}_gt.png"), gt)
    write_image(os.path.join(out_dir, f"{t.name}_seg.png"), seg)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default=None, help="default: the bundled checkpoint")
  parser.add_argument("--data", default=None, help="a BIG-layout folder (default: the bundled set)")
  parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
  parser.add_argument("--min-sides", type=int, nargs="+", default=None,
                      help="the Refiner's min_side values to compare (default: 0, the published "
                           "loop, and the checkpoint's recommendation, or "
                           "crm_jax.scales.SMALL_SIDE where it has none)")
  parser.add_argument("--coarse-factor", type=int, default=None,
                      help="make the coarse masks again at each size, by a segmenter at "
                           "1/FACTOR of it (default: the bundled coarse masks, resized)")
  parser.add_argument("--output", default=None,
                      help="keep the resized sets and refined masks here (default: a temporary "
                           "folder)")
  args = parser.parse_args(argv)

  from crm_jax import bundled
  from crm_jax.checkpoint import load_model, recommended_min_side
  from crm_jax.constants import SCALES
  from crm_jax.evaluation import evaluate
  from crm_jax.metrics import scale_key
  from crm_jax.refine import Refiner, enable_compilation_cache

  from crm_jax.scales import SMALL_SIDE
  enable_compilation_cache()
  checkpoint = args.checkpoint or bundled.DEMO_CHECKPOINT
  data = args.data or bundled.DEMO_DATA
  config, variables = load_model(checkpoint)
  min_sides = (args.min_sides if args.min_sides is not None
               else (0, recommended_min_side(checkpoint) or SMALL_SIDE))
  refiners = {m: Refiner(config, variables, min_side=m, warn_small=False) for m in min_sides}
  final = scale_key(SCALES[-1])
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = args.output or tmp
    for size in args.sizes:
      sized = os.path.join(root, f"data_{size}")
      resized_copy(data, sized, size, args.coarse_factor)
      for min_side, refiner in refiners.items():
        result = evaluate(sized, None, os.path.join(root, f"refined_{size}_min{min_side}"),
                          SCALES, progress=False, log=lambda *_: None, refiner=refiner,
                          overwrite=True)
        m = result["scales"][final]
        rows.append((size, min_side, m["old_iou"], m["iou"], m["old_mba"], m["mba"],
                     m["num_images"]))
        print(f"{size:>5} px, min_side {min_side}: IoU {m['old_iou']:.4f} -> {m['iou']:.4f}, "
              f"mBA {m['old_mba']:.4f} -> {m['mba']:.4f}", flush=True)
  coarse = ("the bundled coarse masks, resized" if args.coarse_factor is None else
            f"coarse masks made at each size by a segmenter at 1/{args.coarse_factor}")
  print(f"\ncheckpoint {checkpoint}; {coarse}; scales {list(SCALES)}; metrics at scale {final}")
  print("| long side | min_side | coarse IoU | refined IoU | coarse mBA | refined mBA | images |")
  print("|---|---|---|---|---|---|---|")
  for size, min_side, old_iou, iou, old_mba, mba, n in rows:
    print(f"| {size} | {min_side} | {old_iou:.4f} | {iou:.4f} | {old_mba:.4f} | {mba:.4f} | "
          f"{n} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
