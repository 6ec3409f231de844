"""Trains CRM: ``python train.py --config configs/crm_resnet50.py --workdir DIR``.

Flags: ``--config`` (an ``ml_collections`` config file; fields can be overridden as
``--config.FIELD=VALUE``) and ``--workdir`` (created; a run started again in the same workdir
resumes from its last checkpoint). All the work is ``crm_jax.training.train_and_evaluate``;
multi-host runs set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
(see ``crm_jax/training/distributed.py``). Errors (a missing config file, an unknown or bad
field, an unusable workdir or dataset) print one line and exit with status 1.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from crm_jax import training
from crm_jax.checkpoint import CheckpointError
from crm_jax.data.pipeline import DatasetError
from crm_jax.io import InputError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the model.')
flags.mark_flags_as_required(['config', 'workdir'])


def _fail(message: str) -> None:
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(1)


def parse_flags(argv):
  """absl's flag parsing, with a bad flag, config file or field as a one-line error."""
  try:
    rest = flags.FLAGS(argv)
    'num_steps' in _CONFIG.value  # noqa: B015  (a config file that failed to load raises here)
  except flags.Error as e:
    _fail(e)
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config.FIELD
    _fail(f'--config: the config has no field {str(e).strip(chr(34)).strip(chr(39))!r}')
  except TypeError as e:  # a --config.A.B path through a field that is not a dict
    _fail(f'--config: a field override does not fit the config ({e})')
  except (OSError, SyntaxError, ImportError) as e:  # a missing or broken config file
    lines = [l.strip() for l in str(e.__cause__ or e).splitlines() if l.strip()]
    _fail(f'--config: {lines[-1] if lines else type(e).__name__}')
  return rest


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:  # no INFO chatter unless --verbosity asks for it
    logging.set_verbosity(logging.WARNING)
  try:
    training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (training.TrainingError, DatasetError, CheckpointError, InputError) as e:
    _fail(e)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
