"""Multi-host runs (JAX only): the one start-up of training, evaluation and folder mode, from
the ``JAX_*`` variables of docs/devices.md, and ``allgather``."""

from __future__ import annotations

import itertools
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from crm_jax.io import InputError
from crm_jax.outputs import error_line

_STATE = {'initialized': False}
_CALLS = itertools.count(1)  # every process makes the same sequence of allgather calls
_WAIT_MS = 7 * 24 * 3600 * 1000  # a dead peer ends the run sooner (the heartbeat timeout)
_CHUNK = 1 << 20  # characters per value in the coordination service's key-value store


def maybe_initialize_distributed() -> bool:
  """Whether ``JAX_COORDINATOR_ADDRESS`` set up a multi-process run (now or before); bad variables:
  ``InputError``. Must run before anything touches a JAX backend."""
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
    raise InputError('JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID '
                     'must be set to integers too (JAX_LOCAL_DEVICE_IDS to integers and '
                     'JAX_HEARTBEAT_TIMEOUT_SECONDS to a positive one, if set)') from None
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU only; GPU/TPU unchanged
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_ids, **timeouts)
  _STATE['initialized'] = True
  return True


def barrier(name: str) -> None:
  """Every process waits here for the others (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def coordination_client():
  """The coordination service's client (private JAX: ``jax._src.distributed``), or None."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    client = distributed.global_state.client
  except (ImportError, AttributeError):
    return None
  usable = client is not None and all(hasattr(client, m)
                                      for m in ('key_value_set', 'blocking_key_value_get'))
  return client if usable else None


def allgather(value) -> list:
  """Every process's ``value`` (anything JSON writes), in process order; a barrier. Through the
  coordination service's key-value store (CPU collectives give up after 30 s; peers may arrive
  minutes apart), else a public collective."""
  if jax.process_count() == 1:
    return [value]
  client = coordination_client()
  text = json.dumps(value)
  if client is None:
    data = np.frombuffer(text.encode('utf-8'), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).reshape(-1)
    padded = np.pad(data, (0, int(sizes.max()) - data.size))
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(rows[i, :n]).decode('utf-8')) for i, n in enumerate(sizes)]
  prefix = f'crm_jax/allgather/{next(_CALLS)}'
  chunks = [text[i:i + _CHUNK] for i in range(0, len(text), _CHUNK)] or ['']
  for k, chunk in enumerate(chunks):
    client.key_value_set(f'{prefix}/{jax.process_index()}/{k}', chunk)
  client.key_value_set(f'{prefix}/{jax.process_index()}/n', str(len(chunks)))

  def get(key):
    return client.blocking_key_value_get(f'{prefix}/{key}', _WAIT_MS)
  return [json.loads(''.join(get(f'{i}/{k}') for k in range(int(get(f'{i}/n')))))
          for i in range(jax.process_count())]


def gather(value, error: BaseException | None = None) -> list:
  """``allgather(value)`` failing together: raises ``error``, or another process's as InputError."""
  gathered = allgather([None if error is None else error_line(error), value])
  if error is not None:
    raise error
  for i, (e, _) in enumerate(gathered):
    if e is not None:
      raise InputError(f'process {i}: {e}')
  return [v for _, v in gathered]
