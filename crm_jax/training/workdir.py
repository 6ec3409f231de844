"""The workdir (docs/training.md: its layout): its recorded config, a killed run's leftovers."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

from crm_jax import checkpoint as model_ckpt
from crm_jax.outputs import write_text
from crm_jax.training.config import (RESUMABLE_FIELDS, TrainingError, config_to_json,
                                     recorded_fields)

CONFIG_FILE = 'train_config.json'
CHECKPOINT_DIR = 'checkpoints'
TENSORBOARD_DIR = 'tensorboard'
IMAGES_DIR = 'images'
VALIDATION_FILE = 'validation.json'
MODEL_DIR = model_ckpt.EXPORT_DIR  # load_model also accepts the workdir itself.
# What interrupted atomic writes leave ('.tmp-*' files, '<name>.tmp-*' folders).
_LEFTOVERS = ('.tmp-*', '*.tmp-*')
_WRITTEN_DIRS = ('', IMAGES_DIR)


def prepare(workdir: str, is_main: bool) -> str:
  """The absolute workdir, created, writable and cleared of leftovers (process 0); an OS problem
  is a one-line TrainingError naming the path."""
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


def remove_leftovers(workdir: str) -> None:
  """Removes the temporary files and folders of interrupted writes."""
  for sub in _WRITTEN_DIRS:
    for pattern in _LEFTOVERS:
      for path in glob.glob(os.path.join(workdir, sub, pattern)):
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          os.remove(path)


def check_config(workdir: str, config, has_checkpoint: bool) -> None:
  """Raises TrainingError if ``workdir`` holds checkpoints of another config (``RESUMABLE_FIELDS``
  may differ); a recorded config without a checkpoint binds nothing."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not (has_checkpoint and os.path.exists(path)):
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise TrainingError(f'{path}: unreadable ({e}); use another --workdir') from None
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
