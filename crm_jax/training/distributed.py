"""Multi-host start-up for training (``crm_jax.distributed``, re-exported) and its barrier."""

from __future__ import annotations

import jax

from crm_jax.distributed import maybe_initialize_distributed  # noqa: F401  (re-exported)


def barrier(name: str) -> None:
  """Every process waits here for the others (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
