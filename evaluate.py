"""Refines a folder in the BIG layout at every scale and reports IoU and mBA.

    python evaluate.py --data DIR --checkpoint CKPT --output OUT [--scales ...]
    python evaluate.py --metrics-only --output OUT

Writes the published output layout in OUT and OUT/metrics.json; a run started
again skips objects that are already complete.
"""

import argparse
import sys

from crm_jax.checkpoint import CheckpointError
from crm_jax.constants import SCALES
from crm_jax.evaluation import evaluate
from crm_jax.io import InputError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", help="folder in the BIG layout")
  parser.add_argument("--checkpoint", help="crm-jax model checkpoint directory")
  parser.add_argument("--output", required=True, help="output folder")
  parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
  parser.add_argument("--metrics-only", action="store_true",
                      help="recompute the metrics of masks already in --output")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  if not args.metrics_only and not (args.data and args.checkpoint):
    parser.error("--data and --checkpoint are required unless --metrics-only")
  try:
    evaluate(args.data, args.checkpoint, args.output, args.scales,
             metrics_only=args.metrics_only, progress=not args.no_progress)
  except (InputError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
