"""Refinement and metrics over BIG-style data (``evaluate.py``; docs/metrics.md).

Input, either a folder (``<name>_im.jpg|png``, ``<name>_seg.png``, ``<name>_gt.png``; the naming is
``crm_jax.data.folders``) or a prepared TFDS dataset with ``seg`` and ``gt`` features
(``crm_big``, read through ``crm_jax.data.tfds_builders.load_source``; no TensorFlow). Images and
masks are read by the rules of ``crm_jax.io`` (mask encodings, truncated files); a rule that had
to guess is reported in one ``warning:`` line naming the file.

Output folder: the published layout (``crm_jax.metrics.output_files``: ``<s>_<name>_mask.png``
per scale ``s``, ``uint8(prob * 255)``, and ``<name>_im.png``, ``<name>_seg.png``,
``<name>_gt.png`` as read, all at the original size), so the published eval_post scripts run on
it unchanged; plus ``manifest.json``, which says what made the masks::

    {"format": "crm-jax-output", "fingerprint": "sha256:...", "scales": ["0.125", ...],
     "dtype": "float32", "plan": "banded", "checkpoint": "/path/or/null"}

and ``metrics.json``::

    {"scales": {"0.125": {"iou", "mba", "old_iou", "old_mba", "num_images", ...}, ...},
     "model": {the manifest}, "num_images": N, "seconds": S, "skipped": ["name: reason", ...],
     ...}

Provenance. The manifest is written before the first mask. A run into a folder that holds
outputs made with another fingerprint (``crm_jax.checkpoint.fingerprint``: the model's content),
other scales, dtype or execution plan, or outputs without a manifest, is refused with one line
(``overwrite=True`` / ``--overwrite`` removes those outputs and refines everything again), so
resuming only ever reuses masks made with the same model and settings.

Every file is written atomically (``crm_jax.io.write_image``) and the masks are written before
the ``_im``/``_seg``/``_gt`` copies, so an object is complete exactly when all its files exist:
a run started again (after an interruption) skips complete objects, and removes the temporary
files a killed run left (``crm_jax.io.remove_leftovers``). The output folder is checked before
any work (``crm_jax.io.check_output_dir``): it must be writable and must not be, or lie inside,
the input folder.

Bad input (a missing ``_gt``/``_seg``/``_im`` file, sizes that differ, an unreadable, truncated or
corrupt image, an image too small to pad or for the scales) is reported in one line naming the
object and the problem; that object is skipped and the run goes on. ``evaluate`` raises
``InputError`` only when nothing could be evaluated (an empty or missing folder, no complete
object, every object bad) or before any work for a bad argument or output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from crm_jax import metrics
from crm_jax.checkpoint import fingerprint
from crm_jax.constants import SCALES
from crm_jax.data import folders
from crm_jax.io import (InputError, check_output_dir, read_image, read_mask, remove_leftovers,
                        write_image, write_text)
from crm_jax.metrics import scale_key
from crm_jax.preprocess import prob_to_uint8
from crm_jax.scales import check_scales

METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "crm-jax-output"
SETTINGS = ("fingerprint", "scales", "dtype", "plan")  # what the masks depend on
DEFAULT_PLAN = "banded"  # for a refiner that does not name its execution plan

Log = Callable[[str], None]



# ---------------------------------------------------------------------------------------------
# Objects to refine.


@dataclasses.dataclass(frozen=True)
class EvalObject:
  """One object: its name and how to load ``(image RGB uint8 [H, W, 3], seg uint8 [H, W],
  gt uint8 [H, W])``; ``load`` raises ``InputError`` naming the file and the problem."""
  name: str
  load: Callable[[], Tuple[np.ndarray, np.ndarray, np.ndarray]]


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


def _one_line(e: BaseException) -> str:
  return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


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
    raise InputError(_one_line(e)) from None
  return triples, _describe_unmatched(report)


def folder_objects(data_dir: str) -> Tuple[List[EvalObject], List[str]]:
  """``list_objects`` as ``EvalObject`` s (loading checks that the sizes agree)."""
  triples, problems = list_objects(data_dir)
  return [EvalObject(t.name, lambda t=t: _read_triple(t)) for t in triples], problems


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
  import tensorflow_datasets as tfds  # only on this path: importing TFDS takes seconds
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
    raise InputError(f"--data {name}: {_one_line(e)}") from None
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
    obj_name = _text(raw[i]["name"]).replace("/", "_").replace(os.sep, "_")
    objects.append(EvalObject(obj_name, lambda i=i: load(i)))
  return objects, []


# ---------------------------------------------------------------------------------------------
# Refining.


def write_json(path: str, blob) -> None:
  """Writes JSON atomically (``crm_jax.io.write_text``)."""
  write_text(path, json.dumps(blob, indent=2, allow_nan=False) + "\n")


@dataclasses.dataclass
class RefineSummary:
  refined: List[str]
  skipped_complete: List[str]
  failed: List[str]  # "name: reason"
  seconds: float

  @property
  def seconds_per_object(self) -> Optional[float]:
    return self.seconds / len(self.refined) if self.refined else None


_BAR_FORMAT = ("{desc}: {n_fmt}/{total_fmt} objects |{bar}| {elapsed} elapsed, {remaining} "
               "left, {rate_inv_fmt}{postfix}")


def refine_objects(objects: Sequence[EvalObject], out_dir: str, scales: Sequence[float],
                   refiner, *, progress: bool = True, log: Log = print,
                   batch_size: int = 1) -> RefineSummary:
  """Refines every object that is not complete in ``out_dir`` at every scale.

  ``refiner``: anything with ``refine_all_scales(image, mask, scales) -> {s: prob [H, W]}``
  (``crm_jax.refine.Refiner``); with ``batch_size > 1`` also ``bucket_of(size)`` and
  ``refine_batch_all_scales``: objects are grouped by bucket and each group of ``batch_size``
  is refined as one batch (the fused plan runs it as one program; the results equal refining
  one by one). Objects that fail (bad input) are reported through ``log`` and listed in
  ``failed``; a mask rule that guessed is logged as a ``warning:`` line.
  """
  complete = [o.name for o in objects if metrics.is_complete(out_dir, o.name, scales)]
  done = set(complete)
  todo = [o for o in objects if o.name not in done]
  if complete:
    log(f"{len(complete)} object(s) already complete in {out_dir}: skipped")
  refined: List[str] = []
  failed: List[str] = []
  pending: Dict[object, List[tuple]] = {}
  start = time.time()  # compilation counts, loading the checkpoint does not
  with tqdm(total=len(todo), desc="refining", unit="object", disable=not progress,
            bar_format=_BAR_FORMAT, dynamic_ncols=True) as bar:
    def say(msg: str) -> None:
      with tqdm.external_write_mode():
        log(msg)

    def fail(name: str, e: BaseException) -> None:
      # RuntimeError: XLA errors such as running out of device memory on one huge image.
      reason = _one_line(e)
      if not isinstance(e, InputError):
        reason = f"{type(e).__name__}: {reason}"
      failed.append(f"{name}: {reason}")
      say(f"skipped {name}: {reason}")

    def refine_group(group: List[tuple]) -> None:
      t0 = time.time()
      try:
        if batch_size == 1:
          results = [refiner.refine_all_scales(group[0][1], group[0][2], scales)]
        else:
          results = refiner.refine_batch_all_scales([g[1] for g in group],
                                                    [g[2] for g in group], scales)
      except (InputError, MemoryError, RuntimeError) as e:
        bad = getattr(e, "bad", None)  # crm_jax.refine.BatchInputError: the others were refined
        if bad is None:
          results = [None] * len(group)
          for item in group:
            fail(item[0].name, e)
        else:
          results = e.results
          for i, message in bad.items():
            fail(group[i][0].name, InputError(message))
      for (obj, image, seg, gt), probs in zip(group, results):
        if probs is None:
          continue
        for s in scales:
          write_image(metrics.mask_path(out_dir, obj.name, s), prob_to_uint8(probs[s]))
        for role, pixels in zip(metrics.COPY_ROLES, (image, seg, gt)):
          write_image(metrics.copy_path(out_dir, obj.name, role), pixels)
        refined.append(obj.name)
      bar.set_postfix_str(f"last {(time.time() - t0) / len(group):.1f} s/object")
      bar.update(len(group))

    for obj in todo:
      try:
        with warnings.catch_warnings(record=True) as caught:
          warnings.simplefilter("always")
          image, seg, gt = obj.load()
        for w in caught:
          say(f"warning: {w.message}")
        check_scales(scales, image.shape[:2])
      except (InputError, MemoryError, RuntimeError) as e:
        fail(obj.name, e)
        bar.update(1)
        continue
      key = refiner.bucket_of(image.shape[:2]) if batch_size > 1 else None
      pending.setdefault(key, []).append((obj, image, seg, gt))
      if len(pending[key]) >= batch_size:
        refine_group(pending.pop(key))
    for group in pending.values():
      refine_group(group)
  return RefineSummary(refined, complete, failed, time.time() - start)


# ---------------------------------------------------------------------------------------------
# Provenance: the manifest.


def run_settings(refiner, scales: Sequence[float], checkpoint: Optional[str] = None) -> Dict:
  """The manifest of a run: the model's fingerprint, the scales, dtype and plan (``SETTINGS``)
  and, for information, the checkpoint path."""
  fp = getattr(refiner, "fingerprint", None)
  if fp is None:
    fp = fingerprint(refiner.config, refiner.variables)
  return {"format": MANIFEST_FORMAT, "fingerprint": fp,
          "scales": [scale_key(s) for s in scales],
          "dtype": str(getattr(refiner, "dtype", "float32")),
          "plan": str(getattr(refiner, "plan", DEFAULT_PLAN)),
          "checkpoint": os.path.abspath(checkpoint) if checkpoint else None}


def read_manifest(out_dir: str) -> Optional[Dict]:
  """The manifest of an output folder, or None when it has none."""
  path = os.path.join(out_dir, MANIFEST_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      blob = json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: unreadable manifest ({_one_line(e)}); remove it, or pass "
                     "--overwrite to refine everything again") from None
  if not isinstance(blob, dict) or blob.get("format") != MANIFEST_FORMAT:
    raise InputError(f"{path}: not a crm-jax output manifest; choose another output folder")
  return blob


def _differences(old: Optional[Dict], new: Dict) -> str:
  if old is None:
    return f"no {MANIFEST_FILE} says what made them"
  diffs = []
  for k in SETTINGS:
    if old.get(k) != new[k]:
      what = old.get(k)
      if k == "fingerprint":
        what = f"{what} (checkpoint {old.get('checkpoint')})"
      diffs.append(f"{k} {what} instead of {new[k]}")
  return "made with " + "; ".join(diffs)


def prepare_output(out_dir: str, settings: Dict, overwrite: bool = False,
                   log: Log = print) -> None:
  """Makes ``out_dir`` hold outputs of ``settings`` only, then writes its manifest.

  Outputs made with other settings (or without a manifest) raise ``InputError``, or with
  ``overwrite`` are removed (with ``metrics.json``) so that every object is refined again.
  """
  old = read_manifest(out_dir)
  same = old is not None and all(old.get(k) == settings[k] for k in SETTINGS)
  if same:
    return
  existing = sorted(f for f in os.listdir(out_dir) if metrics.is_output_file(f))
  if existing:
    if not overwrite:
      raise InputError(f"{out_dir}: holds {len(existing)} output file(s) "
                       f"{_differences(old, settings)}; choose another --output, or pass "
                       "--overwrite to refine everything again")
    for f in [METRICS_FILE] + existing:
      if os.path.exists(os.path.join(out_dir, f)):
        os.remove(os.path.join(out_dir, f))
    log(f"--overwrite: removed {len(existing)} output file(s) of another run from {out_dir}")
  write_json(os.path.join(out_dir, MANIFEST_FILE), settings)


# ---------------------------------------------------------------------------------------------
# The whole run.


def evaluate(data: Optional[str], checkpoint: Optional[str], out_dir: str,
             scales: Sequence[float] = SCALES, metrics_only: bool = False,
             progress: bool = True, log: Log = print, *, tfds_data_dir: Optional[str] = None,
             split: Optional[str] = None, refiner=None, dtype: str = "float32",
             overwrite: bool = False, plan: str = "auto", batch_size: int = 1) -> Dict:
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
    refiner: an already loaded ``crm_jax.refine.Refiner`` (instead of ``checkpoint``).
    dtype: the network's compute dtype, ``float32`` (exact) or ``bfloat16`` (accelerators).
    overwrite: outputs in ``out_dir`` made by another model or settings are removed and every
      object refined again (without it they are refused; see the module docstring).
    plan: the execution plan (``crm_jax.refine.Refiner``: auto, plain, banded, fused).
    batch_size: objects of one bucket refined together (``refine_objects``).

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
  skipped: List[str] = []
  names = None
  extra: Dict = {}
  if metrics_only:
    if not os.path.isdir(out_dir):
      raise InputError(f"{out_dir}: no such folder (nothing to evaluate)")
    check_output_dir(out_dir)
    remove_leftovers(out_dir)
    settings = read_manifest(out_dir)
  else:
    if not data:
      raise InputError("no data given")
    if tfds_data_dir:
      objects, problems = tfds_objects(data, tfds_data_dir, split)
      inputs = [tfds_data_dir]
    else:
      objects, problems = folder_objects(data)
      inputs = [data]
    check_output_dir(out_dir, inputs)
    remove_leftovers(out_dir)
    if refiner is None:
      from crm_jax.refine import Refiner  # JAX is imported only here.
      refiner = Refiner.from_checkpoint(checkpoint, dtype=dtype, plan=plan)
    settings = run_settings(refiner, scales, checkpoint)
    prepare_output(out_dir, settings, overwrite, log)
    for p in problems:
      log(f"skipped {p}")
    if batch_size < 1:
      raise InputError(f"batch size {batch_size}: must be at least 1")
    summary = refine_objects(objects, out_dir, scales, refiner, progress=progress, log=log,
                             batch_size=batch_size)
    skipped = problems + summary.failed
    names = summary.skipped_complete + summary.refined
    per = summary.seconds_per_object
    log(f"refined {len(summary.refined)} object(s) in {summary.seconds:.1f} s"
        + (f" ({per:.2f} s/object)" if per is not None else "")
        + f", {len(summary.skipped_complete)} already complete, {len(skipped)} skipped")
    extra = {"refined": len(summary.refined), "already_complete": len(summary.skipped_complete),
             "refine_seconds": summary.seconds, "seconds_per_object": per}
    if not names:
      raise InputError(f"{data}: nothing could be evaluated: every object was skipped "
                       f"({len(skipped)})")
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
