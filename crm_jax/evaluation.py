"""``crm-evaluate``: BIG-style data refined at every scale, scored as the published scripts do.

Lists the objects of a BIG-layout folder (``<name>_im.jpg|png``, ``<name>_seg.png``,
``<name>_gt.png``) or a prepared TFDS set with seg/gt features (``crm_big``), refines them
(``crm_jax.dataset_run.run``) into the published layout (``<s>_<name>_mask.png`` per scale, then
the ``_im``/``_seg``/``_gt`` copies, the gt last), scores each object in memory as it is refined
and writes ``metrics.json``. For users: docs/big.md and docs/metrics.md.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Optional, Sequence

import jax
import numpy as np

from crm_jax import dataset_run, metrics
from crm_jax.constants import SCALES
from crm_jax.data.big import folder_objects, list_objects, tfds_objects  # noqa: F401 (public here)
from crm_jax.io import InputError
from crm_jax.labels import IGNORE, LabelMap, read_labels, write_labels
from crm_jax.outputs import check_output_dir, is_complete_output, remove_leftovers, write_image
from crm_jax.parallel import Item, Log
from crm_jax.preprocess import prob_to_uint8
from crm_jax.scales import check_scales

METRICS_FILE = "metrics.json"
LABELS_SUFFIX = "_labels.png"  # label-map layout: <name>_labels.png, the refined label map


# ---------------------------------------------------------------------------------------------
# The whole run.


def _write_and_score(out_dir: str, scales: Sequence[float], item: Item, loaded,
                     probs: Dict[float, np.ndarray]) -> Dict:
  """Writes the masks, then the copies of image, seg and gt (the gt copy completes the
  object); returns its scores (``metrics.score_object``), from the very pixels written."""
  masks = {}
  for s in scales:
    masks[metrics.scale_key(s)] = prob_to_uint8(probs[s])
    write_image(metrics.mask_path(out_dir, item.name, s), masks[metrics.scale_key(s)])
  for role, pixels in zip(metrics.COPY_ROLES, loaded):
    write_image(metrics.copy_path(out_dir, item.name, role), pixels)
  return metrics.score_refined(loaded[1], loaded[2], masks)


def evaluate(data: Optional[str], checkpoint: Optional[str], out_dir: str,
             scales: Sequence[float] = SCALES, metrics_only: bool = False,
             progress: bool = True, log: Log = print, *, tfds_data_dir: Optional[str] = None,
             split: Optional[str] = None, refiner=None, dtype: str = "float32",
             overwrite: bool = False, plan: str = "auto", batch_size: int = 1,
             devices: Optional[int] = None, all_processes: Optional[bool] = None,
             min_side: Optional[int] = None, export: Optional[str] = None) -> Dict:
  """Refines ``data`` into ``out_dir`` (unless ``metrics_only``), prints the metrics table and
  writes ``out_dir/metrics.json``; returns what it wrote.

  Args:
    data: a BIG-layout folder, or with ``tfds_data_dir`` a TFDS name (``crm_big``; ``split``
      may be left out when there is one).
    checkpoint: a model checkpoint directory, or ``refiner``: a ``Refiner`` or one per device.
    scales: coarse to fine. ``dtype``, ``plan``, ``min_side``, ``export``: as ``Refiner``
      (``min_side`` None: the checkpoint's recommendation); ``batch_size``: objects of one
      bucket refined together; ``devices``: the first N local devices (default all).
    metrics_only: score every object already in ``out_dir``, from its files.
    overwrite: outputs of another model or settings are removed (else refused).
    all_processes: share the work with every process of a multi-host run (default: when no
      ``refiner`` is given).

  The metrics cover the objects of ``data`` complete in ``out_dir`` (refined now, scored in
  memory, or before, scored from their files). Raises ``InputError`` (bad argument or folder,
  nothing to evaluate), ``CheckpointError``, ``OSError`` (an output that cannot be written).
  """
  start = time.time()
  if metrics_only:
    scales = check_scales(scales)
    if not os.path.isdir(out_dir):
      raise InputError(f"{out_dir}: no such folder (nothing to evaluate)")
    check_output_dir(out_dir)
    remove_leftovers(out_dir)
    result = metrics.evaluate_folder(out_dir, scales, progress=progress, log=log)
    return _write_metrics(out_dir, result, dataset_run.read_manifest(out_dir), {}, start, log)
  if not data:
    raise InputError("no data given")
  scales = dataset_run.start(out_dir, [tfds_data_dir or data], scales, min_side, batch_size,
                             refiner is None if all_processes is None else all_processes)
  if tfds_data_dir:
    objects, problems = tfds_objects(data, tfds_data_dir, split)
  else:
    objects, problems = folder_objects(data)
  run = dataset_run.run(
      out_dir, [tfds_data_dir or data], objects, problems, scales,
      lambda item, loaded, probs: _write_and_score(out_dir, scales, item, loaded, probs),
      is_complete=lambda item: metrics.is_complete(out_dir, item.name, scales),
      is_output=metrics.is_output_file, results_file=METRICS_FILE, refiner=refiner,
      checkpoint=checkpoint, min_side=min_side, dtype=dtype, plan=plan, batch_size=batch_size,
      devices=devices, overwrite=overwrite, progress=progress, log=log, export=export)
  main = jax.process_index() == 0
  per = run.seconds_per_object
  if main:
    log(f"refined {len(run.refined)} object(s) in {run.refine_seconds:.1f} s"
        + (f" ({per:.2f} s/object)" if per is not None else "")
        + f", {len(run.complete)} already complete, {len(run.skipped)} skipped")
  done = set(run.complete) | set(run.refined)
  names = [o.name for o in objects if o.name in done]
  if not names:
    raise InputError(f"{data}: nothing could be evaluated: every object was skipped "
                     f"({len(run.skipped)})")
  # Every process adds up the same records in the data's order; process 0 writes the file.
  say = log if main else (lambda _: None)
  records = [(n, run.records[n] if n in run.records else
              metrics.score_files(out_dir, n, scales, say)) for n in names]
  result = metrics.summarize(records, scales)
  result["skipped"] = run.skipped + result["skipped"]
  extra = {"refined": len(run.refined), "already_complete": len(run.complete),
           "refine_seconds": run.refine_seconds, "seconds_per_object": per,
           "object_seconds": run.object_seconds, "hosts": run.hosts}
  return _write_metrics(out_dir, result, run.settings, extra, start, log if main else None)


def evaluate_labels(data: str, checkpoint: Optional[str], out_dir: str,
                    scales: Sequence[float] = SCALES, ignore: Optional[int] = IGNORE,
                    progress: bool = True, log: Log = print, *, refiner=None,
                    dtype: str = "float32", overwrite: bool = False, plan: str = "auto",
                    devices: Optional[int] = None, all_processes: Optional[bool] = None,
                    min_side: Optional[int] = None, export: Optional[str] = None) -> Dict:
  """``crm-evaluate --labels``: a BIG-layout folder whose ``_seg``/``_gt`` are label maps,
  refined (``Refiner.refine_labels``) into ``<name>_labels.png`` (the palette of the seg kept);
  coarse and refined mIoU and mBA (``metrics.summarize_labels``) in ``metrics.json``, which is
  returned. Arguments as ``evaluate``; docs/labels.md."""
  start = time.time()
  scales = dataset_run.start(out_dir, [data], scales, min_side, 1,
                             refiner is None if all_processes is None else all_processes)
  objects, problems = folder_objects(data, labels=True)
  path = lambda name: os.path.join(out_dir, name + LABELS_SUFFIX)  # noqa: E731

  def write_and_score(item, loaded, refined):
    _, seg, gt = loaded
    write_labels(path(item.name), LabelMap(refined[scales[-1]], seg.palette))
    return metrics.score_labels(gt.labels, seg.labels, refined[scales[-1]], ignore)

  run = dataset_run.run(
      out_dir, [data], objects, problems, scales, write_and_score,
      is_complete=lambda item: is_complete_output(path(item.name)),
      is_output=lambda f: f.endswith(LABELS_SUFFIX) and not f.startswith("."),
      results_file=METRICS_FILE, refiner=refiner, checkpoint=checkpoint, min_side=min_side,
      dtype=dtype, plan=plan, devices=devices, overwrite=overwrite, progress=progress, log=log,
      export=export, keep=scales[-1:], labels={"ignore": ignore})
  main = jax.process_index() == 0
  records, skipped = [], list(run.skipped)
  for item in objects:  # those complete before the run: scored from their files
    if item.name in run.records:
      records.append(run.records[item.name])
    elif item.name in run.complete:
      try:
        _, seg, gt = item.load()
        refined = read_labels(path(item.name)).labels
        if refined.shape != gt.labels.shape:
          raise InputError(f"{path(item.name)}: another size than its gt")
        records.append(metrics.score_labels(gt.labels, seg.labels, refined, ignore))
      except InputError as e:
        skipped.append(f"{item.name}: {e}")
  if not records:
    raise InputError(f"{data}: nothing could be evaluated ({len(skipped)} object(s) skipped)")
  result = {**metrics.summarize_labels(records), "num_images": len(records),
            "skipped": skipped, "model": run.settings, "refined_objects": len(run.refined),
            "already_complete": len(run.complete), "seconds": time.time() - start,
            "refine_seconds": run.refine_seconds, "hosts": run.hosts}
  if main:
    dataset_run.write_json(os.path.join(out_dir, METRICS_FILE), result)
    log(metrics.format_label_table(result))
    log(f"{len(records)} label map(s) evaluated, {len(skipped)} skipped; wrote "
        f"{os.path.join(out_dir, METRICS_FILE)}")
  return result


def _write_metrics(out_dir: str, result: Dict, settings: Optional[Dict], extra: Dict,
                   start: float, log: Optional[Log]) -> Dict:
  """``result`` with the model and run fields, written to ``metrics.json`` and shown as a table
  (by process 0: ``log`` None on the others)."""
  if result["num_images"] == 0:
    why = (f"no <name>_gt.png in {out_dir}" if result["num_objects"] == 0 else
           f"none of {result['num_objects']} object(s) has a usable gt, seg and mask")
    raise InputError(f"{out_dir}: nothing could be evaluated ({why})")
  result["model"] = settings
  result["seconds"] = time.time() - start
  result.update(extra)
  if log is not None:
    dataset_run.write_json(os.path.join(out_dir, METRICS_FILE), result)
    log(metrics.format_table(result))
    log(f"{result['num_images']} object(s) evaluated, {len(result['skipped'])} skipped; "
        f"wrote {os.path.join(out_dir, METRICS_FILE)}")
  return result
