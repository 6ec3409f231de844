"""CRM training, split by what a reader looks for (docs/training.md gives the recipe).

Multi-host start-up is ``crm_jax.distributed``.

- ``loop.py``: ``train_and_evaluate(config, workdir)``, the loop read top to bottom.
- ``config.py``: the config's fields checked and turned into a model, loss weights, an optimiser.
- ``step.py``: ``TrainState``, the pure ``train_step``, the on-device non-finite guard, ``build``.
- ``devices.py``: replicating, sharding and prefetching to the local devices.
- ``workdir.py``: the workdir's layout, its recorded config, leftovers of killed runs.
- ``resume.py``: the workdir's training-state checkpoints (orbax) and ``config.init``: where a
  run starts from (model checkpoints, what training exports, are ``crm_jax.checkpoint``).
- ``preemption.py``: SIGTERM / SIGINT -> a checkpoint at the next step boundary.
- ``logger.py``: console, TensorBoard, example pictures.
- ``validation.py``: the multi-scale loop on a validation set during training.
"""

from crm_jax.training.config import TrainingError  # noqa: F401
from crm_jax.training.loop import train_and_evaluate  # noqa: F401
from crm_jax.training.preemption import Preempted  # noqa: F401
