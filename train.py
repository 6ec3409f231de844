"""Trains CRM: ``python train.py --config configs/crm_resnet50.py --workdir DIR``.

Flags: ``--config`` (an ``ml_collections`` config file; fields can be overridden as
``--config.FIELD=VALUE``) and ``--workdir`` (created; a run started again in the same workdir
resumes from its last checkpoint). All the work is ``crm_jax.training.train_and_evaluate``;
multi-host runs set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
(see ``crm_jax/training/distributed.py``). Errors (a missing config file, an unknown or bad
field, an unusable workdir or dataset) print one line and exit with status 1.
"""

from crm_jax.cli import train_main

if __name__ == '__main__':
  train_main()
