"""Validation during training: the multi-scale loop on every object of ``config.eval_data`` (a
BIG-layout folder, ``'tfds:NAME[:SPLIT]'`` or ``'synthetic'``: held-out pairs made in memory),
scored in memory as ``crm-evaluate`` does; only ``WORKDIR/validation.json`` is written."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from crm_jax import distributed, metrics
from crm_jax.constants import SCALES
from crm_jax.data import big
from crm_jax.data.synthesis import lowres_segmenter_mask
from crm_jax.data.synthetic import make_synthetic_pair
from crm_jax.io import InputError
from crm_jax.metrics import scale_key
from crm_jax.outputs import error_line, write_image, write_text
from crm_jax.parallel import Item, local_refiners, refine_share, share
from crm_jax.preprocess import prob_to_uint8
from crm_jax.scales import check_scales
from crm_jax.training import workdir as wd
from crm_jax.training.config import TrainingError

SYNTHETIC = 'synthetic'
TFDS_PREFIX = 'tfds:'
# First entry of the held-out seed sequences; training draws pair i from default_rng([seed, i]),
# a two-entry sequence, so no held-out pair is a training pair.
HELD_OUT_TAG = 7_919


def scales(config) -> Tuple[float, ...]:
  try:
    return check_scales(config.get('eval_scales') or SCALES)
  except InputError as e:
    raise TrainingError(f'config.eval_scales: {e}') from None


def held_out_pair(size: int, seed: int, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Held-out object ``i``: ``(image RGB uint8 [size, size, 3], seg, gt uint8 [size, size])``."""
  image, gt = make_synthetic_pair(size, size, np.random.default_rng([HELD_OUT_TAG, seed, i]))
  return image, lowres_segmenter_mask(gt), gt


def held_out_items(num: int, size: int, seed: int) -> List[Item]:
  """The held-out set as items (``refine`` and ``score_object`` read them as files are read)."""
  return [Item(f'held_out_{i:03d}', lambda i=i: held_out_pair(size, seed, i), (size, size))
          for i in range(num)]


def make_held_out_set(folder: str, num: int, size: int, seed: int) -> None:
  """Writes the held-out set as a BIG-layout folder (``held_out_<i>_{im,seg,gt}.png``)."""
  for i in range(num):
    for role, picture in zip(('im', 'seg', 'gt'), held_out_pair(size, seed, i)):
      write_image(os.path.join(folder, f'held_out_{i:03d}_{role}.png'), picture)


class Validator:
  """The validation set of a run; ``__call__(variables, step)`` scores the weights."""

  def __init__(self, config, workdir: str, model_cfg, is_main: bool = True):
    self.is_main = is_main
    self.model_cfg = model_cfg
    self.scales = scales(config)
    self.best_metric = config.get('eval_best_metric') or 'mba'
    data = str(config.eval_data)
    try:  # a missing or empty set fails now, before any step
      if data == SYNTHETIC:
        self.items = held_out_items(int(config.eval_synthetic_num_examples),
                                    int(config.eval_synthetic_size), int(config.seed))
      elif data.startswith(TFDS_PREFIX):
        name, _, split = data[len(TFDS_PREFIX):].partition(':')
        self.items, _ = big.tfds_objects(name, os.path.expanduser(str(config.data_dir)),
                                         split or None)
      else:
        self.items, _ = big.folder_objects(os.path.abspath(os.path.expanduser(data)))
    except InputError as e:
      raise TrainingError(f'config.eval_data: {e}') from None
    self.num_objects = len(self.items)
    self.path = os.path.join(workdir, wd.VALIDATION_FILE)
    try:
      with open(self.path) as f:
        self.record = json.load(f)
    except (OSError, json.JSONDecodeError):  # none yet, or rewritten at the next validation
      self.record = {'metric': None, 'best': None, 'steps': {}}

  def __call__(self, variables, step: int) -> Dict[str, float]:
    """Scores ``variables``: ``{'val/iou_<s>': .., 'val/mba_<s>': ..}``, recorded in the file."""
    keys = [scale_key(s) for s in self.scales]

    def score(item, loaded, probs):  # as crm-evaluate scores what it writes
      return metrics.score_refined(loaded[1], loaded[2], {k: prob_to_uint8(probs[s])
                                                          for k, s in zip(keys, self.scales)})

    result = refine_share(share(self.items), local_refiners(self.model_cfg, variables),
                          self.scales, score, log=lambda _: None)
    try:
      gathered = distributed.gather({'records': result.records, 'failed': result.failed},
                                    result.error)
    except Exception as e:  # pylint: disable=broad-except
      raise TrainingError(f'validation at step {step}: {error_line(e)}') from None
    records = {n: r for g in gathered for n, r in g['records'].items()}
    summary = metrics.summarize([(it.name, records[it.name]) for it in self.items
                                 if it.name in records], self.scales)
    if not summary['num_images']:
      failed = [f for g in gathered for f in g['failed']]
      raise TrainingError(f'validation at step {step}: nothing could be evaluated'
                          + (f' ({failed[0]})' if failed else ''))
    scores = {f'val/{m}_{k}': float(summary['scales'][k][m]) for k in keys for m in ('iou', 'mba')}
    self._update(step, scores, int(summary['num_images']))
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
    keys, best = [scale_key(s) for s in self.scales], self.record['best']
    part = lambda m: ' '.join(f'{k}:{scores[f"val/{m}_{k}"]:.4f}' for k in keys)
    return (f'validation at step {step} ({self.num_objects} objects): IoU {part("iou")} | mBA '
            f'{part("mba")}; best {self.record["metric"]} {best["value"]:.4f} at step '
            f'{best["step"]}')


def make_validator(config, workdir: str, model_cfg, is_main: bool) -> Optional[Validator]:
  """The run's Validator (on every process) when ``config.eval_every > 0``, else None."""
  if not int(config.get('eval_every') or 0):
    return None
  return Validator(config, workdir, model_cfg, is_main)
