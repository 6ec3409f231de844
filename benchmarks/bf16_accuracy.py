"""Accuracy of ``Refiner(dtype="bfloat16")`` against float32, on a few images.

For each image, both refiners run the full multi-scale loop; per scale it
reports the mean |prob difference|, the share of pixels whose saved uint8
value (``uint8(prob * 255)``) changes by more than 1, and the IoU (mask > 128
against gt > 128, as the metrics do) of each, and their difference.

    .venv/bin/python benchmarks/bf16_accuracy.py                     # demo images
    .venv/bin/python benchmarks/bf16_accuracy.py --checkpoint DIR --max-side 1024

Without ``--checkpoint`` the weights are random (RESNET50 by default: the
PyTorch reference's ``randomize_``, converted; needs torch), which measures
the arithmetic, not a trained model's sensitivity. Images are the bundled ``crm_jax/assets/demo_big``
objects, downscaled so that the longer side is ``--max-side`` (CPU time).
"""

import argparse
import glob
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _resize(a, scale):
  import cv2
  if scale >= 1:
    return a
  size = (max(1, round(a.shape[1] * scale)), max(1, round(a.shape[0] * scale)))
  return cv2.resize(a, size, interpolation=cv2.INTER_AREA)


def _iou(mask_u8, gt):
  m, g = mask_u8 > 128, gt > 128
  union = np.logical_or(m, g).sum()
  return float(np.logical_and(m, g).sum() / union) if union else 1.0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default=None)
  parser.add_argument("--config", default="resnet50", choices=("resnet50", "small", "tiny"))
  parser.add_argument("--data", default=os.path.join(ROOT, "crm_jax", "assets", "demo_big"))
  parser.add_argument("--max-side", type=int, default=768)
  parser.add_argument("--num-images", type=int, default=3)
  args = parser.parse_args()

  from crm_jax.io import read_image, read_mask
  from crm_jax.models import crm
  from crm_jax.preprocess import prob_to_uint8
  from crm_jax.refine import Refiner

  if args.checkpoint:
    f32 = Refiner.from_checkpoint(args.checkpoint)
    bf16 = Refiner.from_checkpoint(args.checkpoint, dtype="bfloat16")
    what = args.checkpoint
  else:
    # Random weights with spread-out logits: the PyTorch reference's
    # randomize_ (as in the parity tests), converted.
    import tempfile
    from crm_jax import torch_reference as tr
    from crm_jax.convert import convert_crm
    config = {"resnet50": crm.RESNET50, "small": crm.SMALL, "tiny": crm.TINY}[args.config]
    model = tr.randomize_(tr.TorchCRM(**config.architecture()), 0)
    with tempfile.TemporaryDirectory() as tmp:
      tr.save_like_dataparallel(model, os.path.join(tmp, "model.pth"))
      convert_crm(os.path.join(tmp, "model.pth"), os.path.join(tmp, "jax"), log=lambda m: None)
      f32 = Refiner.from_checkpoint(os.path.join(tmp, "jax"))
      bf16 = Refiner.from_checkpoint(os.path.join(tmp, "jax"), dtype="bfloat16")
    what = f"random {args.config}"
  names = sorted(glob.glob(os.path.join(args.data, "*_im.*")))[: args.num_images]
  print(f"weights: {what}; images: {len(names)} from {args.data}, longer side "
        f"<= {args.max_side}")
  rows = []
  for path in names:
    stem = path.rsplit("_im.", 1)[0]
    image, seg, gt = read_image(path), read_mask(stem + "_seg.png"), read_mask(stem + "_gt.png")
    scale = min(1.0, args.max_side / max(image.shape[:2]))
    image, seg, gt = _resize(image, scale), _resize(seg, scale), _resize(gt, scale)
    t0 = time.perf_counter()
    a = f32.refine_all_scales(image, seg)
    t1 = time.perf_counter()
    b = bf16.refine_all_scales(image, seg)
    t2 = time.perf_counter()
    name = os.path.basename(stem)
    print(f"{name} {image.shape[1]}x{image.shape[0]}: float32 {t1 - t0:.1f} s, "
          f"bfloat16 {t2 - t1:.1f} s (compilation included)")
    for s in a:
      ua, ub = prob_to_uint8(a[s]).astype(np.int16), prob_to_uint8(b[s]).astype(np.int16)
      row = (np.abs(a[s] - b[s]).mean(), np.mean(np.abs(ua - ub) > 1),
             _iou(ua, gt), _iou(ub, gt))
      rows.append((s,) + row)
      print(f"  scale {s}: mean|dp| {row[0]:.2e}, uint8 changed >1: {100 * row[1]:.3f}%, "
            f"IoU f32 {row[2]:.4f} bf16 {row[3]:.4f} (diff {row[3] - row[2]:+.4f})")
  final = [r for r in rows if r[0] == max(r[0] for r in rows)]
  print(f"last scale, mean over images: mean|dp| {np.mean([r[1] for r in final]):.2e}, "
        f"uint8 changed >1: {100 * np.mean([r[2] for r in final]):.3f}%, "
        f"IoU change {np.mean([r[4] - r[3] for r in final]):+.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
