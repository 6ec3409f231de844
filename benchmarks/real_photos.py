"""A checkpoint on real photographs held out of training (crm_jax.data.real_photos.HELD_OUT).

Two sets, at each long side of ``--sizes``:

- held-out composites (``real_photos.heldout_composites``: a region of one held-out photograph
  cut with a silhouette and pasted onto the other, coarse masks by the published perturbation and
  by a low-resolution segmenter): coarse and refined IoU and mBA (crm_jax.metrics), and the share
  of pixels farther than 3 % of the image diagonal from the coarse mask's boundary whose label the
  refinement flips (``real_photos.far_flip_share``; a refinement should move the boundary, not
  the interior);
- the held-out photographs themselves, upscaled as a user's would be, with coarse masks drawn
  around the subject (``real_photos.OUTLINES``: a polygon and an ellipse): the same flip share
  (no gt, so no IoU).

The refined mask is the final scale's probability > 0.5 (written as grey and binarised > 128,
as crm-evaluate does); the refinement runs the full multi-scale loop with the checkpoint's
recommended ``min_side`` (the Refiner's defaults, as ``crm-refine``). Seconds per image are the
wall time of ``Refiner.refine`` on this machine (after one warm-up call per size).

    .venv/bin/python benchmarks/real_photos.py                  # the bundled checkpoint
    .venv/bin/python benchmarks/real_photos.py --checkpoint runs/real_photos_small/model

Needs scikit-image (it ships the photographs).
"""

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_SIZES = (512, 1024, 2048)


def _mean(xs):
  xs = [x for x in xs if not math.isnan(x)]
  return sum(xs) / len(xs) if xs else math.nan


def score_pair(pair, prob):
  """{'old_iou', 'new_iou', 'old_mba', 'new_mba', 'flip', 'flip_in', 'flip_out'} of one pair:
  IoU and mBA (NaN without a gt) of the coarse and refined masks, and the far-from-boundary flip
  share (all far pixels, those inside the coarse mask, those outside)."""
  import numpy as np
  from crm_jax.data import real_photos
  from crm_jax.metrics import binarize, boundary_accuracy, intersection_union
  refined = np.clip(np.rint(prob * 255), 0, 255).astype(np.uint8)
  out = {}
  if pair.gt is not None:
    gt = binarize(pair.gt)
    for key, mask in (('old', pair.coarse), ('new', refined)):
      inter, union = intersection_union(gt, binarize(mask))
      out[f'{key}_iou'] = inter / union if union else math.nan
      out[f'{key}_mba'] = boundary_accuracy(gt, binarize(mask))
  flips = real_photos.far_flip_share(pair.coarse, refined)
  out['flip'], out['flip_in'], out['flip_out'] = flips.share, flips.inside, flips.outside
  return out


def before_after(image, coarse, prob) -> "np.ndarray":
  """Two panels, 640 px each: the coarse mask's boundary (red) and the refined mask's (green)
  drawn over the image (RGB uint8)."""
  from crm_jax.cli.demo import COLOURS, boundary_overlay, labelled_row
  from crm_jax.preprocess import prob_to_uint8
  return labelled_row([boundary_overlay(image, coarse, COLOURS["coarse"]),
                       boundary_overlay(image, prob_to_uint8(prob), COLOURS["refined"])],
                      ("coarse", "refined"))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default=None, help="default: the bundled checkpoint")
  parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
  parser.add_argument("--composites", type=int, default=6, help="held-out composites per size")
  parser.add_argument("--min-side", type=int, default=None,
                      help="the Refiner's min_side (default: the checkpoint's recommendation)")
  parser.add_argument("--output", default=None,
                      help="write every image, coarse, gt and refined mask here as PNG, and "
                           "a before/after picture of each (<name>_compare.jpg)")
  args = parser.parse_args(argv)

  from crm_jax import bundled
  from crm_jax.data import real_photos
  from crm_jax.outputs import write_image
  from crm_jax.refine import Refiner, enable_compilation_cache

  enable_compilation_cache()
  checkpoint = args.checkpoint or bundled.DEMO_CHECKPOINT
  refiner = Refiner.from_checkpoint(checkpoint, warn_small=False,
                                    min_side=args.min_side)
  rows = []
  for size in args.sizes:
    sets = (("composites", real_photos.heldout_composites(size, args.composites)),
            ("photographs", real_photos.heldout_photographs(size)))
    refiner.refine(sets[0][1][0].image, sets[0][1][0].coarse)  # warm-up (compilation)
    for set_name, pairs in sets:
      scores, seconds = [], []
      for pair in pairs:
        start = time.perf_counter()
        prob = refiner.refine(pair.image, pair.coarse)
        seconds.append(time.perf_counter() - start)
        s = score_pair(pair, prob)
        scores.append(s)
        if args.output:
          folder = os.path.join(args.output, f"{set_name}_{size}")
          os.makedirs(folder, exist_ok=True)
          write_image(os.path.join(folder, f"{pair.name}_im.png"), pair.image)
          write_image(os.path.join(folder, f"{pair.name}_seg.png"), pair.coarse)
          write_image(os.path.join(folder, f"{pair.name}_refined.png"),
                      (prob * 255).round().clip(0, 255).astype("uint8"))
          if pair.gt is not None:
            write_image(os.path.join(folder, f"{pair.name}_gt.png"), pair.gt)
          write_image(os.path.join(folder, f"{pair.name}_compare.jpg"),
                      before_after(pair.image, pair.coarse, prob))
        detail = (f"IoU {s['old_iou']:.4f} -> {s['new_iou']:.4f}, mBA {s['old_mba']:.4f} -> "
                  f"{s['new_mba']:.4f}, " if pair.gt is not None else "")
        print(f"{size:>5} px {pair.name}: {detail}far flips {100 * s['flip']:.2f} % "
              f"(inside {100 * s['flip_in']:.2f} %, outside {100 * s['flip_out']:.2f} %), "
              f"{seconds[-1]:.1f} s", flush=True)
      keys = ('old_iou', 'new_iou', 'old_mba', 'new_mba', 'flip', 'flip_in', 'flip_out')
      mean = {k: _mean([s.get(k, math.nan) for s in scores]) for k in keys}
      rows.append((set_name, size, mean, max(s['flip'] for s in scores), _mean(seconds),
                   len(pairs)))

  fmt = lambda x: "-" if math.isnan(x) else f"{x:.4f}"  # noqa: E731
  pct = lambda x: "-" if math.isnan(x) else f"{100 * x:.2f} %"  # noqa: E731
  print(f"\ncheckpoint {checkpoint}; held out: {', '.join(real_photos.HELD_OUT)}; "
        f"min_side {refiner.min_side}; far = more than {100 * real_photos.FAR_FRACTION:g} % of "
        "the diagonal from the coarse boundary; means over the images")
  print("| set | long side | coarse IoU | refined IoU | coarse mBA | refined mBA | far flips "
        "| inside | outside | worst image | s / image | images |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  cells = [(set_name, size, fmt(m['old_iou']), fmt(m['new_iou']), fmt(m['old_mba']),
            fmt(m['new_mba']), pct(m['flip']), pct(m['flip_in']), pct(m['flip_out']),
            pct(worst), f"{sec:.1f}", n) for set_name, size, m, worst, sec, n in rows]
  print("\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in cells))
  return 0


if __name__ == "__main__":
  sys.exit(main())
