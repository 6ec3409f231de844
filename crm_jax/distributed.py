"""The one multi-host start-up (training, evaluation, folder mode) and the barrier.

``maybe_initialize_distributed`` calls ``jax.distributed.initialize`` when the environment sets
``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0's coordinator), together with
``JAX_NUM_PROCESSES`` (the number of processes) and ``JAX_PROCESS_ID`` (this process, 0-based);
optionally ``JAX_LOCAL_DEVICE_IDS`` (comma-separated local device ids) and
``JAX_HEARTBEAT_TIMEOUT_SECONDS`` (default JAX's, 100): a process whose peer dies (killed, its
host lost) is ended by JAX's coordination service within about that time, with a non-zero
status and a line naming the lost task, instead of waiting in a collective. On CPU the cross-process
collectives use gloo (``jax_cpu_collectives_implementation``). Needs only JAX (no training
packages), so the refinement path can use it.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils

from crm_jax.io import InputError

_STATE = {'initialized': False}


def maybe_initialize_distributed() -> bool:
  """Returns whether a multi-process run was set up (now or before). Must run before anything
  touches a JAX backend. Bad variables are an ``InputError``."""
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not address:
    return False
  if _STATE['initialized']:
    return True
  try:
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
    process_id = int(os.environ['JAX_PROCESS_ID'])
    local = os.environ.get('JAX_LOCAL_DEVICE_IDS')
    local_ids = [int(i) for i in local.split(',')] if local else None
    heartbeat = os.environ.get('JAX_HEARTBEAT_TIMEOUT_SECONDS')
    timeouts = {'heartbeat_timeout_seconds': int(heartbeat)} if heartbeat else {}
    if timeouts and timeouts['heartbeat_timeout_seconds'] < 1:
      raise ValueError(heartbeat)
  except (KeyError, ValueError):
    raise InputError('JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and '
                     'JAX_PROCESS_ID must be set to integers too (JAX_LOCAL_DEVICE_IDS to '
                     'integers and JAX_HEARTBEAT_TIMEOUT_SECONDS to a positive one, if set)'
                     ) from None
  # CPU collectives across processes (no effect on GPU/TPU collectives).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_ids, **timeouts)
  _STATE['initialized'] = True
  return True


def barrier(name: str) -> None:
  """Every process waits here for the others (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
