"""Validation during training: the multi-scale loop on every validation object, scored.

``config.eval_data`` names the validation set:

- a BIG-layout folder (``<name>_im.jpg|png``, ``<name>_seg.png``, ``<name>_gt.png``);
- ``'tfds:NAME'`` or ``'tfds:NAME:SPLIT'``: a prepared TFDS set with seg/gt features
  (``crm_big``) in ``config.data_dir``;
- ``'synthetic'``: a held-out synthetic set (``crm_jax.data.synthetic`` pairs drawn from a seed
  sequence that training never uses, coarse masks from a low-resolution segmenter), written
  once into ``WORKDIR/validation_data/synthetic_<num>x<size>px_seed<seed>``.

Every ``config.eval_every`` steps the current weights refine every object at
``config.eval_scales`` through ``crm_jax.evaluation.evaluate``, the code ``evaluate.py`` runs;
IoU and mBA at each scale go to TensorBoard (``val/iou_<s>``, ``val/mba_<s>``) and the console,
and ``WORKDIR/validation.json`` records every evaluated step and the best one (the highest
``config.eval_best_metric`` at the finest scale).

Several devices or hosts: process 0 validates alone, on its first device (a multi-device,
multi-host evaluator is future work); the other processes wait for it at their next step.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional, Tuple

import numpy as np

from crm_jax import evaluation
from crm_jax.dispatch import local_refiners
from crm_jax.constants import SCALES
from crm_jax.data.synthesis import lowres_segmenter_mask
from crm_jax.data.synthetic import make_synthetic_pair
from crm_jax.io import InputError, write_image, write_text
from crm_jax.metrics import scale_key
from crm_jax.scales import check_scales
from crm_jax.training import workdir as wd
from crm_jax.training.config import TrainingError

SYNTHETIC = 'synthetic'
TFDS_PREFIX = 'tfds:'
# First entry of the held-out set's seed sequences; SyntheticSource draws pair i of training
# from default_rng([seed, i]), a two-entry sequence, so no held-out pair is a training pair.
HELD_OUT_TAG = 7_919


def scales(config) -> Tuple[float, ...]:
  try:
    return check_scales(config.get('eval_scales') or SCALES)
  except InputError as e:
    raise TrainingError(f'config.eval_scales: {e}') from None


def make_held_out_set(folder: str, num: int, size: int, seed: int) -> None:
  """Writes ``num`` synthetic BIG objects ``held_out_<i>`` of ``size``x``size`` into
  ``folder`` (skipping complete ones; every file atomic)."""
  for i in range(num):
    name = f'held_out_{i:03d}'
    paths = [os.path.join(folder, f'{name}_{role}.png') for role in ('im', 'seg', 'gt')]
    if all(os.path.isfile(p) for p in paths):
      continue
    image, gt = make_synthetic_pair(size, size, np.random.default_rng([HELD_OUT_TAG, seed, i]))
    for path, picture in zip(paths, (image, lowres_segmenter_mask(gt), gt)):
      write_image(path, picture)


class Validator:
  """The validation set of a run; ``__call__(variables, step)`` scores the weights."""

  def __init__(self, config, workdir: str, model_cfg, is_main: bool = True):
    self.is_main = is_main
    self.data = str(config.eval_data)
    self.model_cfg = model_cfg
    self.workdir = workdir
    self.scales = scales(config)
    self.best_metric = config.get('eval_best_metric') or 'mba'
    self.tfds_data_dir: Optional[str] = None
    self.split: Optional[str] = None
    if self.data == SYNTHETIC:
      num, size = int(config.eval_synthetic_num_examples), int(config.eval_synthetic_size)
      folder = os.path.join(workdir, wd.VALIDATION_DATA_DIR,
                            f'synthetic_{num}x{size}px_seed{int(config.seed)}')
      make_held_out_set(folder, num, size, int(config.seed))
      self.data = folder
    elif self.data.startswith(TFDS_PREFIX):
      name, _, split = self.data[len(TFDS_PREFIX):].partition(':')
      self.data, self.split = name, split or None
      self.tfds_data_dir = os.path.expanduser(str(config.data_dir))
    else:
      self.data = os.path.abspath(os.path.expanduser(self.data))
    try:  # a missing or empty set fails now, before any step
      if self.tfds_data_dir:
        objects, _ = evaluation.tfds_objects(self.data, self.tfds_data_dir, self.split)
      else:
        objects, _ = evaluation.folder_objects(self.data)
    except InputError as e:
      raise TrainingError(f'config.eval_data: {e}') from None
    self.num_objects = len(objects)
    self.path = os.path.join(workdir, wd.VALIDATION_FILE)
    self.record = self._load()

  def _load(self) -> Dict:
    if os.path.isfile(self.path):
      try:
        with open(self.path) as f:
          return json.load(f)
      except (OSError, json.JSONDecodeError):
        pass  # rewritten at the next validation
    return {'metric': None, 'best': None, 'steps': {}}

  def __call__(self, variables, step: int) -> Dict[str, float]:
    """Refines every object with ``variables`` and returns ``{'val/iou_<s>': .., 'val/mba_<s>':
    ..}``; records the step (and the best one) in ``validation.json``."""
    # Every local device of every process refines its share (crm_jax.dispatch), into one folder
    # of the shared workdir; process 0 computes the metrics and every process gets them.
    refiners = local_refiners(self.model_cfg, variables)
    out_dir = os.path.join(self.workdir, f'.tmp-validation-{step}')
    try:
      result = evaluation.evaluate(self.data, None, out_dir, self.scales, progress=False,
                                   log=lambda _: None, tfds_data_dir=self.tfds_data_dir,
                                   split=self.split, refiner=refiners, overwrite=True,
                                   all_processes=True)
    except InputError as e:
      raise TrainingError(f'validation at step {step}: {e}') from None
    finally:
      if self.is_main:
        shutil.rmtree(out_dir, ignore_errors=True)
    scores = {}
    for s in self.scales:
      r = result['scales'][scale_key(s)]
      scores[f'val/iou_{scale_key(s)}'] = float(r['iou'])
      scores[f'val/mba_{scale_key(s)}'] = float(r['mba'])
    self._update(step, scores, int(result['num_images']))
    return scores

  def _update(self, step: int, scores: Dict[str, float], num_images: int) -> None:
    key = f'val/{self.best_metric}_{scale_key(self.scales[-1])}'
    rec = self.record
    rec['metric'] = key
    rec['steps'][str(step)] = dict(scores, num_images=num_images)
    if rec['best'] is None or scores[key] > rec['best']['value']:
      rec['best'] = {'step': step, 'value': scores[key]}
    if self.is_main:
      write_text(self.path, json.dumps(rec, indent=2, sort_keys=True) + '\n')

  def line(self, step: int, scores: Dict[str, float]) -> str:
    """``validation at step N (K objects): IoU 0.125 a | ... mBA ...; best step B``."""
    iou = ' '.join(f'{scale_key(s)}:{scores[f"val/iou_{scale_key(s)}"]:.4f}'
                   for s in self.scales)
    mba = ' '.join(f'{scale_key(s)}:{scores[f"val/mba_{scale_key(s)}"]:.4f}'
                   for s in self.scales)
    best = self.record['best']
    return (f'validation at step {step} ({self.num_objects} objects): IoU {iou} | mBA {mba}; '
            f'best {self.record["metric"]} {best["value"]:.4f} at step {best["step"]}')


def make_validator(config, workdir: str, model_cfg, is_main: bool) -> Optional[Validator]:
  """The run's Validator (on every process) when ``config.eval_every > 0``, else None."""
  if not int(config.get('eval_every') or 0):
    return None
  return Validator(config, workdir, model_cfg, is_main)


def wanted(config, done: int, num_steps: int) -> bool:
  """Whether to validate after ``done`` steps (every eval_every steps and at the end)."""
  every = int(config.get('eval_every') or 0)
  return every > 0 and (done % every == 0 or done == num_steps)
