"""The workdir: its layout, its recorded config, and what a killed run left behind.

Layout (only process 0 writes files other than checkpoints)::

    WORKDIR/train_config.json   the config of the run, recorded once the run has started (the
                                data and config.init were checked); a resumed run must match it
    WORKDIR/checkpoints/<step>/ orbax CheckpointManager: 'state' (TrainState), 'data' (position)
    WORKDIR/tensorboard/        TensorBoard event files (tensorboardX)
    WORKDIR/images/             example predictions, step_<step>.png
    WORKDIR/validation.json     validation scores per evaluated step and the best step
    WORKDIR/validation_data/    held-out synthetic sets (config.eval_data = 'synthetic')
    WORKDIR/model/              the final model (crm_jax.checkpoint.save_model), readable by
                                crm_jax.refine.Refiner.from_checkpoint
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

from crm_jax import checkpoint as model_ckpt
from crm_jax.io import write_text
from crm_jax.training.config import (RESUMABLE_FIELDS, TrainingError, config_to_json,
                                     recorded_fields)

CONFIG_FILE = 'train_config.json'
CHECKPOINT_DIR = 'checkpoints'
TENSORBOARD_DIR = 'tensorboard'
IMAGES_DIR = 'images'
VALIDATION_FILE = 'validation.json'
VALIDATION_DATA_DIR = 'validation_data'
MODEL_DIR = model_ckpt.EXPORT_DIR  # load_model also accepts the workdir itself.
# What an interrupted atomic write leaves (crm_jax.io.atomic_write: '.tmp-*' files;
# crm_jax.checkpoint.save_model: '<name>.tmp-*' folders), in the folders the trainer writes.
_LEFTOVERS = ('.tmp-*', '*.tmp-*')
_WRITTEN_DIRS = ('', IMAGES_DIR, os.path.join(VALIDATION_DATA_DIR, '*'))


def prepare(workdir: str, is_main: bool) -> str:
  """The absolute workdir, created and writable (process 0), cleared of a killed run's
  leftovers; an OS problem is a one-line TrainingError naming the path."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not is_main:
    return workdir
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise TrainingError(f'{workdir}: --workdir is a file, not a folder')
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.tmp-probe-', dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise TrainingError(f'{workdir}: the workdir is not writable ({e.strerror or e})') from None
  remove_leftovers(workdir)
  return workdir


def remove_leftovers(workdir: str) -> list:
  """Removes the temporary files and folders of interrupted writes; returns their paths."""
  removed = []
  for sub in _WRITTEN_DIRS:
    for pattern in _LEFTOVERS:
      for path in glob.glob(os.path.join(workdir, sub, pattern)):
        if path in removed:
          continue
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          os.remove(path)
        removed.append(path)
  return removed


def check_config(workdir: str, config, has_checkpoint: bool) -> None:
  """Raises TrainingError if ``workdir`` holds checkpoints of another config.

  Only ``RESUMABLE_FIELDS`` may differ; a recorded config is read in today's fields
  (``config.recorded_fields``: added fields, replaced ones such as ``sync_batch_norm``). A
  recorded config without a checkpoint (a run that never saved a step) binds nothing: the new
  config replaces it (``record_config``).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not (has_checkpoint and os.path.exists(path)):
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise TrainingError(f'{path}: unreadable ({e}); use another --workdir') from None
  # A run recorded before a field existed ran without it (the same for a config without it), and
  # one recorded before a field was replaced ran with its replacement's equivalent value.
  old, new = recorded_fields(old), recorded_fields(config_to_json(config))
  missing = object()
  diffs = [k for k in sorted(set(old) | set(new))
           if k not in RESUMABLE_FIELDS and old.get(k, missing) != new.get(k, missing)]
  if diffs:
    shown = '; '.join(f'{k}: {old.get(k, "<absent>")!r} -> {new.get(k, "<absent>")!r}'
                      for k in diffs[:6])
    raise TrainingError(
        f'{path}: the workdir holds a run of another config (differing fields: {shown}'
        f'{"; ..." if len(diffs) > 6 else ""}); use the same config or another --workdir')


def record_config(workdir: str, config) -> None:
  """Writes ``train_config.json`` (atomically; process 0 only)."""
  write_text(os.path.join(workdir, CONFIG_FILE),
             json.dumps(config_to_json(config), indent=2, sort_keys=True))
