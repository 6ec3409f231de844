"""Placing trees on this host's devices for ``jax.pmap``: replicate, shard, prefetch, fetch. The
``NamedSharding`` axis is named as pmap names its outputs, so all steps share one compilation."""

from __future__ import annotations

import collections
import itertools
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np

from crm_jax.training.step import AXIS_NAME

PREFETCH = 2  # batches placed on the devices ahead of the step that uses them.


def _sharding(devices: Optional[Sequence[jax.Device]]) -> Tuple[jax.sharding.NamedSharding, int]:
  devices = list(devices) if devices is not None else jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS_NAME,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_NAME)), len(devices)


def replicate(tree, devices: Optional[Sequence[jax.Device]] = None):
  """A copy of ``tree`` on every local device (or ``devices``), stacked on a new leading axis."""
  sharding, n = _sharding(devices)
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * n), sharding), tree)


def unreplicate(tree):
  """The first local device's copy, as numpy (waits for the devices)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x[0])), tree)


def shard(batch: Dict[str, np.ndarray], num_devices: int) -> Dict[str, np.ndarray]:
  """``[b, ...] -> [num_devices, b // num_devices, ...]``."""
  return {k: v.reshape((num_devices, v.shape[0] // num_devices) + v.shape[1:])
          for k, v in batch.items()}


def prefetch(batches: Iterable[Tuple[int, Dict[str, np.ndarray]]], size: int = PREFETCH,
             devices: Optional[Sequence[jax.Device]] = None) -> Iterator[Tuple]:
  """``(step, host_batch)`` -> ``(step, host_batch, device_batch)``, ``size`` batches ahead."""
  sharding, n = _sharding(devices)
  placed = ((step, batch, jax.device_put(shard(batch, n), sharding)) for step, batch in batches)
  queue = collections.deque(itertools.islice(placed, size))
  while queue:
    yield queue.popleft()
    queue.extend(itertools.islice(placed, 1))
