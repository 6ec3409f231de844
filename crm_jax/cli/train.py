"""``crm-train`` (``train.py`` in a checkout): trains CRM as a config file says, into a workdir.

    crm-train --config configs/crm_resnet50.py --workdir DIR [--config.FIELD=VALUE ...]

``--config``: an ``ml_collections`` config file (fields overridden as ``--config.FIELD=VALUE``);
``--workdir``: created; a run started again in the same workdir resumes from its last checkpoint.
Multi-host runs set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
(``crm_jax.distributed``). Errors (a missing config file, an unknown or bad field, an unusable
workdir or dataset, a full disk) print one line and exit with status 1; SIGTERM / SIGINT save a
checkpoint and exit with 128 + the signal's number. The work is
``crm_jax.training.train_and_evaluate``; the recipe and the configs: docs/training.md.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from crm_jax import training
from crm_jax.checkpoint import CheckpointError
from crm_jax.data.pipeline import DatasetError
from crm_jax.io import InputError
from crm_jax.outputs import os_error_line

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort")


def _config_import_roots(argv):
  """The current folder and, for ``--config PATH`` / ``--config=PATH``, PATH's grandparent."""
  roots = [os.getcwd()]
  for arg, nxt in zip(argv, list(argv[1:]) + [None]):
    path = nxt if arg in ("--config", "-config") else (
        arg.split("=", 1)[1] if arg.startswith(("--config=", "-config=")) else None)
    if path:
      roots.append(os.path.dirname(os.path.dirname(os.path.abspath(path))))
  return roots


def _fail(message) -> None:
  """One ``error:`` line and exit status 1 (the train command's errors)."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(1)


def _end(status: int, message=None) -> None:
  """The ``error:`` line (if any), then ``os._exit``: no shutdown barrier (a peer may be gone)."""
  if message is not None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def os_error_in(e: BaseException):
  """The ``OSError`` with an errno that caused ``e`` (itself, its causes or contexts), or None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e
    e = e.__cause__ or e.__context__
  return None


def _quiet_closed_loops() -> None:
  """Drops the "Event loop is closed" reports of orbax's reads that outlive a failed restore."""
  report = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      report(unraisable)
  sys.unraisablehook = hook


def _train_flags():
  """absl's FLAGS with ``--config`` and ``--workdir`` (defined once per process)."""
  if "workdir" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the model.")
    flags.mark_flags_as_required(["config", "workdir"])
  return flags.FLAGS


def _parse_train_flags(argv):
  """absl's flag parsing, with a bad flag, config file or field as a one-line error."""
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


def main(argv=None) -> None:
  """``argv``: the whole command line (``sys.argv`` when None); configs may import ``configs.*``."""
  argv = list(sys.argv if argv is None else argv)
  if any(a in HELP_FLAGS for a in argv[1:]):
    print("usage: crm-train --config CONFIG.py --workdir DIR [--config.FIELD=VALUE ...]\n")
    print(__doc__.split("\n\n", 1)[1].split("\n\n", 1)[1])
    sys.exit(0)
  _quiet_closed_loops()
  for root in _config_import_roots(argv):
    if root not in sys.path:
      sys.path.insert(0, root)

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
    if not flags.FLAGS["verbosity"].present:  # no INFO chatter unless --verbosity asks for it
      logging.set_verbosity(logging.WARNING)
    try:
      training.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except training.Preempted as e:  # its line is printed: a checkpoint was saved
      _end(e.exit_status)
    except (training.TrainingError, DatasetError, CheckpointError, InputError) as e:
      _end(1, e)
    except Exception as e:  # a full disk (or another OS error) under orbax's own exception types
      cause = os_error_in(e)
      if cause is None:
        raise
      _end(1, os_error_line(cause) if cause.filename else
           f"{flags.FLAGS.workdir}: {os_error_line(cause)}")

  app.run(run, argv=argv, flags_parser=_parse_train_flags)


if __name__ == "__main__":
  main()
