"""Kept for existing imports: the trainer lives in ``crm_jax.training`` (see its docstring)."""

from crm_jax.training import TrainingError, train_and_evaluate  # noqa: F401
