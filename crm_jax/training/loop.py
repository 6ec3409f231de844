"""``train_and_evaluate(config, workdir)``: restore -> (step, log, validate, checkpoint) x N ->
export. The host looks at the devices only at log, picture, validation, checkpoint, last or stop
steps, so dispatch runs ahead of the devices in between."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import jax

from crm_jax import checkpoint as model_ckpt
from crm_jax.data import pipeline
from crm_jax.distributed import barrier, maybe_initialize_distributed
from crm_jax.folder_lock import FolderLock
from crm_jax.outputs import write_image
from crm_jax.training import config as cfg_lib
from crm_jax.training import devices
from crm_jax.training import logger as log_lib
from crm_jax.training import resume
from crm_jax.training import validation
from crm_jax.training import workdir as wd
from crm_jax.training.preemption import Preempted, Preemption
from crm_jax.training.step import Guard, TrainState, build, create_train_state


def _every(config, name: str, done: int) -> bool:
  every = int(config.get(name) or 0)
  return every > 0 and done % every == 0


def _initial_state(config, manager, init_rng):
  """Resume order: the workdir's latest checkpoint, then ``config.init``, then scratch."""
  state = create_train_state(config, init_rng)
  if manager.latest_step() is not None:
    state, notes = resume.restore_checkpoint(manager, state)
    return state, '; '.join(notes + [f'resumed from {manager.directory}/{int(state.step)}'])
  if config.init:
    return resume.load_init(config, state), f'initialised from {config.init}'
  return state, f'fresh initialisation (seed {config.seed})'


def _stop_if_non_finite(guard, r_state, manager, config) -> None:
  """Saves the last good state and raises TrainingError once the guard holds a bad step."""
  guard = devices.unreplicate(guard)
  bad = int(guard.bad_step)
  if bad < 0:
    return
  resume.save_checkpoint(manager, devices.unreplicate(r_state), config)
  raise cfg_lib.TrainingError(
      f'{guard.describe()}; the last good state (step {bad}) is saved in '
      f'{manager.directory}; lower config.learning_rate or check the data (a changed config '
      f'needs a new --workdir unless the run stopped at step 0)')


def _export(workdir: str, state: TrainState, config, logger) -> None:
  path = os.path.join(workdir, wd.MODEL_DIR)
  model_ckpt.save_model(path, state.variables(), cfg_lib.model_config(config), overwrite=True,
                        meta={'step': int(state.step),
                              'train_config': cfg_lib.config_to_json(config),
                              'refine': {'min_side': cfg_lib.refine_min_side(config)}})
  logger.line(f'done: {int(state.step)} steps; model exported to {path}')


@dataclasses.dataclass
class Run:
  """A started run: what the loop needs, made by ``start_run``; ``close()`` releases it."""

  config: Any
  workdir: str
  is_main: bool
  num_steps: int
  trainer: Any  # step.Trainer
  manager: Any  # orbax CheckpointManager
  state: TrainState  # host state to start from
  dropout_rng: Any
  validator: Optional[validation.Validator] = None
  logger: Optional[log_lib.Logger] = None
  preemption: Optional[Preemption] = None
  loader: Optional[pipeline.TrainLoader] = None
  lock: Optional[FolderLock] = None  # process 0's: one run per workdir

  def close(self) -> None:
    try:
      for part in (self.loader, self.preemption, self.logger):
        if part is not None:
          part.close()
      self.manager.wait_until_finished()
      self.manager.close()
    finally:
      if self.lock is not None:
        self.lock.release()


def _lock_workdir(workdir: str) -> Optional[FolderLock]:
  """The workdir's lock, or None when the folder cannot be made (``wd.prepare`` says why)."""
  path = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  return FolderLock(path, 'workdir').acquire() if os.access(path, os.W_OK) else None


def start_run(config, workdir: str) -> Run:
  """Checks config, devices, workdir, dataset, checkpoint or init and validation set before any
  step, restores the state, then records the config."""
  cfg_lib.check_config(config)
  multi_process = maybe_initialize_distributed()
  is_main = jax.process_index() == 0
  per_device = cfg_lib.check_batch_size(int(config.batch_size), jax.device_count(),
                                        jax.process_count())
  lock, run = _lock_workdir(workdir) if is_main else None, None
  try:
    workdir = wd.prepare(workdir, is_main)
    source = pipeline.make_source(config)  # fails early and clearly on a missing dataset
    manager = resume.checkpoint_manager(workdir, config.keep_checkpoints)
    root = jax.random.PRNGKey(int(config.seed))
    init_rng, dropout_rng = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    run = Run(config, workdir, is_main, int(config.num_steps), build(config), manager, None,
              dropout_rng, lock=lock)
    if manager.latest_step() == 0:  # a run that never stepped binds nothing: start afresh
      manager.delete(0)
    wd.check_config(workdir, config, manager.latest_step() is not None)
    run.state, origin = _initial_state(config, manager, init_rng)
    run.validator = validation.make_validator(config, workdir, cfg_lib.model_config(config),
                                              is_main)
    if is_main:
      wd.record_config(workdir, config)
    start = int(run.state.step)
    run.logger = log_lib.Logger(workdir, start, run.num_steps, is_main)
    run.logger.line(f'{workdir}: {origin}; steps {start} -> {run.num_steps}, global batch '
                    f'{config.batch_size} = {jax.device_count()} device(s) x {per_device}, '
                    f'{jax.process_count()} process(es)')
    run.preemption = Preemption(multi_process)
    run.loader = pipeline.TrainLoader(config, start, source=source)
    return run
  except BaseException:
    if run is not None:
      run.close()
    elif lock is not None:
      lock.release()
    raise


def _log(run: Run, done: int, window, seconds: float) -> None:
  s = log_lib.summarize(log_lib.fetch_window(window))
  rate = len(window) / max(seconds, 1e-9)
  run.logger.line(log_lib.format_train_line(done, run.num_steps, s, rate))
  run.logger.scalars(done, {f'train/{k}': v for k, v in s.items()} | {'train/steps_per_s': rate})


def _picture(run: Run, done: int, state: TrainState, batch) -> None:
  image = log_lib.example_picture(cfg_lib.model_config(run.config), state.variables(), batch)
  run.logger.image(done, 'examples/image_seg_pred_gt', image)
  write_image(os.path.join(run.workdir, wd.IMAGES_DIR, f'step_{done:07d}.png'), image)


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Trains CRM as ``config`` says in ``workdir`` (docs/training.md); returns the final host
  TrainState. Raises TrainingError (one line), pipeline.DatasetError, Preempted (a signal, after a
  checkpoint) or crm_jax.io.InputError (another run holds the workdir)."""
  run = start_run(config, workdir)
  try:
    r_state, guard = devices.replicate(run.state), devices.replicate(Guard.clear())
    window, t_window = [], time.time()
    for step, batch, device_batch in devices.prefetch(run.loader):
      r_state, guard, metrics = run.trainer.p_step(r_state, guard, device_batch,
                                                   run.dropout_rng)
      window.append(metrics)
      done = step + 1
      last = done == run.num_steps
      run.logger.advance()
      stop = run.preemption.reached(done) and done < run.num_steps
      checkpoint = _every(config, 'checkpoint_every', done) or last
      picture = run.is_main and _every(config, 'image_every', done)
      validate = run.validator is not None and (_every(config, 'eval_every', done) or last)
      log = _every(config, 'log_every', done) or last
      if not (stop or checkpoint or picture or validate or log):
        continue  # no look at the devices: the next step is dispatched at once.
      _stop_if_non_finite(guard, r_state, run.manager, config)
      if log:
        _log(run, done, window, time.time() - t_window)
        window, t_window = [], time.time()
      state = devices.unreplicate(r_state) if (picture or validate or checkpoint or stop) else None
      if picture:
        _picture(run, done, state, batch)
      if validate:
        scores = run.validator(state.variables(), done)
        run.logger.line(run.validator.line(done, scores))
        run.logger.scalars(done, scores)
        t_window = time.time()  # steps/s counts training only
      if checkpoint or stop:
        resume.save_checkpoint(run.manager, state, config)
      if stop:
        message = (f'{run.preemption.name}: stopped after step {done}; checkpoint saved in '
                   f'{run.manager.directory}; run again with the same --workdir to resume')
        run.logger.line(message)
        raise Preempted(message, state, run.preemption.name)
    state = devices.unreplicate(r_state)  # also when the run had nothing left to do
    resume.save_checkpoint(run.manager, state, config)
    if run.is_main:
      _export(run.workdir, state, config, run.logger)
    barrier('crm_jax.training: exported')  # nobody leaves before the export is complete.
    return state
  finally:
    run.close()
