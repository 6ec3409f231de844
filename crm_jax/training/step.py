"""The train state, the pure train step (under ``jax.pmap(axis_name='batch')``, gradients
averaged with ``pmean``), the on-device non-finite guard, and ``build``. BatchNorm and bfloat16:
docs/training.md."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, NamedTuple, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from crm_jax import losses
from crm_jax import optim
from crm_jax.models.crm import CRM, ModelConfig, init_variables
from crm_jax.ops import make_coord, resize_bilinear_align_corners
from crm_jax.training import config as cfg_lib

AXIS_NAME = 'batch'
# Bits of ``Guard.what``: which part of a step was not finite.
NON_FINITE_PARTS = ((1, 'loss'), (2, 'gradients'), (4, 'parameters'), (8, 'optimiser state'))


@flax.struct.dataclass
class TrainState:
  """Everything training changes; ``step`` (int32): updates applied, also the data position."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self) -> Dict[str, Any]:
    return {'params': self.params, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class Guard:
  """On the devices: ``bad_step`` (-1 or the first non-finite step), ``what`` (NON_FINITE_PARTS)."""

  bad_step: jax.Array
  what: jax.Array

  @staticmethod
  def clear() -> 'Guard':
    return Guard(bad_step=np.full((), -1, np.int32), what=np.zeros((), np.int32))

  def describe(self) -> str:
    """'non-finite loss at step 2 (also gradients)': the step and the parts of ``what``."""
    parts = [name for bit, name in NON_FINITE_PARTS if int(self.what) & bit]
    also = f' (also {", ".join(parts[1:])})' if len(parts) > 1 else ''
    return f'non-finite {parts[0]} at step {int(self.bad_step)}{also}'


def queries(crop_size: int, batch: int) -> Tuple[jax.Array, jax.Array]:
  """Every pixel centre of a ``crop_size`` crop: ``coord`` and ``cell`` ``[batch, S*S, 2]``."""
  coord = make_coord((crop_size, crop_size)).reshape(1, crop_size * crop_size, 2)
  coord = jnp.broadcast_to(coord, (batch,) + coord.shape[1:])
  cell = jnp.full(coord.shape, 2.0 / crop_size, jnp.float32)
  return coord, cell


def decode_every_pixel(model: CRM, variables, feature_map: jax.Array, size: int) -> jax.Array:
  """Logits ``[B, size, size]`` (at least float32) at every pixel centre of a ``size`` crop from F
  ``[B, h, w, C]``, via ``CRM.project`` and ``CRM.decode_grid``."""
  projected = model.apply(variables, feature_map, method=CRM.project)
  projected = projected.astype(jnp.promote_types(projected.dtype, jnp.float32))
  rows = jnp.arange(size, dtype=jnp.int32)
  return jax.vmap(lambda p: model.apply(variables, p, rows, (size, size),
                                        method=CRM.decode_grid))(projected)


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               model: CRM, tx: optax.GradientTransformation, schedule: optax.Schedule,
               weights: Dict[str, float], compute_dtype: str = 'float32',
               axis_name: str = AXIS_NAME) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimiser step on one device's share (under ``jax.pmap``). ``batch``: ``image``
  ``[b, s', s', 3]``, ``seg`` ``[b, s', s', 1]``, ``gt`` ``[b, S, S, 1]`` (``s' < S`` under
  ``pass_scales``). Returns ``(new_state, metrics)``, metrics the same on every device."""
  step_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                                jax.lax.axis_index(axis_name))
  image, seg, gt = batch['image'], batch['seg'], batch['gt']
  b, s = gt.shape[0], gt.shape[1]  # image and seg may be smaller (a pass scale < 1)
  dtype = jnp.dtype(compute_dtype)
  x = jnp.concatenate([image, seg], axis=-1).astype(dtype)

  def loss_fn(params):
    variables = {'params': jax.tree_util.tree_map(lambda p: p.astype(dtype), params),
                 'batch_stats': state.batch_stats}
    feature_map, updates = model.apply(variables, x, True, method=CRM.features,
                                       rngs={'dropout': step_rng}, mutable=['batch_stats'])
    logits = decode_every_pixel(model, variables, feature_map, s).reshape(b, s, s, 1)
    total, parts = losses.crm_loss(logits, gt, **weights)
    return total, (parts, updates['batch_stats'], logits)

  (_, (parts, batch_stats, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  batch_stats = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), batch_stats,
                                       state.batch_stats)
  grads = jax.lax.pmean(grads, axis_name)
  if model.bn_axis_name is None:
    batch_stats = device_zero(batch_stats, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(jax.lax.pmean(parts, axis_name))
  seg_at_gt = resize_bilinear_align_corners(seg, (s, s))
  metrics.update(jax.lax.psum(losses.iou_counts(seg_at_gt, jax.nn.sigmoid(logits), gt),
                              axis_name))
  metrics['lr'] = jnp.asarray(schedule(state.step), jnp.float32)
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['param_norm'] = optax.tree.norm(params)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def device_zero(tree, axis_name: str = AXIS_NAME):
  """Device 0's ``tree`` on every device (``nn.DataParallel`` keeps replica 0's buffers)."""
  return jax.tree_util.tree_map(lambda x: jax.lax.all_gather(x, axis_name)[0], tree)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded_step(state: TrainState, guard: Guard, batch, rng, *, step_fn: Callable,
                 axis_name: str = AXIS_NAME):
  """``step_fn`` behind the guard: the first non-finite step and every later one are not applied
  and ``guard`` records it. Returns ``(state, guard, metrics)``."""
  new_state, metrics = step_fn(state, batch, rng)
  checks = (jnp.isfinite(metrics['total']), jnp.isfinite(metrics['grad_norm']),
            _all_finite((new_state.params, new_state.batch_stats)),
            _all_finite(new_state.opt_state))
  what = sum(jnp.where(ok, 0, bit) for ok, (bit, _) in zip(checks, NON_FINITE_PARTS))
  what = jax.lax.pmax(what.astype(jnp.int32), axis_name)  # the same verdict on every device
  clear = guard.bad_step < 0
  apply = clear & (what == 0)
  state = jax.tree_util.tree_map(lambda new, old: jnp.where(apply, new, old), new_state, state)
  first = clear & (what != 0)
  guard = Guard(bad_step=jnp.where(first, new_state.step - 1, guard.bad_step),
                what=jnp.where(first, what, guard.what))
  return state, guard, metrics


class Trainer(NamedTuple):
  """``p_step(state, guard, batch, rng)``: ``guarded_step`` pmapped; ``init(rng) -> variables``."""

  model: CRM
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  p_step: Callable
  init: Callable


@functools.lru_cache(maxsize=8)
def _build(model_cfg: ModelConfig, batch_norm_sync: str, opt_key: Tuple, weights_key: Tuple,
           compute_dtype: str) -> Trainer:
  """See ``build``; cached so that repeated runs in one process reuse the compilations."""
  model = CRM(model_cfg, bn_axis_name=bn_axis_name(batch_norm_sync))
  tx, schedule = optim.make_optimizer_from_config(dict(opt_key))
  step_fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                              weights=dict(weights_key), compute_dtype=compute_dtype)
  p_step = jax.pmap(functools.partial(guarded_step, step_fn=step_fn), axis_name=AXIS_NAME,
                    in_axes=(0, 0, 0, None), donate_argnums=(0, 1))
  init = jax.jit(functools.partial(init_variables, model))
  return Trainer(model, tx, schedule, p_step, init)


def bn_axis_name(batch_norm_sync: str):
  """The ``CRM.bn_axis_name`` of a ``config.batch_norm_sync`` value."""
  if batch_norm_sync not in cfg_lib.BATCH_NORM_SYNC:
    raise ValueError(f'batch_norm_sync must be one of {cfg_lib.BATCH_NORM_SYNC}, '
                     f'got {batch_norm_sync!r}')
  return AXIS_NAME if batch_norm_sync == 'all' else None


def build(config) -> Trainer:
  """The model, optimiser and pmapped guarded step of a config (see ``Trainer``)."""
  return _build(cfg_lib.model_config(config), cfg_lib.batch_norm_sync(config),
                cfg_lib.optimizer_key(config),
                tuple(sorted(cfg_lib.loss_weights(config).items())),
                cfg_lib.compute_dtype(config))


def create_train_state(config, rng: jax.Array) -> TrainState:
  """A host (unreplicated) TrainState at step 0 with fresh weights."""
  trainer = build(config)
  v = jax.device_get(trainer.init(rng))
  return TrainState(step=np.zeros((), np.int32), params=v['params'], batch_stats=v['batch_stats'],
                    opt_state=jax.device_get(trainer.tx.init(v['params'])))
