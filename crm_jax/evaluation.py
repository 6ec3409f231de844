"""Refinement and metrics over BIG-style data: ``evaluate()`` (the ``crm-evaluate`` command).

Owns the objects of a BIG-layout folder (``<name>_im.jpg|png``, ``<name>_seg.png``,
``<name>_gt.png``) or a prepared TFDS dataset with seg/gt features (``crm_big``), the published
output layout (``<s>_<name>_mask.png`` per scale, and the ``_im``/``_seg``/``_gt`` copies, written
last so that an object is complete exactly when they exist) and ``metrics.json``. The run itself
(manifest, resume, devices, hosts) is ``crm_jax.run_output.run_dataset``. For users:
docs/big.md (layout, resume, bad objects) and docs/metrics.md.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from crm_jax import metrics
from crm_jax.constants import SCALES
from crm_jax.data import folders
from crm_jax.dispatch import Job, Log, one_line
from crm_jax.io import (InputError, check_output_dir, encoded_size, file_image_size, read_image,
                        read_mask, remove_leftovers, write_image)
from crm_jax.preprocess import prob_to_uint8
from crm_jax.run_output import DatasetRun, read_manifest, run_dataset, write_json
from crm_jax.scales import check_min_side, check_scales

METRICS_FILE = "metrics.json"


METRICS_FILE = "metrics.json"


# ---------------------------------------------------------------------------------------------
# Objects to refine.


@dataclasses.dataclass(frozen=True)
class EvalObject:
  """One object: its name and how to load ``(image RGB uint8 [H, W, 3], seg uint8 [H, W],
  gt uint8 [H, W])``; ``load`` raises ``InputError`` naming the file and the problem. ``size``:
  the image's ``(H, W)`` from its header, or None (``crm_jax.io.encoded_size``), for the
  schedule (largest first, buckets)."""
  name: str
  load: Callable[[], Tuple[np.ndarray, np.ndarray, np.ndarray]]
  size: Optional[Tuple[int, int]] = None


def _check_sizes(image: np.ndarray, seg: np.ndarray, gt: np.ndarray,
                 names: Tuple[str, str, str]) -> None:
  h, w = image.shape[:2]
  for label, m in zip(names[1:], (seg, gt)):
    if m.shape != (h, w):
      raise InputError(f"{label}: {m.shape[1]}x{m.shape[0]} but the image {names[0]} is "
                       f"{w}x{h} (width x height)")


def _read_triple(triple: folders.BigTriple):
  image = read_image(triple.image)
  seg = read_mask(triple.seg)
  gt = read_mask(triple.gt)
  _check_sizes(image, seg, gt, (os.path.basename(triple.image), triple.seg, triple.gt))
  return image, seg, gt


def _describe_unmatched(report: folders.ScanReport) -> List[str]:
  """One line per object of a BIG scan that was left out: the files it lacks, or the files
  that make it ambiguous."""
  dups: Dict[str, List[str]] = {}
  for f in report.duplicates:
    parsed = folders.big_entry(f)
    dups.setdefault(parsed[0] if parsed else f, []).append(f)
  have: Dict[str, List[str]] = {}
  for f in report.unmatched:
    parsed = folders.big_entry(f)
    if parsed and parsed[0] not in dups:
      have.setdefault(parsed[0], []).append(parsed[1])
  lines = []
  for name, roles in sorted(have.items()):
    lacking = [f"{name}_{role}.{'jpg' if role == 'im' else 'png'} ({what})"
               for role, what in folders.BIG_ROLES.items() if role not in roles]
    lines.append(f"{name}: missing {', '.join(lacking)}")
  for name, files in sorted(dups.items()):
    lines.append(f"{name}: ambiguous, several files for one role: {', '.join(files)}")
  return lines


def list_objects(data_dir: str) -> Tuple[List[folders.BigTriple], List[str]]:
  """The complete ``(image, seg, gt)`` file triples of a BIG-layout folder, and one line per
  object left out (which files it lacks).

  Raises ``InputError`` when the folder is missing, empty or holds no complete object.
  """
  try:
    triples, report = folders.scan_big(data_dir)
  except (OSError, ValueError) as e:
    raise InputError(one_line(e)) from None
  return triples, _describe_unmatched(report)


def folder_objects(data_dir: str) -> Tuple[List[EvalObject], List[str]]:
  """``list_objects`` as ``EvalObject`` s (loading checks that the sizes agree)."""
  triples, problems = list_objects(data_dir)
  return [EvalObject(t.name, lambda t=t: _read_triple(t), file_image_size(t.image))
          for t in triples], problems


def _text(x) -> str:
  if isinstance(x, np.ndarray):
    x = x.item()
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def tfds_objects(name: str, data_dir: str,
                 split: Optional[str] = None) -> Tuple[List[EvalObject], List[str]]:
  """The objects of a prepared TFDS dataset with ``seg`` and ``gt`` features (``crm_big``).

  ``split`` may be left out when the dataset has one split only. Raises ``InputError`` for an
  unknown or unprepared dataset, one without seg/gt, or a missing split.
  """
  # Optional and heavy (TFDS takes seconds to import): only on this path.
  import tensorflow_datasets as tfds
  from crm_jax.data import tfds_builders as tb

  if not os.path.isdir(data_dir):
    raise InputError(f"{data_dir}: no such TFDS data folder")
  try:
    builder = tb.get_builder(name, data_dir)
    if split is None and tb.is_prepared(name, data_dir):
      splits = list(builder.info.splits)
      if len(splits) > 1:
        raise InputError(f"{name} in {data_dir} has splits {', '.join(splits)}; choose one "
                         "with --split")
      split = splits[0] if splits else None
    # load_source checks that the dataset is prepared and has the split.
    source = tb.load_source(name, data_dir, split or "train")
  except (FileNotFoundError, ValueError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f"--data {name}: {one_line(e)}") from None
  split = source.split
  features = set(builder.info.features)
  if not {"image", "seg", "gt"} <= features:
    raise InputError(f"{name} has no seg/gt features ({', '.join(sorted(features))}); only "
                     "BIG-style datasets (crm_big) can be evaluated")
  # The names, without decoding any image (a resumed run skips complete objects cheaply).
  raw = builder.as_data_source(split=split, decoders={
      k: tfds.decode.SkipDecoding() for k in ("image", "seg", "gt")})

  def load(i: int):
    item = source[i]
    image, seg, gt = item["image"], item["seg"], item["gt"]
    where = f"{name}/{split}/{item['name']}"
    _check_sizes(image, seg, gt, (f"{where} image", f"{where} seg", f"{where} gt"))
    return image, seg, gt

  objects = []
  for i in range(len(raw)):
    record = raw[i]
    obj_name = _text(record["name"]).replace("/", "_").replace(os.sep, "_")
    encoded = record["image"]
    size = encoded_size(encoded.item() if isinstance(encoded, np.ndarray) else encoded)
    objects.append(EvalObject(obj_name, lambda i=i: load(i), size))
  return objects, []


# ---------------------------------------------------------------------------------------------
# Refining.


def _write_object(out_dir: str, name: str, scales: Sequence[float], loaded,
                  probs: Dict[float, np.ndarray]) -> None:
  """The masks, then the copies of the image, seg and gt (so the gt copy completes it)."""
  for s in scales:
    write_image(metrics.mask_path(out_dir, name, s), prob_to_uint8(probs[s]))
  for role, pixels in zip(metrics.COPY_ROLES, loaded):
    write_image(metrics.copy_path(out_dir, name, role), pixels)


def object_jobs(objects: Sequence[EvalObject], out_dir: str,
                scales: Sequence[float]) -> List[Job]:
  """The objects as ``crm_jax.dispatch.Job`` s writing the published layout into ``out_dir``."""
  scales = tuple(scales)
  return [Job(o.name, o.load,
              lambda loaded, probs, n=o.name: _write_object(out_dir, n, scales, loaded, probs),
              lambda n=o.name: metrics.is_complete(out_dir, n, scales),
              lambda o=o: o.size) for o in objects]


# ---------------------------------------------------------------------------------------------
# The whole run.


def evaluate(data: Optional[str], checkpoint: Optional[str], out_dir: str,
             scales: Sequence[float] = SCALES, metrics_only: bool = False,
             progress: bool = True, log: Log = print, *, tfds_data_dir: Optional[str] = None,
             split: Optional[str] = None, refiner=None, dtype: str = "float32",
             overwrite: bool = False, plan: str = "auto", batch_size: int = 1,
             devices: Optional[int] = None, all_processes: Optional[bool] = None,
             min_side: Optional[int] = None, export: Optional[str] = None) -> Dict:
  """Refines ``data`` into ``out_dir`` (unless ``metrics_only``), computes the metrics, prints
  the table and writes ``out_dir/metrics.json``; returns what it wrote.

  Args:
    data: a BIG-layout folder, or with ``tfds_data_dir`` a TFDS name (``crm_big``).
    checkpoint: a crm-jax model checkpoint directory (unless ``refiner`` is given).
    out_dir: the output folder.
    scales: the refinement scales, coarse to fine (``crm_jax.scales.check_scales``).
    metrics_only: only recompute the metrics of every object already in ``out_dir``.
    tfds_data_dir, split: where the TFDS dataset is prepared, and which split (may be left out
      when there is one).
    refiner: an already loaded ``crm_jax.refine.Refiner``, or a list of them (one per device),
      instead of ``checkpoint``.
    dtype: the network's compute dtype, ``float32`` (exact) or ``bfloat16`` (accelerators).
    overwrite: outputs in ``out_dir`` made by another model or settings are removed and every
      object refined again (without it they are refused: ``crm_jax.run_output``).
    plan: the execution plan (``crm_jax.refine.Refiner``: auto, plain, banded, fused).
    min_side: leave out the leading scales at which an image's shorter side is below this many
      pixels (``crm_jax.refine.Refiner``; 0 is the published loop); the masks of a scale left
      out are the coarse mask. None (default): what the checkpoint recommends
      (``crm_jax.checkpoint.recommended_min_side``; 0 unless it names a value). A ``refiner``
      given carries its own (as its dtype and plan); the manifest records the refiner's.
    batch_size: objects of one bucket refined together (``crm_jax.dispatch.refine_jobs``).
    devices: how many local devices refine (default: all; one Refiner each).
    export: a ``crm_jax.export`` folder of ``checkpoint``: its serialized programs run the
      fused plan (``crm-export``).
    all_processes: share the work with every process of a multi-host run (default: when no
      ``refiner`` is given); every process must then call ``evaluate`` with the same data.

  Every local device, every host (``crm_jax.dispatch``): objects are refined on every local
  device, and with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set
  by every process, each its share, into the shared ``out_dir``; process 0 then computes the
  metrics from the files and writes ``metrics.json``, and every process returns them (carried
  by the closing barrier: no process reads a file another may remove).

  With refinement, the metrics cover the objects of ``data`` that are complete in ``out_dir``
  (refined now or before); ``--metrics-only`` covers every ``<name>_gt.png`` in ``out_dir``.

  Raises:
    InputError: a bad argument or output folder (before any work), or nothing could be
      evaluated (the message says why).
    crm_jax.checkpoint.CheckpointError: a bad checkpoint.
    OSError: an output file could not be written (the message names it).
  """
  start = time.time()
  scales = check_scales(scales)
  if min_side is not None:
    check_min_side(min_side)
  if metrics_only:
    if not os.path.isdir(out_dir):
      raise InputError(f"{out_dir}: no such folder (nothing to evaluate)")
    check_output_dir(out_dir)
    remove_leftovers(out_dir)
    return _write_metrics(out_dir, scales, None, [], read_manifest(out_dir), {}, start, log,
                          progress)
  if not data:
    raise InputError("no data given")

  def list_jobs():
    if tfds_data_dir:
      objects, problems = tfds_objects(data, tfds_data_dir, split)
    else:
      objects, problems = folder_objects(data)
    return object_jobs(objects, out_dir, scales), problems

  def finish(run: DatasetRun):
    summary, per = run.summary, run.summary.seconds_per_object
    log(f"refined {len(summary.refined)} object(s) in {summary.seconds:.1f} s"
        + (f" ({per:.2f} s/object)" if per is not None else "")
        + f", {len(summary.skipped_complete)} already complete, {len(run.skipped)} skipped")
    names = run.done_names()
    if not names:
      raise InputError(f"{data}: nothing could be evaluated: every object was skipped "
                       f"({len(run.skipped)})")
    extra = {"refined": len(summary.refined), "already_complete": len(summary.skipped_complete),
             "refine_seconds": summary.seconds, "seconds_per_object": per,
             "object_seconds": summary.object_seconds, "hosts": summary.hosts}
    return _write_metrics(out_dir, scales, names, run.skipped, run.settings, extra, start, log,
                          progress)

  _, result = run_dataset(
      out_dir, [tfds_data_dir if tfds_data_dir else data], list_jobs, scales, finish,
      checkpoint=checkpoint, refiner=refiner, min_side=min_side, dtype=dtype, plan=plan,
      batch_size=batch_size, devices=devices, overwrite=overwrite, progress=progress, log=log,
      all_processes=all_processes, export=export, is_output=metrics.is_output_file,
      results_file=METRICS_FILE)
  return result


def _write_metrics(out_dir: str, scales, names: Optional[List[str]], skipped: List[str],
                   settings: Optional[Dict], extra: Dict, start: float, log: Log,
                   progress: bool) -> Dict:
  """The metrics of ``names`` in ``out_dir`` (``metrics.evaluate_folder``), written to
  ``metrics.json`` and shown as a table."""
  result = metrics.evaluate_folder(out_dir, scales, names=names, progress=progress, log=log)
  result["skipped"] = skipped + result["skipped"]
  if result["num_images"] == 0:
    why = (f"no <name>_gt.png in {out_dir}" if result["num_objects"] == 0 else
           f"none of {result['num_objects']} object(s) has a usable gt, seg and mask")
    raise InputError(f"{out_dir}: nothing could be evaluated ({why})")
  result["model"] = settings
  result["seconds"] = time.time() - start
  result.update(extra)
  write_json(os.path.join(out_dir, METRICS_FILE), result)
  log(metrics.format_table(result))
  log(f"{result['num_images']} object(s) evaluated, {len(result['skipped'])} skipped; "
      f"wrote {os.path.join(out_dir, METRICS_FILE)}")
  return result
