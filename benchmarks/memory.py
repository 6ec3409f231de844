"""Peak resident memory of refining one image at all four scales (CPU).

Each size runs in a fresh subprocess (so nothing of one run is counted in the
next); the figure is that process's ``ru_maxrss`` (``getrusage`` of the
finished child), which includes Python, JAX, the compiled programs and the
model. Random weights of the published (RESNET50) network by default; the
image is random noise with a rectangular coarse mask.

    .venv/bin/python benchmarks/memory.py                 # 2K, 4K, 6K
    .venv/bin/python benchmarks/memory.py --sizes 6000x4000 --config small

Sizes are WIDTHxHEIGHT. Run one at a time: the 6K case needs several GB.
"""

import argparse
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SIZES = ("2048x1600", "4096x3000", "6000x4000")


def child(width: int, height: int, config_name: str, dtype: str, plan: str) -> None:
  """Refines one random image; prints seconds and its own peak RSS."""
  sys.path.insert(0, ROOT)
  import jax
  import numpy as np
  from crm_jax.models import crm
  from crm_jax.refine import Refiner

  config = {"resnet50": crm.RESNET50, "small": crm.SMALL, "tiny": crm.TINY}[config_name]
  variables = crm.init_variables(crm.CRM(config), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  mask = np.zeros((height, width), np.uint8)
  mask[height // 4: 3 * height // 4, width // 5: 4 * width // 5] = 255
  refiner = Refiner(config, variables, dtype=dtype, plan=plan)
  start = time.perf_counter()
  out = refiner.refine_all_scales(image, mask)
  seconds = time.perf_counter() - start
  assert all(p.shape == (height, width) for p in out.values())
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
  print(f"child {width}x{height}: {seconds:.1f} s (compilation included), "
        f"self peak {peak:.2f} GiB", flush=True)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES),
                      help="WIDTHxHEIGHT, each in its own subprocess")
  parser.add_argument("--config", default="resnet50", choices=("resnet50", "small", "tiny"))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--plan", default="banded", choices=("plain", "banded", "fused"),
                      help="the execution plan (default banded, the CPU default)")
  parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(*args.child, args.config, args.dtype, args.plan)
    return 0
  print(f"config {args.config}, dtype {args.dtype}, "
        f"plan {args.plan}, scales 0.125 0.25 0.5 1.0")
  for size in args.sizes:
    width, height = (int(v) for v in size.lower().split("x"))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(width), str(height),
           "--config", args.config, "--dtype", args.dtype, "--plan", args.plan]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    peak = usage.ru_maxrss / 2**20
    ok = "ok" if os.waitstatus_to_exitcode(status) == 0 else f"FAILED ({status})"
    print(f"{width}x{height}: peak RSS {peak:.2f} GiB, wall {wall:.1f} s, {ok}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
