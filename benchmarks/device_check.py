"""How close to the floor: measured seconds of the fused plan's programs against the roofline.

Run on a lent accelerator with the table ``benchmarks/roofline.py --json`` wrote on any machine:

    python benchmarks/device_check.py                  # every fused row of docs/roofline.json
    python benchmarks/device_check.py roofline.json --sizes 2048x1536 --dtypes bfloat16
    python benchmarks/device_check.py roofline.json --peak "H200 SXM"

For each fused row of the table (image size, dtype) it builds the same programs
(``plans.fused_program``, batch 1, every scale, with the device's own query chunk,
``plans.queries_per_chunk``), runs each on random inputs (one warm-up call that compiles, then
the median of ``--repeats`` timed calls) and prints per program: measured ms, the roofline's
predicted ms for this device (its peaks from the table, chosen from the device's name or
``--peak``), measured / predicted, and XLA's memory figure on this device against
``plans.fused_peak_bytes``. Then one whole image through ``Refiner.refine`` (fused plan) against
the row's predicted total. ``--plans banded`` adds whole-image times of the banded plan.

Needs only jax, flax, optax, orbax, numpy and OpenCV (no training package is imported), so it
runs on a bare accelerator image; without an accelerator it runs on the CPU (the test suite
does so at a tiny size) and says which device it measured.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Device names (jax's device_kind, lower case) -> a peak of the roofline table.
DEVICE_PEAKS = (("h200", "H200 SXM"), ("h100", "H100 SXM"), ("v5 lite", "TPU v5e"),
                ("v5e", "TPU v5e"))


def peak_for(device_kind: str, peaks: dict, override=None):
  """The table's peak entry for this device: ``override``, else by name, else None."""
  if override:
    return override, peaks[override]
  kind = device_kind.lower()
  for key, name in DEVICE_PEAKS:
    if key in kind and name in peaks:
      return name, peaks[name]
  return None, None


def _inputs(config, bucket, target, scale, max_scale, dtype, seed=0):
  """Random variables and a random pair for one fused program (batch 1), as device arrays."""
  import jax
  from crm_jax.geometry import scale_geometry
  from crm_jax.models import CRM, init_variables
  variables = init_variables(CRM(config), jax.random.PRNGKey(seed))
  variables = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(dtype), variables)
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((1, *bucket, 3)).astype(np.float32)
  seg = np.where(rng.random((1, *bucket)) < 0.5, 1.0, -1.0).astype(np.float32)
  geo = scale_geometry(target, scale, max_scale, bucket=bucket).arrays()
  geo = jax.tree_util.tree_map(lambda a: np.asarray(a)[None], geo)
  return jax.device_put(variables), jax.device_put(image), seg, jax.device_put(geo)


def time_program(compiled, variables, image, seg, geo, repeats: int):
  """``(first call s, median of repeats s)`` of a compiled fused program; ``seg`` is donated,
  so each call gets a fresh copy."""
  import jax
  times = []
  for _ in range(repeats + 1):
    s = jax.device_put(seg)
    jax.block_until_ready(s)
    t = time.perf_counter()
    jax.block_until_ready(compiled(variables, image, s, geo))
    times.append(time.perf_counter() - t)
  return times[0], float(np.median(times[1:]))


def check_row(row, peak, args) -> None:
  import jax
  import jax.numpy as jnp
  from crm_jax import plans
  from crm_jax.constants import REFLECT_PAD
  from crm_jax.models import crm
  config = {"resnet50": crm.RESNET50, "small": crm.SMALL, "tiny": crm.TINY}[row["config"]]
  scales = tuple(row["scales"])
  width, height = (int(v) for v in row["size"].lower().split("x"))
  target = (height + 2 * REFLECT_PAD, width + 2 * REFLECT_PAD)
  bucket = tuple(row["bucket"])
  dtype = row["dtype"]
  device = jax.devices()[0]
  queries = plans.queries_per_chunk(device.platform)
  predicted = {p["name"]: p for p in row["programs"]}
  total_measured = 0.0
  print(f"\n{row['plan']} {row['size']} {dtype} (bucket {bucket[1]}x{bucket[0]}), "
        f"{queries} queries per chunk")
  print("| program | compile s | first call s | measured ms | predicted ms | "
        "measured / predicted | XLA memory GiB | fused_peak_bytes GiB |")
  print("|---|---|---|---|---|---|---|---|")
  for s in scales:
    program = plans.fused_program(config, bucket, s, max(scales), 1, queries, dtype)
    variables, image, seg, geo = _inputs(config, bucket, target, s, max(scales), dtype)
    t = time.perf_counter()
    compiled = program.lower().compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    xla_bytes = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    est = plans.fused_peak_bytes(config, bucket, max(scales), 1, jnp.dtype(dtype).itemsize,
                                 queries)
    first, steady = time_program(compiled, variables, image, seg, geo, args.repeats)
    total_measured += steady
    ref = predicted.get(program.name)
    if ref is not None and peak is not None:
      pred = max(ref["flops"] / peak[dtype], ref["bytes"] / peak["bandwidth"])
      pred_text, ratio = f"{pred * 1e3:.2f}", f"{steady / pred:.1f}x"
    else:
      pred_text, ratio = "-", "-"
    print(f"| {program.name} | {compile_s:.1f} | {first:.2f} | {steady * 1e3:.2f} | {pred_text} | {ratio} | "
          f"{xla_bytes / 2**30:.2f} | {est / 2**30:.2f} |", flush=True)
  row_pred = None
  if peak is not None:
    row_pred = max(row["flops"] / peak[dtype], row["bytes"] / peak["bandwidth"])
  print(f"programs summed: {total_measured * 1e3:.1f} ms"
        + (f", predicted {row_pred * 1e3:.1f} ms ({total_measured / row_pred:.1f}x)"
           if row_pred else ""))
  for plan in args.plans:
    seconds = whole_image(config, plan, (width, height), dtype, scales, args.repeats)
    print(f"Refiner.refine, plan {plan}: {seconds * 1e3:.1f} ms per image"
          + (f" ({seconds / row_pred:.1f}x the fused row's prediction)" if row_pred else ""),
          flush=True)


def whole_image(config, plan, size, dtype, scales, repeats: int) -> float:
  """Median seconds of ``Refiner.refine`` on a random image (after one that compiles)."""
  import jax
  from crm_jax.models import CRM, init_variables
  from crm_jax.refine import Refiner
  variables = jax.device_get(init_variables(CRM(config), jax.random.PRNGKey(0)))
  refiner = Refiner(config, variables, plan=plan, dtype=dtype, compilation_cache=True,
                    warn_small=False)
  width, height = size
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  mask = np.zeros((height, width), np.uint8)
  mask[height // 4: 3 * height // 4, width // 5: 4 * width // 5] = 255
  refiner.refine(image, mask, scales)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    refiner.refine(image, mask, scales)
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("table", nargs="?", default=os.path.join(ROOT, "docs", "roofline.json"),
                      help="the JSON of benchmarks/roofline.py --json (default: docs/roofline.json,"
                           " the table of docs/benchmarks.md)")
  parser.add_argument("--sizes", nargs="*", default=None, help="only these WIDTHxHEIGHT rows")
  parser.add_argument("--dtypes", nargs="*", default=None)
  parser.add_argument("--peak", default=None, help="the table's peak to compare with "
                                                   "(default: from the device's name)")
  parser.add_argument("--plans", nargs="*", default=["fused"], choices=("fused", "banded"),
                      help="plans timed on whole images")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)

  import jax
  with open(args.table) as f:
    table = json.load(f)
  device = jax.devices()[0]
  name, peak = peak_for(device.device_kind, table["meta"]["peaks"], args.peak)
  print(f"device check on {device.device_kind} ({device.platform}), jax {jax.__version__}; "
        f"table from {table['meta']['machine']}; peaks: {name or 'none for this device'}")
  rows = [r for r in table["rows"] if r["plan"] == "fused"
          and (not args.sizes or r["size"] in args.sizes)
          and (not args.dtypes or r["dtype"] in args.dtypes)]
  if not rows:
    print("no fused rows in the table match")
    return 1
  for row in rows:
    check_row(row, peak, args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
