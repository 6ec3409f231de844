"""Seconds per stage of a refinement plan against each stage's FLOP count.

Runs the banded plan (``crm_jax.plans.refine_banded`` with ``profile=``,
which waits for every piece) on random images, after one warm-up image, and
prints per stage: seconds, GFLOP (multiply-adds count two; convolutions, the
decoder MLP and the first-layer projection; elementwise work is not counted),
the achieved GFLOP/s and how many times the stage's FLOP floor it takes. The
floor is the rate of a large float32 matmul on the same machine, measured in
the same run.

    .venv/bin/python benchmarks/profile_stages.py                 # ResNet-50, 2048x1536, 4 scales
    .venv/bin/python benchmarks/profile_stages.py --config tiny --size 160x120
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def stage_flops(config, target, scales):
  """GFLOP per stage for a padded target grid ``(H, W)`` over ``scales``."""
  from crm_jax.geometry import level_sizes
  area = lambda hw: hw[0] * hw[1]
  flops = {}

  def add(stage, n):
    flops[stage] = flops.get(stage, 0.0) + n / 1e9

  for s in scales:
    sizes = level_sizes(target, s)
    a1 = area(sizes[2])
    add("stem", 2 * 49 * 4 * config.stem_width * a1)
    in_ch = config.stem_width
    for spec in config.encoder_blocks():
      a_in, a_out = area(sizes[spec.in_level]), area(sizes[spec.out_level])
      out_ch = spec.width * spec.expansion
      n = 2 * (in_ch * spec.width * a_in + 9 * spec.width * spec.width * a_out
               + spec.width * out_ch * a_out)
      if spec.downsample:
        n += 2 * in_ch * out_ch * a_out
      add(f"layer{spec.stage}", n)
      in_ch = out_ch
    widths = config.fusion_widths
    x2_ch = config.stage_widths[0] * config.expansion
    add("branches", 2 * (x2_ch * widths[1] * area(sizes[3]) + in_ch * widths[2] * area(sizes[4])))
    add("fusion head", 2 * a1 * (config.stem_width * widths[0] + 9 * sum(widths)
                                 * config.feature_dim
                                 + config.feature_dim * config.decoder_hidden[0]))
    dims = list(config.decoder_hidden) + [1]
    mlp = sum(2 * dims[i] * dims[i + 1] for i in range(len(dims) - 1))
    add("queries", 4 * mlp * area(target))
  return flops


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
  """GFLOP/s of a float32 ``n x n`` matmul (the floor's rate)."""
  import jax
  a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32))
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  t = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(f(a))
  return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="resnet50", choices=("resnet50", "small", "tiny"))
  parser.add_argument("--size", default="2048x1536", help="WIDTHxHEIGHT")
  parser.add_argument("--num-images", type=int, default=2, help="the first one warms up")
  parser.add_argument("--scales", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
  args = parser.parse_args()

  import jax
  from crm_jax import plans
  from crm_jax.models import crm
  from crm_jax.refine import Refiner

  config = {"resnet50": crm.RESNET50, "small": crm.SMALL, "tiny": crm.TINY}[args.config]
  variables = crm.init_variables(crm.CRM(config), jax.random.PRNGKey(0))
  refiner = Refiner(config, variables, plan="banded")
  width, height = (int(v) for v in args.size.lower().split("x"))
  rng = np.random.default_rng(0)
  scales = tuple(args.scales)
  profile = {}
  for k in range(args.num_images):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 5: 4 * width // 5] = 255
    _, (image_p, seg_p) = refiner._prepared(image, mask, scales)
    profile = {}
    t = time.perf_counter()
    plans.refine_banded(config, refiner.compute_variables, image_p, seg_p, scales,
                        refiner.query_chunk, refiner.bucket_steps, refiner.band_elements,
                        profile=profile)
    total = time.perf_counter() - t
  rate = matmul_rate()
  flops = stage_flops(config, image_p.shape[:2], scales)
  print(f"{args.config}, {width}x{height}, scales {scales}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; floor rate "
        f"(float32 2048^3 matmul) {rate:.0f} GFLOP/s; last image {total:.1f} s")
  print("| stage | seconds | GFLOP | GFLOP/s | x floor |")
  print("|---|---|---|---|---|")
  for stage, sec in profile.items():
    g = flops.get(stage, 0.0)
    print(f"| {stage} | {sec:.2f} | {g:.1f} | {g / sec:.0f} | "
          f"{sec / (g / rate) if g else float('nan'):.1f} |")
  print(f"| total | {sum(profile.values()):.2f} | {sum(flops.values()):.1f} | | |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
