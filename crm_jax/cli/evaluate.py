"""``crm-evaluate`` (``evaluate.py`` in a checkout): BIG-style data refined at every scale, IoU and
mBA reported as the published scripts compute them; the work is ``crm_jax.evaluation.evaluate``
(docs/big.md)."""

import argparse
import sys
from typing import Optional, Sequence

from crm_jax.cli.common import add_run_flags, exit_status
from crm_jax.evaluation import evaluate, evaluate_labels
from crm_jax.io import show_warnings_as_lines
from crm_jax.labels import IGNORE
from crm_jax.refine import enable_compilation_cache


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="crm-evaluate",
      description="Refines BIG-style data at every scale and reports IoU and mBA.")
  p.add_argument("--data", help="folder in the BIG layout, or a TFDS name with --tfds-data-dir "
                                "(crm_big)")
  p.add_argument("--tfds-data-dir", help="TFDS data dir in which --data is prepared")
  p.add_argument("--split", help="TFDS split (needed when there are several)")
  p.add_argument("--output", required=True, help="output folder")
  p.add_argument("--metrics-only", action="store_true",
                 help="recompute the metrics of the masks already in --output")
  p.add_argument("--labels", action="store_true",
                 help="the _seg and _gt files of --data are label maps of class ids: mIoU and "
                      "mBA per class, <name>_labels.png written (docs/labels.md)")
  p.add_argument("--ignore", type=int, default=IGNORE,
                 help=f"with --labels: the id of pixels that take part in no class (default "
                      f"{IGNORE}; -1: none)")
  add_run_flags(p, checkpoint_help="crm-jax model checkpoint directory",
                batch_help="objects of one size bucket refined as one batch (fused plan)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Writes the output layout, manifest.json and metrics.json in OUT; 2 when nothing could be
  evaluated or an argument is bad (one ``error:`` line)."""
  p = parser()
  args = p.parse_args(argv)
  if not args.metrics_only and not (args.data and args.checkpoint):
    p.error("--data and --checkpoint are required unless --metrics-only")
  if args.labels and (args.metrics_only or args.tfds_data_dir):
    p.error("--labels evaluates a folder (not --metrics-only or --tfds-data-dir)")
  show_warnings_as_lines()
  if not args.metrics_only:
    enable_compilation_cache()
  if args.labels:
    return exit_status(lambda: evaluate_labels(
        args.data, args.checkpoint, args.output, args.scales,
        None if args.ignore < 0 else args.ignore, progress=not args.no_progress,
        dtype=args.dtype, overwrite=args.overwrite, plan=args.plan, devices=args.devices,
        min_side=args.min_side, export=args.export))
  return exit_status(lambda: evaluate(
      args.data, args.checkpoint, args.output, args.scales, metrics_only=args.metrics_only,
      progress=not args.no_progress, tfds_data_dir=args.tfds_data_dir, split=args.split,
      dtype=args.dtype, overwrite=args.overwrite, plan=args.plan, batch_size=args.batch_size,
      devices=args.devices, min_side=args.min_side, export=args.export))


if __name__ == "__main__":
  sys.exit(main())
