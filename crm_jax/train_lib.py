"""CRM training: the pmapped train step and ``train_and_evaluate(config, workdir)``.

The recipe is ``shared/crm_spec.md`` section 7; the data are ``crm_jax.data.pipeline``.

Parallelism. The global batch (``config.batch_size``) is split evenly over every device of every
host: each host loads its own slice (``pipeline``), which is split over its local devices, and
``train_step`` runs under ``jax.pmap(axis_name='batch')``. Gradients are averaged with
``jax.lax.pmean``; BatchNorm statistics are synchronised in the forward pass
(``CRM(bn_axis_name='batch')``) unless ``config.sync_batch_norm`` is False, in which case each
device normalises with its own batch statistics (upstream's effective behaviour) and only the
running averages are averaged after the step, so that every device holds the same state.

Multi-host. ``train_and_evaluate`` calls ``jax.distributed.initialize`` when the environment sets
``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0's coordinator), together with
``JAX_NUM_PROCESSES`` (the number of processes) and ``JAX_PROCESS_ID`` (this process, 0-based);
optionally ``JAX_LOCAL_DEVICE_IDS`` (comma-separated local device ids). On CPU the cross-process
collectives use gloo (``jax_cpu_collectives_implementation``).

Workdir layout (only process 0 writes files other than checkpoints)::

    WORKDIR/train_config.json   the config of the run (a resumed run must match it)
    WORKDIR/checkpoints/<step>/ orbax CheckpointManager: 'state' (TrainState), 'data' (position)
    WORKDIR/tensorboard/        TensorBoard event files (tensorboardX)
    WORKDIR/images/             example predictions, step_<step>.png
    WORKDIR/model/              the final model (crm_jax.checkpoint.save_model), readable by
                                crm_jax.refine.Refiner.from_checkpoint
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Iterable, Optional, Tuple

from flax import jax_utils
import cv2
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from crm_jax import checkpoint as model_ckpt
from crm_jax import losses
from crm_jax import optim
from crm_jax.data import pipeline
from crm_jax.io import write_image, write_text
from crm_jax.models.crm import CRM, RESNET50, SMALL, TINY, ModelConfig, init_variables
from crm_jax.ops import make_coord
from crm_jax.constants import IMAGE_MEAN, IMAGE_STD

AXIS_NAME = 'batch'
MODEL_PRESETS = {'resnet50': RESNET50, 'small': SMALL, 'tiny': TINY}

CONFIG_FILE = 'train_config.json'
CHECKPOINT_DIR = 'checkpoints'
TENSORBOARD_DIR = 'tensorboard'
IMAGES_DIR = 'images'
MODEL_DIR = model_ckpt.EXPORT_DIR  # load_model also accepts the workdir itself.

# Fields that may differ when a run is resumed: they change neither the model nor the data nor
# the optimisation (num_steps may only extend a run; the others are bookkeeping).
RESUMABLE_FIELDS = ('num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints',
                    'image_every', 'num_workers')
NUM_EXAMPLE_IMAGES = 4  # rows of the example-prediction picture.


class TrainingError(RuntimeError):
  """A run that cannot start or go on; the message is one line and says why."""


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


# ---------------------------------------------------------------------------------------------
# Config helpers.


def model_config(config) -> ModelConfig:
  """``config.model``: a preset name ('resnet50', 'small', 'tiny') or a dict of fields.

  ``config.dropout_rate``, where the config has it, replaces the model's dropout rate.
  """
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
  rate = config.get('dropout_rate') if hasattr(config, 'get') else None
  if rate is not None:
    if not 0.0 <= float(rate) < 1.0:
      raise TrainingError(f'config.dropout_rate must be in [0, 1), got {rate}')
    cfg = dataclasses.replace(cfg, dropout_rate=float(rate))
  return cfg


def loss_weights(config) -> Dict[str, float]:
  return {'ce_weight': float(config.ce_weight), 'l1_weight': float(config.l1_weight),
          'l2_weight': float(config.l2_weight), 'grad_weight': float(config.grad_weight)}


def config_to_json(config) -> Dict[str, Any]:
  """The config as plain JSON values (tuples become lists)."""
  d = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  return json.loads(json.dumps(d, sort_keys=True, default=str))


def _optimizer_key(config) -> Tuple:
  names = ('learning_rate', 'weight_decay', 'lr_milestones', 'lr_gamma', 'adam_b1', 'adam_b2',
           'adam_eps')
  return tuple((n, tuple(config[n]) if n == 'lr_milestones' else float(config[n]))
               for n in names)


def check_batch_size(batch_size: int, device_count: int, process_count: int) -> int:
  """The per-device batch size; a TrainingError unless the batch splits evenly."""
  if batch_size <= 0 or batch_size % device_count or batch_size % process_count:
    raise TrainingError(
        f'config.batch_size {batch_size} is the global batch and must be a positive multiple '
        f'of the number of devices ({device_count}, over {process_count} process(es))')
  return batch_size // device_count


# ---------------------------------------------------------------------------------------------
# The train step.


def queries(crop_size: int, batch: int) -> Tuple[jax.Array, jax.Array]:
  """Every pixel centre of a ``crop_size`` crop: ``coord`` and ``cell`` ``[batch, S*S, 2]``."""
  coord = make_coord((crop_size, crop_size)).reshape(1, crop_size * crop_size, 2)
  coord = jnp.broadcast_to(coord, (batch,) + coord.shape[1:])
  cell = jnp.full(coord.shape, 2.0 / crop_size, jnp.float32)
  return coord, cell


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               model: CRM, tx: optax.GradientTransformation, schedule: optax.Schedule,
               weights: Dict[str, float], sync_batch_norm: bool = True,
               axis_name: str = AXIS_NAME) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimiser step on one device's share of the batch (run under ``jax.pmap``).

  Args:
    state: the replicated TrainState (this device's copy).
    batch: ``image`` ``[b, S, S, 3]``, ``seg`` ``[b, S, S, 1]``, ``gt`` ``[b, S, S, 1]``.
    rng: the run's dropout key, the same on every device; it is folded with the step and with
      the device's index on ``axis_name``.
    model: ``CRM`` (with ``bn_axis_name=axis_name`` for synchronised BatchNorm).
    tx, schedule: ``optim.make_optimizer_from_config``.
    weights: ``crm_loss`` weights.
    sync_batch_norm: False: the running BN averages are averaged over devices after the step.

  Returns:
    ``(new_state, metrics)``: metrics are identical on every device: the loss parts (``total``,
    ``ce``, ``l1``, ``l2``, ``grad``; means over the global batch), the IoU counts summed over
    the global batch, ``lr`` (the rate of this update), ``grad_norm``, ``param_norm``.
  """
  step_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                                jax.lax.axis_index(axis_name))
  image, seg, gt = batch['image'], batch['seg'], batch['gt']
  b, s = image.shape[0], image.shape[1]
  x = jnp.concatenate([image, seg], axis=-1)
  coord, cell = queries(s, b)

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                  x, coord, cell, train=True, rngs={'dropout': step_rng},
                                  mutable=['batch_stats'])
    logits = logits.reshape(b, s, s, 1)
    total, parts = losses.crm_loss(logits, gt, **weights)
    return total, (parts, updates['batch_stats'], logits)

  (_, (parts, batch_stats, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis_name)
  if not sync_batch_norm:
    batch_stats = jax.lax.pmean(batch_stats, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(jax.lax.pmean(parts, axis_name))
  metrics.update(jax.lax.psum(losses.iou_counts(seg, jax.nn.sigmoid(logits), gt), axis_name))
  metrics['lr'] = jnp.asarray(schedule(state.step), jnp.float32)
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['param_norm'] = optax.global_norm(params)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


@functools.lru_cache(maxsize=8)
def _build(model_cfg: ModelConfig, sync_batch_norm: bool, opt_key: Tuple,
           weights_key: Tuple):
  """See ``build``; cached so that repeated runs in one process reuse the compilations."""
  model = CRM(model_cfg, bn_axis_name=AXIS_NAME if sync_batch_norm else None)
  tx, schedule = optim.make_optimizer_from_config(dict(opt_key))
  step_fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                              weights=dict(weights_key), sync_batch_norm=sync_batch_norm)
  # No donation: the state before a step is kept so that a non-finite step can be undone.
  p_step = jax.pmap(step_fn, axis_name=AXIS_NAME, in_axes=(0, 0, None))
  init = jax.jit(functools.partial(init_variables, model))
  return model, tx, schedule, p_step, init


def build(config):
  """``(model, tx, schedule, p_train_step, init)`` for a config (``init(rng)``: variables)."""
  return _build(model_config(config), bool(config.sync_batch_norm), _optimizer_key(config),
                tuple(sorted(loss_weights(config).items())))


def create_train_state(config, rng: jax.Array, variables=None) -> TrainState:
  """A host (unreplicated) TrainState at step 0: fresh weights, or ``variables``."""
  _, tx, _, _, init = build(config)
  if variables is None:
    variables = init(rng)
  variables = jax.device_get(variables)
  params, batch_stats = variables['params'], variables['batch_stats']
  return TrainState(step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
                    opt_state=jax.device_get(tx.init(params)))


def replicate(tree, devices=None):
  """A copy of ``tree`` on every local device, stacked on a new leading axis (for pmap).

  The sharding's axis is named as pmap names its outputs, so that the first step and the
  following ones share one compilation.
  """
  return jax_utils.replicate(tree, devices, axis_name=AXIS_NAME)


def unreplicate(tree):
  """The first local device's copy, as numpy."""
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x[0])), tree)


def shard(batch: Dict[str, np.ndarray], num_devices: int) -> Dict[str, np.ndarray]:
  """``[b, ...] -> [num_devices, b // num_devices, ...]``."""
  return {k: v.reshape((num_devices, v.shape[0] // num_devices) + v.shape[1:])
          for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Multi-host initialisation.

_DISTRIBUTED = {'initialized': False}


def maybe_initialize_distributed() -> bool:
  """``jax.distributed.initialize`` from the environment (see the module docstring).

  Returns whether a multi-process run was set up (now or before). Must run before anything
  touches a JAX backend.
  """
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not address:
    return False
  if _DISTRIBUTED['initialized']:
    return True
  try:
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
    process_id = int(os.environ['JAX_PROCESS_ID'])
  except (KeyError, ValueError):
    raise TrainingError('JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and '
                        'JAX_PROCESS_ID must be set to integers too') from None
  local = os.environ.get('JAX_LOCAL_DEVICE_IDS')
  local_ids = [int(i) for i in local.split(',')] if local else None
  # CPU collectives across processes (no effect on GPU/TPU collectives).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_ids)
  _DISTRIBUTED['initialized'] = True
  return True


# ---------------------------------------------------------------------------------------------
# Workdir: config, checkpoints, logs.


def check_workdir_config(workdir: str, config) -> None:
  """Raises TrainingError if ``workdir`` holds a run of another config; else records it.

  Only ``RESUMABLE_FIELDS`` may differ. Process 0 writes ``train_config.json``.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  new = config_to_json(config)
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise TrainingError(f'{path}: unreadable ({e}); use another --workdir') from None
    missing = object()
    diffs = [k for k in sorted(set(old) | set(new))
             if k not in RESUMABLE_FIELDS and old.get(k, missing) != new.get(k, missing)]
    if diffs:
      shown = '; '.join(f'{k}: {old.get(k, "<absent>")!r} -> {new.get(k, "<absent>")!r}'
                        for k in diffs[:6])
      raise TrainingError(
          f'{path}: the workdir holds a run of another config (differing fields: {shown}'
          f'{"; ..." if len(diffs) > 6 else ""}); use the same config or another --workdir')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    write_text(path, json.dumps(new, indent=2, sort_keys=True))


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True),
      item_names=('state', 'data'))


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, config) -> None:
  """Saves a host TrainState and the data position (the step) at ``state.step``."""
  step = int(state.step)
  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({'next_step': step, 'seed': int(config.seed),
                              'batch_size': int(config.batch_size)})))
  manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, target: TrainState) -> TrainState:
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  state = restored['state']
  if int(state.step) != step or int(restored['data']['next_step']) != step:
    raise TrainingError(f'{manager.directory}/{step}: inconsistent checkpoint (holds step '
                        f'{int(state.step)}, data position {restored["data"]["next_step"]})')
  return jax.tree_util.tree_map(np.asarray, state)


def load_init(config, target: TrainState) -> TrainState:
  """The state at step 0 with the params and batch_stats of the checkpoint ``config.init``."""
  path = os.path.expanduser(str(config.init))
  init_cfg, variables = model_ckpt.load_model(path)
  want = model_config(config)
  # Training-only fields (the dropout rate) are the config's, whatever the checkpoint says.
  if init_cfg.architecture() != want.architecture():
    raise TrainingError(f'{path}: config.init holds another architecture ({init_cfg}) than '
                        f'config.model ({want})')
  _, tx, _, _, _ = build(config)
  params = jax.tree_util.tree_map(np.asarray, variables['params'])
  return target.replace(params=params, batch_stats=jax.tree_util.tree_map(
      np.asarray, variables['batch_stats']), opt_state=jax.device_get(tx.init(params)))


class _Preemption:
  """SIGTERM -> stop at the next step boundary (single process: a signal flag; several
  processes: JAX's preemption sync point, so every process stops at the same step)."""

  def __init__(self, multi_process: bool):
    self.multi_process = multi_process
    self.flag = False
    self._previous = None
    if not multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if self.multi_process:
      try:
        from jax.experimental import multihost_utils
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # no preemption service in this JAX setup.
        return False
    return self.flag

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class _Logger:
  """Console lines, tqdm and TensorBoard on process 0; silent elsewhere."""

  def __init__(self, workdir: str, config, start: int, total: int, enabled: bool):
    self.enabled = enabled
    self.writer = None
    self.bar = None
    if not enabled:
      return
    from tqdm import tqdm
    import tensorboardX
    self.writer = tensorboardX.SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR))
    self.bar = tqdm(total=total, initial=start, desc='train', unit='step', dynamic_ncols=True,
                    file=sys.stderr, mininterval=1.0)

  def line(self, text: str) -> None:
    if self.enabled:
      if self.bar is not None:
        self.bar.write(text, file=sys.stdout)
      else:
        print(text, flush=True)

  def advance(self) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def scalars(self, step: int, values: Dict[str, float]) -> None:
    if self.writer is not None:
      for k, v in values.items():
        self.writer.add_scalar(k, v, step)
      self.writer.flush()

  def image(self, step: int, tag: str, picture: np.ndarray) -> None:
    """An RGB uint8 ``[H, W, 3]`` picture as a TensorBoard image (PNG-encoded by OpenCV)."""
    if self.writer is not None:
      from tensorboardX.proto.summary_pb2 import Summary
      ok, png = cv2.imencode('.png', np.ascontiguousarray(picture[:, :, ::-1]))
      if not ok:
        return
      image = Summary.Image(height=picture.shape[0], width=picture.shape[1], colorspace=3,
                            encoded_image_string=png.tobytes())
      self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]),
                                          step)
      self.writer.flush()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()


def summarize(window: Iterable[Dict[str, np.ndarray]]) -> Dict[str, float]:
  """Means of the loss parts, IoUs from the summed counts, last lr, over logged steps."""
  window = list(window)
  out = {}
  for k in ('total', 'ce', 'l1', 'l2', 'grad', 'grad_norm', 'param_norm'):
    out[k] = float(np.mean([m[k] for m in window]))
  counts = {k: np.sum([m[k] for m in window]) for k in
            ('seg_intersection', 'seg_union', 'pred_intersection', 'pred_union')}
  out.update({k: float(v) for k, v in losses.iou_from_counts(counts).items()})
  out['lr'] = float(window[-1]['lr'])
  return out


@functools.lru_cache(maxsize=4)
def _predict_fn(model_cfg: ModelConfig):
  model = CRM(model_cfg)

  @jax.jit
  def predict(variables, image, seg):
    b, s = image.shape[0], image.shape[1]
    coord, cell = queries(s, b)
    logits = model.apply(variables, jnp.concatenate([image, seg], -1), coord, cell)
    return jax.nn.sigmoid(logits.reshape(b, s, s, 1))

  return predict


def example_picture(config, state: TrainState, batch: Dict[str, np.ndarray]) -> np.ndarray:
  """Rows of [image | coarse seg | prediction (eval mode) | gt], RGB uint8 ``[n*S, 4*S, 3]``."""
  n = min(NUM_EXAMPLE_IMAGES, batch['image'].shape[0])
  image, seg, gt = batch['image'][:n], batch['seg'][:n], batch['gt'][:n]
  prob = np.asarray(_predict_fn(model_config(config))(state.variables(), image, seg))
  rgb = image * np.asarray(IMAGE_STD, np.float32) + np.asarray(IMAGE_MEAN, np.float32)
  grey = lambda m: np.repeat(np.clip(m, 0, 1), 3, axis=-1)
  panels = [np.clip(rgb, 0, 1), grey((seg + 1) / 2), grey(prob), grey(gt)]
  rows = np.concatenate(panels, axis=2)  # [n, S, 4S, 3]
  return (rows.reshape(-1, rows.shape[2], 3) * 255 + 0.5).astype(np.uint8)


def _finite(metrics: Dict[str, np.ndarray]) -> bool:
  return bool(np.isfinite(metrics['total']) and np.isfinite(metrics['grad_norm']))


# ---------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Trains CRM as ``config`` says, in ``workdir``; returns the final host TrainState.

  Resume order: the latest checkpoint in ``workdir``; else ``config.init`` (a crm_jax model
  checkpoint) for params and batch_stats; else a fresh initialisation from ``config.seed``.

  Every ``log_every`` steps a console line (loss parts, lr, IoU of the input seg and of the
  prediction, steps/s) and TensorBoard scalars; every ``image_every`` steps an example picture;
  every ``checkpoint_every`` steps, at the end and on SIGTERM a checkpoint (keeping the last
  ``keep_checkpoints``). At the end the model is exported to ``WORKDIR/model``.

  Raises:
    TrainingError: a batch size that does not split over the devices, a workdir holding
      another config, a bad ``config.init``, or a non-finite loss (the message names the step;
      the last good state is saved first).
    pipeline.DatasetError: a missing or unprepared dataset.
  """
  multi_process = maybe_initialize_distributed()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  n_local = jax.local_device_count()
  per_device = check_batch_size(int(config.batch_size), jax.device_count(),
                                jax.process_count())
  num_steps = int(config.num_steps)
  is_main = jax.process_index() == 0
  check_workdir_config(workdir, config)
  source = pipeline.make_source(config)  # fails early and clearly on a missing dataset

  model_cfg = model_config(config)
  _, _, _, p_train_step, _ = build(config)
  root = jax.random.PRNGKey(int(config.seed))
  init_rng, dropout_rng = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)

  # Resume order: workdir checkpoint, then config.init, then scratch.
  state = create_train_state(config, init_rng)
  manager = checkpoint_manager(workdir, config.keep_checkpoints)
  if manager.latest_step() is not None:
    state = restore_checkpoint(manager, state)
    origin = f'resumed from {manager.directory}/{int(state.step)}'
  elif config.init:
    state = load_init(config, state)
    origin = f'initialised from {config.init}'
  else:
    origin = f'fresh initialisation (seed {config.seed})'
  start = int(state.step)

  logger = _Logger(workdir, config, start, num_steps, is_main)
  logger.line(f'{workdir}: {origin}; steps {start} -> {num_steps}, global batch '
              f'{config.batch_size} = {jax.device_count()} device(s) x {per_device}, '
              f'{jax.process_count()} process(es)')
  preemption = _Preemption(multi_process)
  r_state = replicate(state)
  loader = pipeline.TrainLoader(config, start, source=source)
  window = []
  t_window = time.time()
  step = start
  try:
    for step, batch in loader:
      new_r_state, r_metrics = p_train_step(r_state, shard(batch, n_local), dropout_rng)
      metrics = unreplicate(r_metrics)
      if not _finite(metrics):
        state = unreplicate(r_state)
        save_checkpoint(manager, state, config)
        raise TrainingError(
            f'non-finite loss at step {step} (loss {metrics["total"]}, gradient norm '
            f'{metrics["grad_norm"]}); the last good state (step {step}) is saved in '
            f'{manager.directory}; lower config.learning_rate or check the data')
      r_state = new_r_state
      done = step + 1
      logger.advance()
      window.append(metrics)
      if done % int(config.log_every) == 0 or done == num_steps:
        s = summarize(window)
        rate = len(window) / max(time.time() - t_window, 1e-9)
        logger.line(
            f'step {done}/{num_steps}: loss {s["total"]:.4f} (ce {s["ce"]:.4f} l1 {s["l1"]:.4f}'
            f' l2 {s["l2"]:.4f} grad {s["grad"]:.4f}) lr {s["lr"]:.3g} IoU seg '
            f'{s["seg_iou"]:.4f} pred {s["pred_iou"]:.4f} | {rate:.2f} steps/s')
        logger.scalars(done, {f'train/{k}': v for k, v in s.items()}
                       | {'train/steps_per_s': rate})
        window, t_window = [], time.time()
      if is_main and int(config.image_every) > 0 and done % int(config.image_every) == 0:
        picture = example_picture(config, unreplicate(r_state), batch)
        logger.image(done, 'examples/image_seg_pred_gt', picture)
        write_image(os.path.join(workdir, IMAGES_DIR, f'step_{done:07d}.png'), picture)
      if done % int(config.checkpoint_every) == 0 and done < num_steps:
        save_checkpoint(manager, unreplicate(r_state), config)
      if preemption.reached(done) and done < num_steps:
        state = unreplicate(r_state)
        save_checkpoint(manager, state, config)
        logger.line(f'SIGTERM: stopped after step {done}; checkpoint saved in '
                    f'{manager.directory}; run again with the same --workdir to resume')
        return state
    state = unreplicate(r_state)
    save_checkpoint(manager, state, config)
    if is_main:
      model_ckpt.save_model(os.path.join(workdir, MODEL_DIR), state.variables(), model_cfg,
                            meta={'step': int(state.step), 'train_config': config_to_json(config)},
                            overwrite=True)
      logger.line(f'done: {int(state.step)} steps; model exported to '
                  f'{os.path.join(workdir, MODEL_DIR)}')
    if multi_process:  # nobody leaves before the export is complete.
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('crm_jax.train_lib: exported')
    return state
  finally:
    loader.close()
    preemption.close()
    logger.close()
    manager.wait_until_finished()
    manager.close()
