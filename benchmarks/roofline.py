"""FLOPs and bytes of one refinement, its CPU time against the CPU's floor, and roofline
predictions for accelerators.

Per plan (``banded``, ``fused``), image size and dtype: the XLA-compiled FLOPs and bytes
accessed (``Compiled.cost_analysis()``), summed over every program one image runs at every
scale (``plans.fused_program``, ``plans.banded_programs``: the library's own programs, each
banded piece counted once per band), compiled here for the CPU. Beside them: the measured CPU
seconds of one refinement (``Refiner.refine``, after a warm-up image that compiles) and the
CPU's floor, ``flops / rate`` with the rate of a large matmul of that dtype measured in the same
run; and the PREDICTED seconds on accelerators, roofline ``max(flops / peak, bytes / bandwidth)``
at published peaks (``PEAKS``; float32 at the TF32 tensor-core rate where JAX's default
precision uses it, see ``PEAKS``). Predictions, not measurements: XLA's GPU and TPU compilers
fuse differently from the CPU's, so their bytes differ; ``benchmarks/device_check.py`` measures
the fused programs on a lent GPU against this table.

Query loops: XLA's cost analysis counts a ``while`` loop's body once, so the programs are
compiled with one query chunk covering the bucket (same FLOPs as any chunking, up to the last
chunk's overlap).

    .venv/bin/python benchmarks/roofline.py --json roofline.json    # 3 sizes x 2 dtypes x 2 plans
    .venv/bin/python benchmarks/roofline.py --sizes 2048x1536 --dtypes float32 --plans fused
    .venv/bin/python benchmarks/roofline.py --measure-sizes        # no CPU timing (compile only)
    .venv/bin/python benchmarks/roofline.py --config tiny --sizes 96x80 --measure-sizes 96x80

The CPU time is measured for ``--measure-sizes`` (default 2048x1536) in ``--measure-dtypes``
(default float32): a 6000x4000 image takes minutes per plan on 2 cores.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Published peaks, dense (no sparsity): FLOP/s per dtype and memory bandwidth in bytes/s.
# H100 SXM5: BF16 989.4, TF32 494.7, FP32 (non-tensor) 66.9 TFLOP/s; HBM3 3.35 TB/s
#   (NVIDIA H100 datasheet figures, tabulated at https://glennklockwood.com/garden/processors/h100
#   and https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html, whose starred figures are
#   with sparsity, twice the dense ones).
# H200 SXM: the H100's compute, HBM3e 4.8 TB/s (NVIDIA's H200 page, as quoted at
#   https://lzwjava.github.io/nvidia-h200-gpu-specs-en).
# TPU v5e: 197 TFLOP/s bf16, HBM2 819 GB/s (https://docs.cloud.google.com/tpu/docs/v5e).
# float32: JAX's default matmul/conv precision runs float32 on the tensor cores as TF32 on
# H100/H200 and as one bfloat16 pass on a TPU, so those rates are used; ``fp32_exact`` is the
# H100's non-tensor float32 rate (``jax_default_matmul_precision='highest'``).
PEAKS = {
    "H100 SXM": {"bfloat16": 989.4e12, "float32": 494.7e12, "fp32_exact": 66.9e12,
                 "bandwidth": 3.35e12},
    "H200 SXM": {"bfloat16": 989.4e12, "float32": 494.7e12, "fp32_exact": 66.9e12,
                 "bandwidth": 4.8e12},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12, "bandwidth": 819e9},
}
DEFAULT_SIZES = ("2048x1536", "3840x2160", "6000x4000")


def roofline_seconds(flops: float, bytes_accessed: float, peak: float, bandwidth: float) -> float:
  """The roofline prediction: ``max(flops / peak, bytes / bandwidth)``."""
  return max(flops / peak, bytes_accessed / bandwidth)


def _size(text: str):
  width, height = (int(v) for v in text.lower().split("x"))
  return width, height


def matmul_rate(dtype: str, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an ``n x n`` matmul in ``dtype`` on the default device (best of ``repeats``)."""
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), dtype)
  b = jnp.asarray(rng.standard_normal((n, n)), dtype)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def program_cost(program) -> dict:
  """Compiled (default backend) FLOPs and bytes accessed of a ``plans.Program``, times its
  calls, and XLA's memory figure (temporaries + arguments + outputs)."""
  compiled = program.lower().compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return {"name": program.name, "calls": program.calls,
          "flops": float(cost.get("flops", 0.0)) * program.calls,
          "bytes": float(cost.get("bytes accessed", 0.0)) * program.calls,
          "memory": int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                        + mem.output_size_in_bytes)}


def image_programs(plan: str, config, size, dtype: str, scales, pad: int):
  """The programs one ``size`` ``(W, H)`` image runs under ``plan`` (every scale), each with a
  single query chunk (see the module docstring)."""
  from crm_jax import plans
  from crm_jax.geometry import bucket_shape
  target = (size[1] + 2 * pad, size[0] + 2 * pad)
  bucket = bucket_shape(target)
  queries = bucket[0] * bucket[1]
  out = []
  for s in scales:
    if plan == "fused":
      out.append(plans.fused_program(config, bucket, s, max(scales), 1, queries, dtype))
    else:
      out.extend(plans.banded_programs(config, bucket, s, max(scales), queries, dtype,
                                       target=target))
  return bucket, out


def measure_refine(plan: str, config, variables, size, dtype: str, scales) -> float:
  """Seconds of one ``Refiner.refine`` on a random image (after one that compiles)."""
  from crm_jax.refine import Refiner
  refiner = Refiner(config, variables, plan=plan, dtype=dtype, compilation_cache=False,
                    warn_small=False)
  rng = np.random.default_rng(0)
  width, height = size
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  mask = np.zeros((height, width), np.uint8)
  mask[height // 4: 3 * height // 4, width // 5: 4 * width // 5] = 255
  refiner.refine(image, mask, scales)
  t = time.perf_counter()
  refiner.refine(image, mask, scales)
  return time.perf_counter() - t


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="resnet50", choices=("resnet50", "small", "tiny"))
  parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="WIDTHxHEIGHT")
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                      choices=("float32", "bfloat16"))
  parser.add_argument("--plans", nargs="+", default=["banded", "fused"],
                      choices=("banded", "fused"))
  parser.add_argument("--scales", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
  parser.add_argument("--measure-sizes", nargs="*", default=["2048x1536"],
                      help="sizes whose CPU time is measured (none: compile only)")
  parser.add_argument("--measure-dtypes", nargs="*", default=["float32"])
  parser.add_argument("--matmul-size", type=int, default=2048)
  parser.add_argument("--json", default=None, help="also write the table here (device_check.py "
                                                   "reads it)")
  args = parser.parse_args(argv)

  import jax
  from crm_jax.constants import REFLECT_PAD
  from crm_jax.models import crm
  config = {"resnet50": crm.RESNET50, "small": crm.SMALL, "tiny": crm.TINY}[args.config]
  scales = tuple(args.scales)
  variables = None
  rates = {d: matmul_rate(d, args.matmul_size) for d in args.dtypes}
  cpu = f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"
  print(f"config {args.config}, scales {scales}, CPU {cpu}; matmul {args.matmul_size}: "
        + ", ".join(f"{d} {r / 1e9:.0f} GFLOP/s" for d, r in rates.items()), flush=True)
  rows = []
  for size_text in args.sizes:
    size = _size(size_text)
    for dtype in args.dtypes:
      for plan in args.plans:
        t0 = time.perf_counter()
        bucket, programs = image_programs(plan, config, size, dtype, scales, REFLECT_PAD)
        costs = [program_cost(p) for p in programs]
        flops = sum(c["flops"] for c in costs)
        nbytes = sum(c["bytes"] for c in costs)
        row = {"plan": plan, "size": size_text, "dtype": dtype, "bucket": list(bucket),
               "config": args.config, "scales": list(scales), "flops": flops, "bytes": nbytes,
               "programs": costs, "cpu_floor_s": flops / rates[dtype],
               "cpu_matmul_flops_per_s": rates[dtype],
               "predicted_s": {name: roofline_seconds(flops, nbytes, peak[dtype],
                                                      peak["bandwidth"])
                               for name, peak in PEAKS.items()},
               "compile_s": time.perf_counter() - t0, "cpu_s": None}
        if dtype == "float32":
          p = PEAKS["H100 SXM"]
          row["predicted_s"]["H100 SXM, exact fp32"] = roofline_seconds(
              flops, nbytes, p["fp32_exact"], p["bandwidth"])
        if size_text in (args.measure_sizes or []) and dtype in (args.measure_dtypes or []):
          if variables is None:
            from crm_jax.models import CRM, init_variables
            variables = jax.device_get(init_variables(CRM(config), jax.random.PRNGKey(0)))
          row["cpu_s"] = measure_refine(plan, config, variables, size, dtype, scales)
        rows.append(row)
        print(_line(row), flush=True)
  print()
  print(table(rows))
  if args.json:
    meta = {"machine": cpu, "config": args.config, "scales": list(scales), "peaks": PEAKS,
            "command": " ".join(["benchmarks/roofline.py"] + (argv or sys.argv[1:]))}
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")
  return 0


def _line(row) -> str:
  cpu = "" if row["cpu_s"] is None else f", CPU {row['cpu_s']:.1f} s"
  return (f"{row['plan']} {row['size']} {row['dtype']}: {row['flops'] / 1e9:.0f} GFLOP, "
          f"{row['bytes'] / 1e9:.1f} GB accessed, {len(row['programs'])} programs{cpu} "
          f"(compiled in {row['compile_s']:.0f} s)")


def table(rows) -> str:
  """The rows as a Markdown table (seconds; predictions in milliseconds)."""
  names = sorted({n for r in rows for n in r["predicted_s"]}, key=lambda n: (n not in PEAKS, n))
  head = ("| plan | image | dtype | GFLOP | GB accessed | CPU s (measured) | CPU floor s | "
          + " | ".join(f"{n} ms (predicted)" for n in names) + " |")
  lines = [head, "|" + "---|" * (7 + len(names))]
  for r in rows:
    cpu = "-" if r["cpu_s"] is None else f"{r['cpu_s']:.1f}"
    preds = [f"{r['predicted_s'][n] * 1e3:.3g}" if n in r["predicted_s"] else "-" for n in names]
    lines.append(f"| {r['plan']} | {r['size']} | {r['dtype']} | {r['flops'] / 1e9:.0f} | "
                 f"{r['bytes'] / 1e9:.1f} | {cpu} | {r['cpu_floor_s']:.3g} | "
                 + " | ".join(preds) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
