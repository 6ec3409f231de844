"""The train state, the pure train step, the on-device non-finite guard, and ``build``.

Parallelism. The global batch (``config.batch_size``) is split evenly over every device of every
host: each host loads its own slice (``crm_jax.data.pipeline``), which is split over its local
devices, and the step runs under ``jax.pmap(axis_name='batch')``. Gradients are averaged with
``jax.lax.pmean``. BatchNorm (``crm_jax.models.encoder.BatchNorm``: PyTorch's rule, biased
variance to normalise, unbiased to update the running variance) follows
``config.batch_norm_sync`` (docs/training.md, "BatchNorm"):

- ``'published'``: every BatchNorm normalises with its own device's batch statistics, and the
  running statistics that survive the step are device 0's, as under the published
  ``nn.DataParallel`` (replica 0's buffers are the module's own; the others' are discarded).
- ``'all'``: every BatchNorm synchronises its statistics over all devices in the forward pass
  (``CRM(bn_axis_name='batch')``); the running statistics are then the same on every device.

Either way every device holds the same state after the step.

Mixed precision. ``config.compute_dtype='bfloat16'`` casts the parameters and the input to
bfloat16 inside the loss function, so the encoder and the fusion compute in bfloat16 while the
parameters, the BatchNorm statistics, the optimiser state, the gradients and the loss stay float32;
the implicit decoder runs in float32 (with the bfloat16-rounded weights).
"""

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
  """Everything that training changes, as one pytree.

  ``step``: int32 scalar, the number of updates applied (the data position: the next batch is
  that of global step ``step``). ``params`` / ``batch_stats``: the CRM variables.
  ``opt_state``: the optax state of ``optim.make_optimizer_from_config``.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self) -> Dict[str, Any]:
    return {'params': self.params, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class Guard:
  """The non-finite guard, kept on the devices: ``bad_step`` int32 (-1: every step so far was
  finite; else the first step that was not), ``what`` int32 bits of ``NON_FINITE_PARTS``."""

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
  """Logits ``[B, size, size]`` (float32; float64 for a float64 F) at every pixel centre of a
  ``size`` crop (cell 2/size), from F ``[B, h, w, C]``.

  The same function as ``model(x, *queries(size, B))``, computed as the bucketed refinement
  does (``CRM.project`` then ``CRM.decode_grid``): the first decoder layer is applied to F
  before the nearest-feature look-up, so the look-up (and its gradient) moves 32 values per
  query instead of 262. The decoder runs in float32 (or in F's dtype where that is wider).
  """
  projected = model.apply(variables, feature_map, method=CRM.project)
  projected = projected.astype(jnp.promote_types(projected.dtype, jnp.float32))
  rows = jnp.arange(size, dtype=jnp.int32)
  return jax.vmap(lambda p: model.apply(variables, p, rows, (size, size),
                                        method=CRM.decode_grid))(projected)


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               model: CRM, tx: optax.GradientTransformation, schedule: optax.Schedule,
               weights: Dict[str, float], compute_dtype: str = 'float32',
               axis_name: str = AXIS_NAME) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimiser step on one device's share of the batch (run under ``jax.pmap``).

  Args:
    state: the replicated TrainState (this device's copy).
    batch: ``image`` ``[b, s', s', 3]``, ``seg`` ``[b, s', s', 1]``, ``gt`` ``[b, S, S, 1]``
      (NHWC); ``s' = S`` except under ``pass_scales`` (the encoder then reads the smaller
      input and every pixel of the S x S grid is queried, as in a pass of the loop).
    rng: the run's dropout key, the same on every device; it is folded with the step and with
      the device's index on ``axis_name``.
    model: ``CRM``: with ``bn_axis_name=axis_name`` every BatchNorm is synchronised over the
      devices (``batch_norm_sync='all'``); with None each device normalises with its own
      statistics and device 0's running statistics are kept (``'published'``).
    tx, schedule: ``optim.make_optimizer_from_config``.
    weights: ``crm_loss`` weights.
    compute_dtype: 'float32' or 'bfloat16' (see the module docstring); 'float64' where JAX
      runs with x64 enabled (the parity tests).

  Returns:
    ``(new_state, metrics)``: metrics are identical on every device: the loss parts (``total``,
    ``ce``, ``l1``, ``l2``, ``grad``; means over the global batch), the IoU counts summed over
    the global batch, ``lr`` (the rate of this update), ``grad_norm``, ``param_norm``.
  """
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
  """Device 0's values of ``tree`` on every device of ``axis_name`` (exact: a copy).

  Per-device BatchNorm (``batch_norm_sync='published'``): under ``nn.DataParallel`` the
  replica on the first device holds the module's own buffers, so its in-place running-statistic
  updates are the ones that survive the step; every other replica's are discarded.
  """
  return jax.tree_util.tree_map(lambda x: jax.lax.all_gather(x, axis_name)[0], tree)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded_step(state: TrainState, guard: Guard, batch, rng, *, step_fn: Callable,
                 axis_name: str = AXIS_NAME):
  """``step_fn`` (a bound ``train_step``) behind the non-finite guard, all on the devices.

  A step whose loss, gradients (their norm), updated parameters / BatchNorm statistics or
  optimiser state hold a NaN or an infinity is not applied: the state stays as it was and
  ``guard`` records the step and what was bad. Once the guard is set no later step is applied,
  so the state the host finds at its next look is the last good one (finite by construction).

  Returns ``(state, guard, metrics)``.
  """
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
  """What ``build(config)`` gives.

  ``model``: the CRM module (BatchNorm synchronised over ``AXIS_NAME`` when
  ``config.batch_norm_sync`` is 'all', per device when it is 'published').
  ``tx`` / ``schedule``: the optimiser and its learning rate per step.
  ``p_step(state, guard, batch, rng) -> (state, guard, metrics)``: ``guarded_step`` pmapped,
  the state and guard donated. ``init(rng) -> variables``: fresh CRM variables.
  """

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


def create_train_state(config, rng: jax.Array, variables=None) -> TrainState:
  """A host (unreplicated) TrainState at step 0: fresh weights, or ``variables``."""
  trainer = build(config)
  if variables is None:
    variables = trainer.init(rng)
  variables = jax.device_get(variables)
  params, batch_stats = variables['params'], variables['batch_stats']
  return TrainState(step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
                    opt_state=jax.device_get(trainer.tx.init(params)))
