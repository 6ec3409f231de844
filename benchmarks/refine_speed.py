"""Seconds per image: the JAX ``Refiner`` against the PyTorch reference.

Both refine the same images at the same scales with the same weights: a
randomised PyTorch CRM (``crm_jax/torch_reference.py``: ``randomize_``), saved
as a DataParallel checkpoint and converted with ``crm_jax.convert.convert_crm``.
The PyTorch side is ``refine_reference`` (the published loop: grid_sample
on the 256-channel F, layer4 computed as upstream). One process, one machine;
``torch.set_num_threads`` and JAX (XLA's CPU thread pool) use all cores.
The first image includes JAX's compilation (unless the persistent cache has
it: set ``CRM_JAX_CACHE_DIR=`` to measure a cold start) and is reported
apart from the steady state (the mean of the later images).

    .venv/bin/python benchmarks/refine_speed.py                   # demo_big, 3 images
    .venv/bin/python benchmarks/refine_speed.py --size 1024x768 --num-images 3
    .venv/bin/python benchmarks/refine_speed.py --config small --plan fused

``--device-check`` is the accelerator check (docs/refinement.md): at four
scales, for 2048x1536 and 3840x2160, seconds per image (first and steady) of
the fused plan in float32 and bfloat16 and of the PyTorch reference on the
same device, with their ratios; then pairs per second of ``refine_batch`` on
640x480 pairs. ``--sizes``, ``--batch-shape``, ``--batch-pairs`` and
``--config tiny`` shrink it (the test suite runs it so on the CPU).

    python benchmarks/refine_speed.py --device-check
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


def _images(args):
  from crm_jax.io import read_image, read_mask
  if args.size:
    width, height = (int(v) for v in args.size.lower().split("x"))
    for k in range(args.num_images):
      yield (f"random{k}", *_random_pair(width, height, k))
    return
  paths = sorted(glob.glob(os.path.join(args.data, "*_im.*")))[: args.num_images]
  for path in paths:
    stem = path.rsplit("_im.", 1)[0]
    yield os.path.basename(stem), read_image(path), read_mask(stem + "_seg.png")


def _reference_model(config_name: str):
  """A randomised PyTorch CRM (eval mode) of the named configuration."""
  from crm_jax import torch_reference as tr
  from crm_jax.models import crm
  config = {"resnet50": crm.RESNET50, "small": crm.SMALL, "tiny": crm.TINY}[config_name]
  model = tr.TorchCRM(**config.architecture())
  tr.randomize_(model, 0)
  return model.eval()


def _convert(model, tmp: str) -> str:
  from crm_jax import torch_reference as tr
  from crm_jax.convert import convert_crm
  tr.save_like_dataparallel(model, os.path.join(tmp, "model.pth"))
  convert_crm(os.path.join(tmp, "model.pth"), os.path.join(tmp, "jax"), log=lambda m: None)
  return os.path.join(tmp, "jax")


def _random_pair(width: int, height: int, seed: int):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  mask = np.zeros((height, width), np.uint8)
  mask[height // 4 + seed: 3 * height // 4, width // 5: 4 * width // 5 - seed] = 255
  return image, mask


def _timed(fn, n: int):
  """Seconds of ``n`` calls of ``fn`` (each waits for its result): ``[first, ...]``."""
  out = []
  for k in range(n):
    t = time.perf_counter()
    fn(k)
    out.append(time.perf_counter() - t)
  return out


def device_check(args) -> int:
  """The accelerator check: fused plan (float32, bfloat16) against the PyTorch reference."""
  import torch
  import jax
  from crm_jax import torch_reference as tr
  from crm_jax.refine import Refiner

  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = _reference_model(args.config).to(device)
  scales = tuple(args.scales)
  with tempfile.TemporaryDirectory() as tmp:
    path = _convert(model.cpu(), tmp)
    model.to(device)
    refiners = {dtype: Refiner.from_checkpoint(path, plan=args.plan, dtype=dtype,
                                               compilation_cache=True)
                for dtype in ("float32", "bfloat16")}
  print(f"device check: config {args.config}, scales {scales}, plan {args.plan}, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} on "
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}", flush=True)
  n = args.images_per_size
  for size in args.sizes:
    width, height = (int(v) for v in size.lower().split("x"))
    pairs = [_random_pair(width, height, k) for k in range(n)]
    row = {}
    for dtype, refiner in refiners.items():
      row[dtype] = _timed(lambda k: refiner.refine_all_scales(*pairs[k], scales), n)
    row["torch"] = _timed(lambda k: tr.refine_reference(model, *pairs[k], scales), n)
    steady = {k: float(np.mean(v[1:])) if len(v) > 1 else v[0] for k, v in row.items()}
    print(f"{width}x{height}: " + ", ".join(
        f"{k} first {v[0]:.3f} s steady {steady[k]:.3f} s" for k, v in row.items())
        + f"; torch/jax float32 {steady['torch'] / steady['float32']:.2f}x, "
        f"torch/jax bfloat16 {steady['torch'] / steady['bfloat16']:.2f}x", flush=True)
  width, height = (int(v) for v in args.batch_shape.lower().split("x"))
  pairs = [_random_pair(width, height, k % 7) for k in range(args.batch_pairs)]
  images, masks = [p[0] for p in pairs], [p[1] for p in pairs]
  for dtype, refiner in refiners.items():
    refiner.refine_batch(images[:max(refiner.batch_ladder)], masks[:max(refiner.batch_ladder)],
                         scales)  # compiles
    t = time.perf_counter()
    refiner.refine_batch(images, masks, scales)
    dt = time.perf_counter() - t
    print(f"refine_batch {width}x{height} {dtype}: {len(pairs) / dt:.1f} pairs/s "
          f"({len(pairs)} pairs in {dt:.2f} s)", flush=True)
  return 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="resnet50", choices=("resnet50", "small", "tiny"))
  parser.add_argument("--data", default=os.path.join(ROOT, "crm_jax", "assets", "demo_big"))
  parser.add_argument("--size", default=None, help="WIDTHxHEIGHT random images instead")
  parser.add_argument("--num-images", type=int, default=3)
  parser.add_argument("--scales", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--plan", default="auto", choices=("auto", "plain", "banded", "fused"))
  parser.add_argument("--device-check", action="store_true",
                      help="the accelerator check (see the module docstring)")
  parser.add_argument("--sizes", nargs="+", default=["2048x1536", "3840x2160"])
  parser.add_argument("--images-per-size", type=int, default=3)
  parser.add_argument("--batch-shape", default="640x480")
  parser.add_argument("--batch-pairs", type=int, default=64)
  args = parser.parse_args()
  if args.device_check:
    if args.plan == "auto":
      args.plan = "fused"
    return device_check(args)

  import torch
  import jax
  from crm_jax import torch_reference as tr
  from crm_jax.refine import Refiner

  cores = os.cpu_count()
  torch.set_num_threads(cores)
  model = _reference_model(args.config)
  with tempfile.TemporaryDirectory() as tmp:
    refiner = Refiner.from_checkpoint(_convert(model, tmp), dtype=args.dtype, plan=args.plan,
                                      compilation_cache=True)
  scales = tuple(args.scales)
  print(f"config {args.config}, scales {scales}, {cores} cores (torch threads "
        f"{torch.get_num_threads()}), jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__}, JAX dtype {args.dtype}, plan {args.plan}")
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
