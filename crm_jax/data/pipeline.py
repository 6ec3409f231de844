"""The seeded, deterministic, multi-process training loader (docs/data.md, "The loader"): example
``j`` of global step ``t`` is a pure function of ``(seed, t, j)``; each host builds its slice of
every global batch: ``image`` float32 ``[b, S, S, 3]``, ``seg`` and ``gt`` ``[b, S, S, 1]``."""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from typing import Any, Dict, Iterator, Optional, Sequence

from absl import flags
import grain
import numpy as np

from crm_jax.data import augment
from crm_jax.data import synthetic
from crm_jax.data import tfds_builders

# The dataset kinds of ``config.dataset``.
SYNTHETIC = 'synthetic'
TFDS_MIXTURE = 'tfds_mixture'
REAL_PHOTOS = 'real_photos'
DATASETS = (SYNTHETIC, TFDS_MIXTURE, REAL_PHOTOS)

# Stream keys of np.random.default_rng([seed, key, ...]), so the streams never overlap.
_PERMUTATION_STREAM, _EXAMPLE_STREAM, _PASS_STREAM = 1, 2, 3


class DatasetError(ValueError):
  """A dataset that is unknown, missing or not prepared; the message says which and where."""


def _get(config: Any, name: str, default: Any = None) -> Any:
  return config[name] if name in config else default


def make_source(config: Any):
  """The random-access source of ``{'image': uint8 [H, W, 3], 'mask': uint8 [H, W]}`` items of
  ``config.dataset`` (``DATASETS``); DatasetError for an unknown, empty or unprepared one."""
  kind = _get(config, 'dataset')
  if kind == SYNTHETIC:
    size, n = int(_get(config, 'synthetic_size')), int(_get(config, 'synthetic_num_examples'))
    if n <= 0 or size <= 0:
      raise DatasetError(f'synthetic dataset: synthetic_num_examples ({n}) and synthetic_size '
                         f'({size}) must be positive')
    return synthetic.SyntheticSource(n, size, size, seed=int(_get(config, 'seed', 0)))
  if kind == TFDS_MIXTURE:
    data_dir = os.path.expanduser(str(_get(config, 'data_dir', '')))
    names = tuple(_get(config, 'tfds_sets', ()) or ())
    if not names:
      raise DatasetError('dataset tfds_mixture: config.tfds_sets names no dataset')
    try:
      tfds_builders.require_prepared(names, data_dir)
    except ValueError as e:  # an unknown set name
      raise DatasetError(f'dataset tfds_mixture: {e}') from None
    except FileNotFoundError as e:
      raise DatasetError(f'{e}, or set config.data_dir / config.tfds_sets') from None
    source = tfds_builders.MixtureSource({n: tfds_builders.load_source(n, data_dir) for n in names})
    if len(source) == 0:
      raise DatasetError(f'{data_dir}: the datasets {", ".join(names)} hold no example')
    return source
  if kind == REAL_PHOTOS:
    from crm_jax.data import real_photos  # training only; needs scikit-image's photographs
    try:
      return real_photos.make_source(config)
    except (ValueError, real_photos.PhotoError) as e:
      raise DatasetError(f'dataset real_photos: {e}') from None
  raise DatasetError(f'unknown config.dataset {kind!r}; known: {", ".join(DATASETS)}')


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, _PERMUTATION_STREAM, epoch]).permutation(n)


def record_index(seed: int, step: int, j: int, batch_size: int, num_records: int) -> int:
  """The source record of example ``j`` of global step ``step`` (a per-epoch permutation)."""
  epoch, pos = divmod(step * batch_size + j, num_records)
  return int(_epoch_permutation(seed, epoch, num_records)[pos])


def make_example(source, seed: int, step: int, j: int, batch_size: int,
                 crop_size: int, options: augment.Options = augment.Options()
                 ) -> Dict[str, np.ndarray]:
  """Example ``j`` of global step ``step``: ``{'image' [S,S,3], 'seg' [S,S,1], 'gt' [S,S,1]}``."""
  item = source[record_index(seed, step, j, batch_size, len(source))]
  rng = np.random.default_rng([seed, _EXAMPLE_STREAM, step, j])
  return augment.make_training_example(item['image'], item['mask'], rng, crop_size, options)


def host_slice(batch_size: int, process_index: int, process_count: int) -> range:
  """The global example indices ``j`` that process ``process_index`` builds each step."""
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f'bad process index {process_index} of {process_count}')
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not a positive multiple of the number of '
                     f'processes ({process_count})')
  per_host = batch_size // process_count
  return range(process_index * per_host, (process_index + 1) * per_host)


class StepBatch:
  """Picklable ``step -> host batch`` function (the grain map transform)."""

  def __init__(self, source, seed: int, batch_size: int, crop_size: int, indices: Sequence[int],
               options: augment.Options = augment.Options()):
    self.source, self.options, self.indices = source, options, tuple(int(j) for j in indices)
    self.seed, self.batch_size, self.crop_size = int(seed), int(batch_size), int(crop_size)

  def __call__(self, step: int) -> Dict[str, np.ndarray]:
    step = int(step)
    examples = [make_example(self.source, self.seed, step, j, self.batch_size, self.crop_size,
                             self.options) for j in self.indices]
    batch = {k: np.stack([e[k] for e in examples]) for k in ('image', 'seg', 'gt')}
    if self.options.pass_scales is not None:
      batch = augment.pass_inputs(batch, step_pass_scale(self.seed, step, self.options.pass_scales))
    return batch


def step_pass_scale(seed: int, step: int, scales: Sequence[float]) -> float:
  """The pass scale of global step ``step``: of ``(seed, step)`` only, so all hosts agree."""
  return augment.pass_scale(np.random.default_rng([seed, _PASS_STREAM, step]), tuple(scales))


def host_batch(config: Any, step: int, process_index: int = 0, process_count: int = 1,
               source=None) -> Dict[str, np.ndarray]:
  """One step's host batch, computed directly in this process (tests, benchmarks)."""
  source = make_source(config) if source is None else source
  indices = host_slice(int(config.batch_size), process_index, process_count)
  return step_batch_fn(config, source, indices)(step)


def step_batch_fn(config: Any, source, indices: Sequence[int]) -> StepBatch:
  """The ``step -> host batch`` function of a config, for the examples ``indices``."""
  return StepBatch(source, config.seed, config.batch_size, config.crop_size, indices,
                   augment.Options.from_config(config))


def exit_with_parent(worker_index: int, worker_count: int) -> None:
  """grain's ``worker_init_fn``: the worker ends within a second of its parent, however it ended."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)

  threading.Thread(target=watch, name='exit_with_parent', daemon=True).start()


class TrainLoader:
  """Iterates ``(step, host batch)`` over steps ``start_step, ..., num_steps - 1``; a context
  manager. Hosts default to JAX's; ``num_workers`` and ``num_steps`` override the config's."""

  def __init__(self, config: Any, start_step: int = 0, *, process_index: Optional[int] = None,
               process_count: Optional[int] = None, num_workers: Optional[int] = None,
               source=None, num_steps: Optional[int] = None):
    if process_index is None or process_count is None:
      import jax  # only when the caller did not say (keeps worker processes free of JAX)
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.source = make_source(config) if source is None else source
    self.start_step = int(start_step)
    self.num_steps = int(config.num_steps if num_steps is None else num_steps)
    self.indices = host_slice(int(config.batch_size), process_index, process_count)
    workers = int(config.num_workers if num_workers is None else num_workers)
    fn = step_batch_fn(config, self.source, self.indices)
    ds = grain.MapDataset.range(self.start_step, max(self.start_step, self.num_steps)).map(fn)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if workers > 0:
      # grain's workers read absl flags: outside an absl app, take their defaults.
      flags.FLAGS.mark_as_parsed()
      # Batches travel pickled, not in shared memory: grain keeps each worker's last batch in a
      # reference cycle, whose shared memory outlived the run (resource_tracker's warning).
      it_ds = grain.experimental.WithOptionsIterDataset(
          it_ds, grain.experimental.DatasetOptions(min_shm_size=sys.maxsize))
      mp_options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
      it_ds = it_ds.mp_prefetch(mp_options, worker_init_fn=exit_with_parent)
    self._dataset, self._iterator = it_ds, None

  def __iter__(self) -> Iterator:
    self.close()
    self._iterator = iter(self._dataset)
    try:
      for k, batch in enumerate(self._iterator):
        yield self.start_step + k, batch
    finally:
      self.close()

  def close(self) -> None:
    it, self._iterator = self._iterator, None
    if it is not None and hasattr(it, 'close'):
      it.close()

  def __enter__(self) -> 'TrainLoader':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
