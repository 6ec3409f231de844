"""CRM training (docs/training.md), split by what a reader looks for: ``loop.py`` is
``train_and_evaluate(config, workdir)`` read top to bottom; the other modules are listed in
docs/architecture.md. Multi-host start-up is ``crm_jax.distributed``."""

from crm_jax.training.config import TrainingError  # noqa: F401
from crm_jax.training.loop import train_and_evaluate  # noqa: F401
from crm_jax.training.preemption import Preempted  # noqa: F401
