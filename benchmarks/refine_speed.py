"""Seconds per image: the JAX ``Refiner`` against the PyTorch reference.

Both refine the same images at the same scales with the same weights: a
randomised PyTorch CRM (``tests/torch_reference.py``: ``randomize_``), saved
as a DataParallel checkpoint and converted with ``crm_jax.convert.convert_crm``.
The PyTorch side is ``refine_reference`` (the published loop: grid_sample
on the 256-channel F, layer4 computed as upstream). One process, one machine;
``torch.set_num_threads`` and JAX (XLA's CPU thread pool) use all cores.
The first image includes JAX's compilation (unless the persistent cache has
it: set ``CRM_JAX_CACHE_DIR=`` to measure a cold start) and is reported
apart from the steady state (the mean of the later images).

    .venv/bin/python benchmarks/refine_speed.py                   # demo_big, 3 images
    .venv/bin/python benchmarks/refine_speed.py --size 1024x768 --num-images 3
    .venv/bin/python benchmarks/refine_speed.py --config small
"""

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _images(args):
  from crm_jax.io import read_image, read_mask
  if args.size:
    width, height = (int(v) for v in args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    for k in range(args.num_images):
      image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
      mask = np.zeros((height, width), np.uint8)
      mask[height // 4 + k: 3 * height // 4, width // 5: 4 * width // 5 - k] = 255
      yield f"random{k}", image, mask
    return
  paths = sorted(glob.glob(os.path.join(args.data, "*_im.*")))[: args.num_images]
  for path in paths:
    stem = path.rsplit("_im.", 1)[0]
    yield os.path.basename(stem), read_image(path), read_mask(stem + "_seg.png")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="resnet50", choices=("resnet50", "small", "tiny"))
  parser.add_argument("--data", default=os.path.join(ROOT, "crm_jax", "assets", "demo_big"))
  parser.add_argument("--size", default=None, help="WIDTHxHEIGHT random images instead")
  parser.add_argument("--num-images", type=int, default=3)
  parser.add_argument("--scales", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--skip-torch", action="store_true")
  args = parser.parse_args()

  import torch
  import jax
  import torch_reference as tr
  from crm_jax.convert import convert_crm
  from crm_jax.models import crm
  from crm_jax.refine import Refiner

  cores = os.cpu_count()
  torch.set_num_threads(cores)
  config = {"resnet50": crm.RESNET50, "small": crm.SMALL, "tiny": crm.TINY}[args.config]
  model = tr.TorchCRM(**config.architecture())
  tr.randomize_(model, 0)
  model.eval()
  with tempfile.TemporaryDirectory() as tmp:
    tr.save_like_dataparallel(model, os.path.join(tmp, "model.pth"))
    convert_crm(os.path.join(tmp, "model.pth"), os.path.join(tmp, "jax"), log=lambda m: None)
    refiner = Refiner.from_checkpoint(os.path.join(tmp, "jax"), dtype=args.dtype)
  scales = tuple(args.scales)
  print(f"config {args.config}, scales {scales}, {cores} cores (torch threads "
        f"{torch.get_num_threads()}), jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__}, JAX dtype {args.dtype}")
  times = {"jax": [], "torch": []}
  for name, image, mask in _images(args):
    t0 = time.perf_counter()
    out_jax = refiner.refine_all_scales(image, mask, scales)
    t1 = time.perf_counter()
    times["jax"].append(t1 - t0)
    line = f"{name} {image.shape[1]}x{image.shape[0]}: jax {t1 - t0:.1f} s"
    if not args.skip_torch:
      out_torch = tr.refine_reference(model, image, mask, scales)
      t2 = time.perf_counter()
      times["torch"].append(t2 - t1)
      diff = max(float(np.abs(out_jax[s] - out_torch[s]).max()) for s in scales)
      line += f", torch {t2 - t1:.1f} s, max |prob diff| {diff:.1e}"
    print(line, flush=True)
  jx, th = times["jax"], times["torch"]
  print(f"first image: jax {jx[0]:.1f} s (compilation included)"
        + (f", torch {th[0]:.1f} s, torch/jax {th[0] / jx[0]:.2f}x" if th else ""))
  if len(jx) > 1:
    sj = float(np.mean(jx[1:]))
    line = f"steady state (mean of {len(jx) - 1}): jax {sj:.1f} s/image"
    if th:
      st = float(np.mean(th[1:]))
      line += f", torch {st:.1f} s/image, torch/jax {st / sj:.2f}x"
    print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
