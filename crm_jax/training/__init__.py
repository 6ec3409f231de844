"""CRM training, split by what a reader looks for (docs/training.md gives the recipe).

- ``loop.py``: ``train_and_evaluate(config, workdir)``, the loop read top to bottom.
- ``config.py``: the config's fields checked and turned into a model, loss weights, an optimiser.
- ``step.py``: ``TrainState``, the pure ``train_step``, the on-device non-finite guard, ``build``.
- ``devices.py``: replicating, sharding and prefetching to the local devices.
- ``distributed.py``: multi-host start-up from the environment.
- ``workdir.py``: the workdir's layout, its recorded config, leftovers of killed runs.
- ``checkpoints.py``: orbax training checkpoints and ``config.init``.
- ``preemption.py``: SIGTERM / SIGINT -> a checkpoint at the next step boundary.
- ``logger.py``: console, TensorBoard, example pictures.
- ``validation.py``: the multi-scale loop on a validation set during training.
"""

from crm_jax.training.config import TrainingError  # noqa: F401
from crm_jax.training.loop import train_and_evaluate  # noqa: F401
