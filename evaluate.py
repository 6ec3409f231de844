"""Refines BIG-style data at every scale and reports IoU and mBA (docs/metrics.md).

    python evaluate.py --data DIR --checkpoint CKPT --output OUT [--scales 0.125 0.25 0.5 1.0]
    python evaluate.py --data crm_big --tfds-data-dir TFDS_DIR [--split test] \\
        --checkpoint CKPT --output OUT
    python evaluate.py --metrics-only --output OUT

Writes the published output layout in OUT, OUT/manifest.json (the model's fingerprint, scales,
dtype, plan) and OUT/metrics.json; a run started again with the same model and settings skips
objects that are already complete, one with others is refused unless --overwrite. Bad objects are
reported and skipped; the exit status is non-zero only when nothing could be evaluated or an
argument is bad (one line, no traceback). The work is ``crm_jax.evaluation.evaluate``.
"""

import argparse
import sys

from crm_jax.checkpoint import CheckpointError
from crm_jax.constants import SCALES
from crm_jax.evaluation import evaluate
from crm_jax.io import InputError, os_error_line, show_warnings_as_lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", help="folder in the BIG layout, or a TFDS name with "
                      "--tfds-data-dir (crm_big)")
  parser.add_argument("--tfds-data-dir", help="TFDS data dir in which --data is prepared")
  parser.add_argument("--split", help="TFDS split (needed when there are several)")
  parser.add_argument("--checkpoint", help="crm-jax model checkpoint directory")
  parser.add_argument("--output", required=True, help="output folder")
  parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
  parser.add_argument("--metrics-only", action="store_true",
                      help="recompute the metrics of the masks already in --output")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype of the network (bfloat16: for accelerators; see "
                           "the README for its accuracy change)")
  parser.add_argument("--plan", choices=("auto", "plain", "banded", "fused"), default="auto",
                      help="execution plan (default auto: banded on the CPU, fused on an "
                           "accelerator whose memory holds it)")
  parser.add_argument("--batch-size", type=int, default=1,
                      help="objects of one size bucket refined as one batch (fused plan)")
  parser.add_argument("--overwrite", action="store_true",
                      help="--output holds masks of another model or settings: remove them and "
                           "refine everything again")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  if not args.metrics_only and not (args.data and args.checkpoint):
    parser.error("--data and --checkpoint are required unless --metrics-only")
  show_warnings_as_lines()
  try:
    evaluate(args.data, args.checkpoint, args.output, args.scales,
             metrics_only=args.metrics_only, progress=not args.no_progress,
             tfds_data_dir=args.tfds_data_dir, split=args.split, dtype=args.dtype,
             overwrite=args.overwrite, plan=args.plan, batch_size=args.batch_size)
  except (InputError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {os_error_line(e)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
