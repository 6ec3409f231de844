"""Refinement and metrics over a folder in the BIG layout (``evaluate.py``).

Input folder: ``<name>_im.jpg|png``, ``<name>_seg.png``, ``<name>_gt.png``.
Output folder (the published layout, so the published eval_post scripts run
on it unchanged): ``<s>_<name>_mask.png`` per scale ``s``, and
``<name>_im.png``, ``<name>_seg.png``, ``<name>_gt.png``; plus
``metrics.json``. Every file is written atomically, so an object is complete
when all its files exist: a run started again skips complete objects.
"""

import dataclasses
import json
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from crm_jax import metrics
from crm_jax.constants import SCALES
from crm_jax.data.folders import BigTriple, scan_big
from crm_jax.io import InputError, read_image, read_mask, write_image
from crm_jax.preprocess import prob_to_uint8

METRICS_FILE = "metrics.json"


def scale_key(scale: float) -> str:
  """How a scale is written in file names and metrics.json (Python's str)."""
  return str(float(scale))


def mask_file(out_dir: str, name: str, scale: float) -> str:
  return os.path.join(out_dir, f"{scale_key(scale)}_{name}_mask.png")


def output_files(out_dir: str, name: str, scales: Sequence[float]) -> List[str]:
  """Every file one object leaves in the output folder."""
  return [mask_file(out_dir, name, s) for s in scales] + [
      os.path.join(out_dir, f"{name}_{kind}.png") for kind in ("im", "seg", "gt")]


def list_objects(data_dir: str) -> Tuple[List[BigTriple], List[str]]:
  """Complete objects of a BIG-layout folder, and what was left out and why.

  Raises ``InputError`` when the folder is missing or holds no object.
  """
  try:
    objects, report = scan_big(data_dir)
  except (OSError, ValueError) as e:
    raise InputError(str(e)) from None
  problems = [f"{f}: no matching _im/_seg/_gt files" for f in report.unmatched]
  problems += [f"{f}: ambiguous (duplicate name)" for f in report.duplicates]
  return objects, problems


def _read_object(obj: BigTriple):
  image = read_image(obj.image)
  seg = read_mask(obj.seg)
  gt = read_mask(obj.gt)
  for path, m in ((obj.seg, seg), (obj.gt, gt)):
    if m.shape != image.shape[:2]:
      raise InputError(f"{path}: {m.shape[1]}x{m.shape[0]} but the image "
                       f"{os.path.basename(obj.image)} is {image.shape[1]}x{image.shape[0]}")
  return image, seg, gt


def write_json(path: str, blob) -> None:
  """Writes JSON atomically."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
  with os.fdopen(fd, "w") as f:
    json.dump(blob, f, indent=2)
  os.replace(tmp, path)


@dataclasses.dataclass
class RefineSummary:
  refined: List[str]
  skipped_complete: List[str]
  failed: List[str]  # "name: reason"
  seconds: float


def refine_folder(refiner, data_dir: str, out_dir: str,
                  scales: Sequence[float] = SCALES, progress: bool = True,
                  log: Callable[[str], None] = print) -> RefineSummary:
  """Refines every object of ``data_dir`` at every scale into ``out_dir``."""
  objects, problems = list_objects(data_dir)
  os.makedirs(out_dir, exist_ok=True)
  failed = list(problems)
  for p in problems:
    log(f"skipped {p}")
  refined, complete = [], []
  start = time.time()
  bar = tqdm(objects, desc="refining", unit="object", disable=not progress)
  for obj in bar:
    if all(os.path.isfile(p) for p in output_files(out_dir, obj.name, scales)):
      complete.append(obj.name)
      continue
    t0 = time.time()
    try:
      image, seg, gt = _read_object(obj)
      probs = refiner.refine_all_scales(image, seg, scales)
    except InputError as e:
      failed.append(f"{obj.name}: {e}")
      tqdm.write(f"skipped {obj.name}: {e}") if progress else log(f"skipped {obj.name}: {e}")
      continue
    for s in scales:
      write_image(mask_file(out_dir, obj.name, s), prob_to_uint8(probs[s]))
    write_image(os.path.join(out_dir, f"{obj.name}_im.png"), image)
    write_image(os.path.join(out_dir, f"{obj.name}_seg.png"), seg)
    write_image(os.path.join(out_dir, f"{obj.name}_gt.png"), gt)
    refined.append(obj.name)
    bar.set_postfix(last=f"{time.time() - t0:.1f}s")
  return RefineSummary(refined, complete, failed, time.time() - start)


def evaluate(data_dir: Optional[str], checkpoint: Optional[str], out_dir: str,
             scales: Sequence[float] = SCALES, metrics_only: bool = False,
             progress: bool = True, log: Callable[[str], None] = print) -> Dict:
  """Refines ``data_dir`` into ``out_dir`` (unless ``metrics_only``), then
  computes the metrics of ``out_dir``, prints the table and writes
  ``metrics.json``. Raises ``InputError`` when nothing could be evaluated.
  """
  seconds = 0.0
  failed: List[str] = []
  if not metrics_only:
    from crm_jax.refine import Refiner  # JAX is only needed here.
    refiner = Refiner.from_checkpoint(checkpoint)
    summary = refine_folder(refiner, data_dir, out_dir, scales, progress, log)
    seconds, failed = summary.seconds, summary.failed
    log(f"refined {len(summary.refined)} objects in {seconds:.1f} s, "
        f"{len(summary.skipped_complete)} already complete, {len(failed)} skipped")
  result = metrics.evaluate_folder(out_dir, scales)
  if result["num_images"] == 0:
    raise InputError(f"{out_dir}: nothing could be evaluated")
  result["seconds"] = seconds
  result["skipped"] = failed
  write_json(os.path.join(out_dir, METRICS_FILE), result)
  log(metrics.format_table(result))
  return result
