"""The ``crm-evaluate`` and ``crm-train`` commands (``evaluate.py`` and ``train.py`` in a checkout).

Each parses flags and calls one library function: ``crm_jax.evaluation.evaluate`` and
``crm_jax.training.train_and_evaluate``. ``crm-refine`` is ``crm_jax.refine.main`` and
``crm-convert`` is ``crm_jax.convert.main``.

    crm-evaluate --data DIR --checkpoint CKPT --output OUT [--scales 0.125 0.25 0.5 1.0] \\
        [--min-side N]
    crm-evaluate --data crm_big --tfds-data-dir TFDS_DIR [--split test] --checkpoint CKPT \\
        --output OUT
    crm-evaluate --metrics-only --output OUT
    crm-train --config configs/crm_resnet50.py --workdir DIR [--config.FIELD=VALUE ...]
"""

import argparse
import os
import sys


def exit_status(run) -> int:
  """``run()``, then 0; a bad input, checkpoint or OS error is one ``error:`` line and 2 (the
  refine and evaluate commands' rule: no traceback)."""
  from crm_jax.checkpoint import CheckpointError
  from crm_jax.io import InputError, os_error_line
  try:
    run()
  except (InputError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {os_error_line(e)}", file=sys.stderr)
    return 2
  return 0


def evaluate_main(argv=None) -> int:
  """Refines BIG-style data at every scale and reports IoU and mBA (docs/refinement.md,
  docs/metrics.md).

  Writes the published output layout in OUT, OUT/manifest.json (the model's fingerprint, scales,
  dtype, plan, min side) and OUT/metrics.json; a run started again with the same model and
  settings skips objects that are already complete, one with others is refused unless
  --overwrite. Bad objects are reported and skipped; the exit status is non-zero only when
  nothing could be evaluated or an argument is bad (2 and one line, no traceback).

  Objects are refined on every local device (--devices N: the first N), largest first; with
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (as for crm-train), each
  process refines its share into the shared OUT and process 0 writes OUT/metrics.json
  (crm_jax.sharding).
  """
  from crm_jax.constants import SCALES
  from crm_jax.evaluation import evaluate
  from crm_jax.io import show_warnings_as_lines

  parser = argparse.ArgumentParser(
      description="Refines BIG-style data at every scale and reports IoU and mBA.")
  parser.add_argument("--data", help="folder in the BIG layout, or a TFDS name with "
                      "--tfds-data-dir (crm_big)")
  parser.add_argument("--tfds-data-dir", help="TFDS data dir in which --data is prepared")
  parser.add_argument("--split", help="TFDS split (needed when there are several)")
  parser.add_argument("--checkpoint", help="crm-jax model checkpoint directory")
  parser.add_argument("--output", required=True, help="output folder")
  parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
  parser.add_argument("--min-side", type=int, default=None,
                      help="leave out the leading scales at which an image's shorter side is "
                           "below N pixels; their masks are the coarse mask; 0: every scale, "
                           "the published loop (default: what the checkpoint recommends, 0 "
                           "unless it names a value; see docs/refinement.md)")
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
  parser.add_argument("--devices", type=int, default=None,
                      help="refine on the first N local devices (default: all of them)")
  parser.add_argument("--overwrite", action="store_true",
                      help="--output holds masks of another model or settings: remove them and "
                           "refine everything again")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  if not args.metrics_only and not (args.data and args.checkpoint):
    parser.error("--data and --checkpoint are required unless --metrics-only")
  show_warnings_as_lines()
  from crm_jax.refine import enable_compilation_cache  # JAX is imported only here.
  if not args.metrics_only:
    enable_compilation_cache()
  return exit_status(lambda: evaluate(
      args.data, args.checkpoint, args.output, args.scales, metrics_only=args.metrics_only,
      progress=not args.no_progress, tfds_data_dir=args.tfds_data_dir, split=args.split,
      dtype=args.dtype, overwrite=args.overwrite, plan=args.plan, batch_size=args.batch_size,
      devices=args.devices, min_side=args.min_side))



def _config_import_roots(argv):
  """The current folder and, for ``--config PATH`` / ``--config=PATH``, PATH's grandparent."""
  roots = [os.getcwd()]
  for i, arg in enumerate(argv):
    path = None
    if arg in ("--config", "-config") and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith(("--config=", "-config=")):
      path = arg.split("=", 1)[1]
    if path:
      roots.append(os.path.dirname(os.path.dirname(os.path.abspath(path))))
  return roots


def _fail(message) -> None:
  """One ``error:`` line and exit status 1 (the train command's errors)."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(1)


def _train_flags():
  """absl's FLAGS with ``--config`` and ``--workdir`` (defined once per process)."""
  from absl import flags
  from ml_collections import config_flags
  if "workdir" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the model.")
    flags.mark_flags_as_required(["config", "workdir"])
  return flags.FLAGS


def _parse_train_flags(argv):
  """absl's flag parsing, with a bad flag, config file or field as a one-line error."""
  from absl import flags
  all_flags = _train_flags()
  try:
    rest = all_flags(argv)
    "num_steps" in all_flags.config  # noqa: B015  (a config file that failed to load raises here)
  except flags.Error as e:
    _fail(e)
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config.FIELD
    _fail(f"--config: the config has no field {str(e).strip(chr(34)).strip(chr(39))!r}")
  except TypeError as e:  # a --config.A.B path through a field that is not a dict
    _fail(f"--config: a field override does not fit the config ({e})")
  except (OSError, SyntaxError, ImportError) as e:  # a missing or broken config file
    lines = [l.strip() for l in str(e.__cause__ or e).splitlines() if l.strip()]
    _fail(f"--config: {lines[-1] if lines else type(e).__name__}")
  return rest


def train_main(argv=None) -> None:
  """Trains CRM (docs/training.md): ``--config`` (an ``ml_collections`` config file; fields can be
  overridden as ``--config.FIELD=VALUE``) and ``--workdir`` (created; a run started again in the
  same workdir resumes from its last checkpoint). All the work is
  ``crm_jax.training.train_and_evaluate``.

  ``argv`` is the whole command line, program name first (``sys.argv`` when None). The current
  folder and the folder above the config file's go first on ``sys.path`` (as for ``python
  train.py`` in a checkout), so that config files importing ``configs.*`` load from anywhere.
  Multi-host runs set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  (see ``crm_jax/training/distributed.py``). Errors (a missing config file, an unknown or bad
  field, an unusable workdir or dataset) print one line and exit with status 1.
  """
  from absl import app
  from absl import logging

  from crm_jax import training
  from crm_jax.checkpoint import CheckpointError
  from crm_jax.data.pipeline import DatasetError
  from crm_jax.io import InputError

  for root in _config_import_roots(sys.argv if argv is None else argv):
    if root not in sys.path:
      sys.path.insert(0, root)

  def run(args):
    all_flags = _train_flags()
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
    if not all_flags["verbosity"].present:  # no INFO chatter unless --verbosity asks for it
      logging.set_verbosity(logging.WARNING)
    try:
      training.train_and_evaluate(all_flags.config, all_flags.workdir)
    except (training.TrainingError, DatasetError, CheckpointError, InputError) as e:
      _fail(e)

  app.run(run, argv=argv, flags_parser=_parse_train_flags)
