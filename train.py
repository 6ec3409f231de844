"""Trains CRM: ``python train.py --config configs/crm_resnet50.py --workdir DIR``.

Flags: ``--config`` (an ``ml_collections`` config file; fields can be overridden as
``--config.FIELD=VALUE``) and ``--workdir`` (created; a run started again in the same workdir
resumes from its last checkpoint). All the work is ``crm_jax.train_lib.train_and_evaluate``;
multi-host runs set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
(see that module). Errors print one line and exit with status 1.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from crm_jax import train_lib
from crm_jax.checkpoint import CheckpointError
from crm_jax.data.pipeline import DatasetError
from crm_jax.io import InputError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the model.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:  # no INFO chatter unless --verbosity asks for it
    logging.set_verbosity(logging.WARNING)
  try:
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train_lib.TrainingError, DatasetError, CheckpointError, InputError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
