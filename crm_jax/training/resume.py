"""Where a training run starts from: the workdir's orbax checkpoints (the TrainState and the data
position), or the weights of ``config.init`` (docs/training.md)."""

from __future__ import annotations

import os
from typing import List, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from crm_jax import checkpoint as model_ckpt
from crm_jax.training import workdir as wd
from crm_jax.training.config import TrainingError, model_config
from crm_jax.training.step import TrainState, build


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Keeps the last ``keep`` checkpoints; temporary folders of a killed save are removed."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), wd.CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True,
                                           cleanup_tmp_directories=True),
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


def _restore_step(manager: ocp.CheckpointManager, step: int, target: TrainState) -> TrainState:
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  state = restored['state']
  if int(state.step) != step or int(restored['data']['next_step']) != step:
    raise ValueError(f'inconsistent: holds step {int(state.step)}, data position '
                     f'{restored["data"]["next_step"]}')
  return jax.tree_util.tree_map(np.asarray, state)


def restore_checkpoint(manager: ocp.CheckpointManager,
                       target: TrainState) -> Tuple[TrainState, List[str]]:
  """The newest intact checkpoint, and one note per damaged newer one (removed, or training
  would never save at its step again); TrainingError when none is intact."""
  notes = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return _restore_step(manager, step, target), notes
    except Exception as e:  # orbax, tensorstore and json raise many types for a damaged step
      notes.append(f'{manager.directory}/{step}: damaged checkpoint ({_one_line(e)}); removed')
      manager.delete(step)
  raise TrainingError(f'{manager.directory}: no intact checkpoint to resume from ('
                      + '; '.join(notes) + '); use a new --workdir')


def _one_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  text = lines[0] if lines else type(e).__name__
  return text if len(text) <= 160 else text[:157] + '...'


def load_init(config, target: TrainState) -> TrainState:
  """The state at step 0 with the params and batch_stats of the checkpoint ``config.init``."""
  path = os.path.expanduser(str(config.init))
  init_cfg, variables = model_ckpt.load_model(path)
  want = model_config(config)
  # Training-only fields (the dropout rate) are the config's, whatever the checkpoint says.
  if init_cfg.architecture() != want.architecture():
    raise TrainingError(f'{path}: config.init holds another architecture ({init_cfg}) than '
                        f'config.model ({want})')
  params = jax.tree_util.tree_map(np.asarray, variables['params'])
  batch_stats = jax.tree_util.tree_map(np.asarray, variables['batch_stats'])
  opt_state = jax.device_get(build(config).tx.init(params))
  return target.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
