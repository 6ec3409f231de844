"""Seconds per validation during training, on the bundled set (or any BIG-layout folder).

Builds the training run's ``Validator`` (``crm_jax.training.validation``) for the folder and times
``validator(variables, step)`` with the bundled checkpoint's weights, after one untimed call
that compiles; prints the median and the range over ``--runs`` calls and the scores.

    .venv/bin/python benchmarks/validation.py [--data DIR] [--runs 5] [--scales 0.5 1.0]

Run it from another checkout (``cd OTHER && python /path/benchmarks/validation.py``) to time
that checkout's validation: it imports ``crm_jax`` from the current folder first.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())


def main(argv=None) -> int:
  import ml_collections
  from crm_jax import bundled
  from crm_jax import checkpoint as ckpt
  from crm_jax.training import validation
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default=bundled.DEMO_DATA)
  p.add_argument("--checkpoint", default=bundled.DEMO_CHECKPOINT)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--scales", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
  args = p.parse_args(argv)
  model_cfg, variables = ckpt.load_model(args.checkpoint)
  config = ml_collections.ConfigDict({
      "eval_every": 1, "eval_data": os.path.abspath(args.data), "eval_scales": args.scales,
      "eval_best_metric": "mba", "seed": 0, "data_dir": "", "eval_synthetic_num_examples": 0,
      "eval_synthetic_size": 0})
  with tempfile.TemporaryDirectory() as workdir:
    validator = validation.Validator(config, workdir, model_cfg, True)
    scores = validator(variables, 0)  # compiles
    seconds = []
    for step in range(1, args.runs + 1):
      t0 = time.perf_counter()
      validator(variables, step)
      seconds.append(time.perf_counter() - t0)
  print(f"{validator.num_objects} objects, scales {' '.join(map(str, args.scales))}: "
        f"median {statistics.median(seconds):.2f} s per validation "
        f"(min {min(seconds):.2f}, max {max(seconds):.2f}, {len(seconds)} runs)")
  print("scores: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items())))
  return 0


if __name__ == "__main__":
  sys.exit(main())
