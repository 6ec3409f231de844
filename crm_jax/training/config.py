"""The training config's fields (defaults live in ``configs/``), checked before anything runs
(a one-line ``TrainingError``), and what is derived from them."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Tuple

from crm_jax.data import augment
from crm_jax.models.crm import RESNET50, SMALL, TINY, ModelConfig
from crm_jax.scales import check_min_side

MODEL_PRESETS = {'resnet50': RESNET50, 'small': SMALL, 'tiny': TINY}
COMPUTE_DTYPES = ('float32', 'bfloat16')
BATCH_NORM_SYNC = ('published', 'all')
EVAL_BEST_METRICS = ('iou', 'mba')

# Fields that may differ when a run is resumed (bookkeeping; num_steps may extend a run).
RESUMABLE_FIELDS = ('num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints',
                    'image_every', 'num_workers', 'eval_every', 'eval_data', 'eval_scales',
                    'eval_best_metric', 'eval_synthetic_num_examples', 'eval_synthetic_size',
                    'refine_min_side')
# Fields added after runs were recorded, with the value a recorded config without one ran with.
ADDED_FIELDS = {'rescale_range': None, 'pass_scales': None, 'refine_min_side': 0,
                'fine_seg_fraction': 0.0}
# Replaced fields: old name -> (new name, new value of an old value); a run may not use the old.
REPLACED_FIELDS = {'sync_batch_norm': ('batch_norm_sync',
                                       lambda old: 'all' if old else 'published')}
OPTIMIZER_FIELDS = ('learning_rate', 'weight_decay', 'lr_milestones', 'lr_gamma', 'adam_b1',
                    'adam_b2', 'adam_eps')
LOSS_FIELDS = ('ce_weight', 'l1_weight', 'l2_weight', 'grad_weight')
_MINIMA = {'num_steps': 1, 'batch_size': 1, 'crop_size': 1, 'log_every': 1,
           'checkpoint_every': 1, 'keep_checkpoints': 1, 'image_every': 0, 'eval_every': 0,
           'num_workers': 0, 'seed': 0}


class TrainingError(RuntimeError):
  """A run that cannot start or go on; the message is one line and says why."""


def _one_of(name: str, value, choices: Tuple[str, ...]):
  if value not in choices:
    raise TrainingError(f'config.{name} must be one of {", ".join(choices)}, got {value!r}')
  return value


def check_config(config) -> None:
  """Raises TrainingError naming the first field that is missing or out of range."""
  for name in (*_MINIMA, *OPTIMIZER_FIELDS, *LOSS_FIELDS):
    if name not in config:
      raise TrainingError(f'config.{name} is missing')
    value, low = config[name], _MINIMA.get(name)
    if low is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
      raise TrainingError(f'config.{name} must be an integer >= {low}, got {value!r}')
  _one_of('compute_dtype', config.get('compute_dtype', 'float32'), COMPUTE_DTYPES)
  for old, (new, _) in REPLACED_FIELDS.items():
    if old in config:
      raise TrainingError(f'config.{old} was replaced by config.{new} (docs/training.md); '
                          f'remove config.{old}')
  batch_norm_sync(config)
  _one_of('eval_best_metric', config.get('eval_best_metric', 'mba'), EVAL_BEST_METRICS)
  if config['eval_every'] and not config.get('eval_data'):
    raise TrainingError('config.eval_every > 0 needs config.eval_data (a BIG-layout folder, '
                        "'tfds:NAME[:SPLIT]' or 'synthetic')")
  try:
    augment.Options.from_config(config)
  except (TypeError, ValueError) as e:
    raise TrainingError(f'config: {e}') from None
  refine_min_side(config)
  model_config(config)


def refine_min_side(config) -> int:
  """``config.refine_min_side`` (default 0): the ``min_side`` the exported model recommends."""
  try:
    return check_min_side(config.get('refine_min_side', 0))
  except ValueError as e:
    raise TrainingError(f'config.refine_min_side: {e}') from None


def model_config(config) -> ModelConfig:
  """``config.model`` (a preset name or a dict of fields), with ``config.dropout_rate`` if set."""
  m = config.model
  if isinstance(m, str):
    if m not in MODEL_PRESETS:
      raise TrainingError(f"config.model {m!r} is not a preset ({', '.join(MODEL_PRESETS)}) "
                          'nor a dict of ModelConfig fields')
    cfg = MODEL_PRESETS[m]
  else:
    try:
      cfg = ModelConfig.from_dict(dict(m))
    except (TypeError, ValueError) as e:
      raise TrainingError(f'config.model: {e}') from None
  rate = config.get('dropout_rate')
  if rate is not None:
    if not 0.0 <= float(rate) < 1.0:
      raise TrainingError(f'config.dropout_rate must be in [0, 1), got {rate}')
    cfg = dataclasses.replace(cfg, dropout_rate=float(rate))
  return cfg


def batch_norm_sync(config) -> str:
  """``config.batch_norm_sync``: 'published' or 'all' (``BATCH_NORM_SYNC``)."""
  if 'batch_norm_sync' not in config:
    raise TrainingError('config.batch_norm_sync is missing')
  return _one_of('batch_norm_sync', config['batch_norm_sync'], BATCH_NORM_SYNC)


def recorded_fields(record) -> Dict[str, Any]:
  """A recorded config in today's fields (``ADDED_FIELDS``, ``REPLACED_FIELDS``)."""
  fields = dict(ADDED_FIELDS, **record)
  for old, (new, convert) in REPLACED_FIELDS.items():
    if old in fields:
      fields.setdefault(new, convert(fields.pop(old)))
  return fields


def compute_dtype(config) -> str:
  """``config.compute_dtype`` ('float32' when absent)."""
  return str(config.get('compute_dtype', 'float32'))


def loss_weights(config) -> Dict[str, float]:
  return {n: float(config[n]) for n in LOSS_FIELDS}


def optimizer_key(config) -> Tuple:
  """The optimiser's fields as a hashable tuple of ``(name, value)``."""
  return tuple((n, tuple(int(m) for m in config[n]) if n == 'lr_milestones'
                else float(config[n])) for n in OPTIMIZER_FIELDS)


def config_to_json(config) -> Dict[str, Any]:
  """The config as plain JSON values (tuples become lists)."""
  d = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  return json.loads(json.dumps(d, sort_keys=True, default=str))


def check_batch_size(batch_size: int, device_count: int, process_count: int) -> int:
  """The per-device batch size; a TrainingError unless the batch splits evenly."""
  if batch_size <= 0 or batch_size % device_count or batch_size % process_count:
    raise TrainingError(
        f'config.batch_size {batch_size} is the global batch and must be a positive multiple '
        f'of the number of devices ({device_count}, over {process_count} process(es))')
  return batch_size // device_count
