"""Label maps refined class by class (``Refiner.refine_labels``, docs/labels.md) on multi-class
scenes held out of training.

At each long side of ``--sizes``: held-out composites of real photographs
(``real_photos.heldout_label_composites``: 2-4 objects cut from one held-out photograph, each
its own class, pasted over the other; coarse label maps from a low-resolution segmenter,
``synthesis.lowres_segmenter_labels``). Printed per size: coarse and refined mIoU and mean mBA
(``metrics.score_labels`` / ``summarize_labels``: means over the classes), the share of pixels
farther than 3 % of the image diagonal from every coarse label change whose label the refinement
changes (``real_photos.label_far_flip_share``: max and mean over the images), and the seconds of
one ``refine_labels`` call against K separate ``refine`` calls and ``labels.merge`` on the same
image (K: the classes present; medians over the images, after one warm-up of each per size),
their ratio, and whether both give identical label maps. ``--synthetic SIZE`` adds synthetic
scenes (``synthetic.make_synthetic_scene``) at one size; ``--picture PATH`` writes a before/after
picture of the first composite at the last size (the coarse and the refined label map blended
over the image, their class boundaries in white).

The refinement runs the full multi-scale loop with the checkpoint's recommended ``min_side`` (the
Refiner's defaults, as ``crm-refine``).

    .venv/bin/python benchmarks/labels.py                # 1024 and 2048 px, 2 composites each
    .venv/bin/python benchmarks/labels.py --count 3 --picture docs/images/labels_before_after.png
    .venv/bin/python benchmarks/labels.py --sizes --synthetic 1024   # synthetic scenes only

Needs scikit-image (it ships the photographs).
"""

import argparse
import math
import os
import statistics
import sys
import time

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_SIZES = (1024, 2048)
SYNTHETIC_CLASSES = 4  # background and three objects
LOWRES_SIDE = 128  # the synthetic scenes' segmenter works at this side (the composites' too)
PALETTE = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25),
                    (245, 130, 48), (145, 30, 180), (70, 240, 240)], np.uint8)
BLEND = 0.45  # of a class's colour over the image (class 0 is left as it is)


def label_overlay(image: np.ndarray, labels: np.ndarray, width: int) -> np.ndarray:
  """The image at ``width`` px with the label map's colours blended and its class boundaries
  drawn in white (RGB uint8)."""
  size = (width, max(1, round(labels.shape[0] * width / labels.shape[1])))
  image = cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)
  labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
  colour, tinted = PALETTE[labels % len(PALETTE)], (labels > 0)[..., None]
  out = np.where(tinted, (1 - BLEND) * image + BLEND * colour, image)
  cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
  edge = (cv2.dilate(labels, cross) != labels) | (cv2.erode(labels, cross) != labels)
  out[edge] = 255
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_picture(path: str, image, coarse, refined, width: int = 640) -> int:
  """Two titled panels (coarse | refined) as a 256-colour PNG at ``path``; returns its bytes."""
  from PIL import Image
  from crm_jax.cli.demo import labelled_row
  row = labelled_row([label_overlay(image, m, width) for m in (coarse, refined)],
                     ("coarse", "refined"), width)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(row).quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
  return os.path.getsize(path)


def run_set(refiner, title, pairs):
  """Refines every pair both ways; prints one line per image and the set's summary line;
  returns the first pair's refined label map."""
  from crm_jax import labels as labels_lib
  from crm_jax.data import real_photos
  from crm_jax.metrics import score_labels, summarize_labels
  mask = lambda labels, c: np.where(labels == c, 255, 0).astype(np.uint8)  # noqa: E731
  first = pairs[0]
  refiner.refine_labels(first.image, first.coarse)  # warm-up (compilation) of both ways
  refiner.refine(first.image, mask(first.coarse, int(first.coarse.flat[0])))
  records, flips, together, apart, identical, first_refined = [], [], [], [], True, None
  for pair in pairs:
    start = time.perf_counter()
    refined = refiner.refine_labels(pair.image, pair.coarse)
    together.append(time.perf_counter() - start)
    start = time.perf_counter()
    classes = labels_lib.classes_to_refine(pair.coarse, None, labels_lib.IGNORE)
    probs = {c: refiner.refine(pair.image, mask(pair.coarse, c)) for c in classes}
    separate = labels_lib.merge(pair.coarse, probs)
    apart.append(time.perf_counter() - start)
    same = np.array_equal(refined, separate)
    identical &= same
    first_refined = refined if first_refined is None else first_refined
    records.append(score_labels(pair.gt, pair.coarse, refined))
    flips.append(real_photos.label_far_flip_share(pair.coarse, refined))
    one = summarize_labels(records[-1:])
    print(f"  {pair.name} ({len(classes)} classes): mIoU {one['coarse']['miou']:.4f} -> "
          f"{one['refined']['miou']:.4f}, mBA {one['coarse']['mba']:.4f} -> "
          f"{one['refined']['mba']:.4f}, far flips {100 * flips[-1]:.3f} %, refine_labels "
          f"{together[-1]:.1f} s, {len(classes)} x refine + merge {apart[-1]:.1f} s, "
          f"identical {'yes' if same else 'NO'}", flush=True)
  result = summarize_labels(records)
  old, new = result["coarse"], result["refined"]
  t1, t2 = statistics.median(together), statistics.median(apart)
  valid = [f for f in flips if not math.isnan(f)]
  print(f"{title}: {len(pairs)} images, {len(result['classes'])} class ids\n"
        f"  coarse  mIoU {old['miou']:.4f}  mBA {old['mba']:.4f}\n"
        f"  refined mIoU {new['miou']:.4f}  mBA {new['mba']:.4f}  "
        f"(delta {new['miou'] - old['miou']:+.4f}, {new['mba'] - old['mba']:+.4f})\n"
        f"  far flips: max {100 * max(valid, default=math.nan):.3f} %, mean "
        f"{100 * (sum(valid) / len(valid) if valid else math.nan):.3f} %\n"
        f"  seconds per image (median): refine_labels {t1:.2f}, K x refine + merge {t2:.2f}, "
        f"ratio {t2 / t1:.2f}\n"
        f"  identical label maps: {'yes' if identical else 'NO'}", flush=True)
  return first_refined


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default=None, help="default: the bundled checkpoint")
  parser.add_argument("--sizes", type=int, nargs="*", default=DEFAULT_SIZES,
                      help="long sides of the composites (none: only --synthetic)")
  parser.add_argument("--count", type=int, default=2,
                      help="images per set (3 adds a scene of four objects)")
  parser.add_argument("--synthetic", type=int, default=None, metavar="SIZE",
                      help="also synthetic scenes at SIZE x SIZE (--count of them)")
  parser.add_argument("--picture", default=None, metavar="PATH",
                      help="write a before/after PNG of the first composite at the last size")
  parser.add_argument("--min-side", type=int, default=None,
                      help="the Refiner's min_side (default: the checkpoint's recommendation)")
  args = parser.parse_args(argv)

  from crm_jax import bundled
  from crm_jax.data import real_photos, synthesis, synthetic
  from crm_jax.refine import Refiner, enable_compilation_cache

  enable_compilation_cache()
  checkpoint = args.checkpoint or bundled.DEMO_CHECKPOINT
  refiner = Refiner.from_checkpoint(checkpoint, warn_small=False, min_side=args.min_side)
  print(f"checkpoint {checkpoint}; min_side {refiner.min_side}; device "
        f"{refiner.device.platform}; far = more than {100 * real_photos.FAR_FRACTION:g} % of the "
        "diagonal from every coarse label change", flush=True)
  start = time.perf_counter()
  for size in args.sizes:
    pairs = real_photos.heldout_label_composites(size, args.count)
    refined = run_set(refiner, f"held-out composites, {size} px", pairs)
  if args.picture and args.sizes:
    nbytes = write_picture(args.picture, pairs[0].image, pairs[0].coarse, refined)
    print(f"picture: {args.picture} ({pairs[0].name}, {size} px; {nbytes // 1024} KiB)")
  if args.synthetic:
    pairs = []
    for i in range(args.count):
      rng = np.random.default_rng([0, real_photos.HELDOUT_STREAM + 2, i])  # never trained on
      image, gt = synthetic.make_synthetic_scene(args.synthetic, args.synthetic, rng,
                                                 SYNTHETIC_CLASSES)
      coarse = synthesis.lowres_segmenter_labels(gt, rng, max(1, args.synthetic // LOWRES_SIDE))
      pairs.append(real_photos.LabelPair(f"synthetic_{i}", image, coarse, gt))
    run_set(refiner, f"synthetic scenes, {args.synthetic} px", pairs)
  print(f"total {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
