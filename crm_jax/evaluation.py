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
     "dtype": "float32", "plan": "banded", "min_side": 0, "checkpoint": "/path/or/null"}

and ``metrics.json``::

    {"scales": {"0.125": {"iou", "mba", "old_iou", "old_mba", "num_images", ...}, ...},
     "model": {the manifest}, "num_images": N, "seconds": S, "skipped": ["name: reason", ...],
     "refined": n, "already_complete": m, "object_seconds": {name: s}, "hosts": [...], ...}

Devices and hosts (``crm_jax.sharding``): the objects are refined on every local device (one
``Refiner`` each, largest first) and, with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` set, by every process, each its share, into the shared output folder; process 0
removes leftovers and writes the manifest before anyone refines, and computes the metrics from
the files and writes ``metrics.json`` after everyone has finished.

Provenance. The manifest is written before the first mask. A run into a folder that holds
outputs made with another fingerprint (``crm_jax.checkpoint.fingerprint``: the model's content),
other scales, dtype, execution plan or ``min_side`` (a manifest written before ``min_side``
existed counts as 0), or outputs without a manifest, is refused with one line
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from crm_jax import metrics
from crm_jax.checkpoint import CheckpointError, fingerprint
from crm_jax.constants import SCALES
from crm_jax.data import folders
from crm_jax.io import (InputError, check_output_dir, encoded_size, file_image_size, read_image,
                        read_mask, remove_leftovers, write_image, write_text)
from crm_jax.metrics import scale_key
from crm_jax.preprocess import prob_to_uint8
from crm_jax.scales import check_min_side, check_scales
from crm_jax.sharding import (Job, Processes, RunSummary, host_lines, initialize_from_env, one_line as _one_line,
                              refine_jobs, run_together)

METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "crm-jax-output"
SETTINGS = ("fingerprint", "scales", "dtype", "plan", "min_side")  # what the masks depend on
# A setting added later: its value in a manifest written before it existed.
SETTING_DEFAULTS = {"min_side": 0}
DEFAULT_PLAN = "banded"  # for a refiner that does not name its execution plan

Log = Callable[[str], None]
_SETUP_ERRORS = (InputError, OSError, CheckpointError)  # stop every process before any work



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
    raise InputError(_one_line(e)) from None
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
    record = raw[i]
    obj_name = _text(record["name"]).replace("/", "_").replace(os.sep, "_")
    encoded = record["image"]
    size = encoded_size(encoded.item() if isinstance(encoded, np.ndarray) else encoded)
    objects.append(EvalObject(obj_name, lambda i=i: load(i), size))
  return objects, []


# ---------------------------------------------------------------------------------------------
# Refining.


def write_json(path: str, blob) -> None:
  """Writes JSON atomically (``crm_jax.io.write_text``)."""
  write_text(path, json.dumps(blob, indent=2, allow_nan=False) + "\n")


def _write_object(out_dir: str, name: str, scales: Sequence[float], loaded,
                  probs: Dict[float, np.ndarray]) -> None:
  """The masks, then the copies of the image, seg and gt (so the gt copy completes it)."""
  for s in scales:
    write_image(metrics.mask_path(out_dir, name, s), prob_to_uint8(probs[s]))
  for role, pixels in zip(metrics.COPY_ROLES, loaded):
    write_image(metrics.copy_path(out_dir, name, role), pixels)


def object_jobs(objects: Sequence[EvalObject], out_dir: str,
                scales: Sequence[float]) -> List[Job]:
  """The objects as ``crm_jax.sharding.Job`` s writing the published layout into ``out_dir``."""
  scales = tuple(scales)
  return [Job(o.name, o.load,
              lambda loaded, probs, n=o.name: _write_object(out_dir, n, scales, loaded, probs),
              lambda n=o.name: metrics.is_complete(out_dir, n, scales),
              lambda o=o: o.size) for o in objects]


def as_refiners(refiner) -> list:
  """One refiner, or a sequence of them (one per device), as a list."""
  return list(refiner) if isinstance(refiner, (list, tuple)) else [refiner]


def refine_objects(objects: Sequence[EvalObject], out_dir: str, scales: Sequence[float],
                   refiner, *, progress: bool = True, log: Log = print, batch_size: int = 1,
                   processes: Optional[Processes] = None) -> RunSummary:
  """Refines every object that is not complete in ``out_dir`` at every scale
  (``crm_jax.sharding.refine_jobs``: this process's share of the objects, largest first, on
  every refiner).

  ``refiner``: one ``crm_jax.refine.Refiner`` or a list of them (one per local device), or
  anything with ``refine_all_scales(image, mask, scales) -> {s: prob [H, W]}``; with
  ``batch_size > 1`` also ``bucket_of(size)`` and ``refine_batch_all_scales``: objects of one
  bucket are refined together, ``batch_size`` at a time (the fused plan runs them as one
  program; the results equal refining one by one, to float rounding). Objects that fail (bad
  input) are reported through ``log`` and listed in ``failed``; a mask rule that guessed is
  logged as a ``warning:`` line.
  """
  return refine_jobs(object_jobs(objects, out_dir, scales), scales, as_refiners(refiner),
                     batch_size=batch_size, progress=progress, log=log, processes=processes)


# ---------------------------------------------------------------------------------------------
# Provenance: the manifest.


def run_settings(refiner, scales: Sequence[float], checkpoint: Optional[str] = None) -> Dict:
  """The manifest of a run: the model's fingerprint, the scales, dtype, plan and ``min_side``
  (``SETTINGS``) and, for information, the checkpoint path."""
  fp = getattr(refiner, "fingerprint", None)
  if fp is None:
    fp = fingerprint(refiner.config, refiner.variables)
  return {"format": MANIFEST_FORMAT, "fingerprint": fp,
          "scales": [scale_key(s) for s in scales],
          "dtype": str(getattr(refiner, "dtype", "float32")),
          "plan": str(getattr(refiner, "plan", DEFAULT_PLAN)),
          "min_side": int(getattr(refiner, "min_side", 0)),
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


def _setting(manifest: Dict, key: str):
  """A setting of a manifest (``SETTING_DEFAULTS`` for one written before the key existed)."""
  return manifest.get(key, SETTING_DEFAULTS.get(key))


def _differences(old: Optional[Dict], new: Dict) -> str:
  if old is None:
    return f"no {MANIFEST_FILE} says what made them"
  diffs = []
  for k in SETTINGS:
    if _setting(old, k) != new[k]:
      what = _setting(old, k)
      if k == "fingerprint":
        what = f"{what} (checkpoint {old.get('checkpoint')})"
      diffs.append(f"{k} {what} instead of {new[k]}")
  return "made with " + "; ".join(diffs)


def prepare_output(out_dir: str, settings: Dict, overwrite: bool = False, log: Log = print, *,
                   is_output: Callable[[str], bool] = metrics.is_output_file,
                   results_file: str = METRICS_FILE) -> None:
  """Makes ``out_dir`` hold outputs of ``settings`` only, then writes its manifest.

  Outputs (files for which ``is_output(name)`` holds) made with other settings (or without a
  manifest) raise ``InputError``, or with ``overwrite`` are removed (with ``results_file``) so
  that every object is refined again.
  """
  old = read_manifest(out_dir)
  same = old is not None and all(_setting(old, k) == settings[k] for k in SETTINGS)
  if same:
    return
  existing = sorted(f for f in os.listdir(out_dir)
                    if is_output(f) and os.path.isfile(os.path.join(out_dir, f)))
  if existing:
    if not overwrite:
      raise InputError(f"{out_dir}: holds {len(existing)} output file(s) "
                       f"{_differences(old, settings)}; choose another --output, or pass "
                       "--overwrite to refine everything again")
    for f in [results_file] + existing:
      if os.path.exists(os.path.join(out_dir, f)):
        os.remove(os.path.join(out_dir, f))
    log(f"--overwrite: removed {len(existing)} output file(s) of another run from {out_dir}")
  write_json(os.path.join(out_dir, MANIFEST_FILE), settings)


# ---------------------------------------------------------------------------------------------
# The whole run.


def start_output(out_dir: str, inputs: Sequence[str], settings: Callable[[], Dict],
                 overwrite: bool, log: Log, processes: Processes, **prepare) -> Dict:
  """The output folder made ready on every process: checked (``check_output_dir``), then on
  process 0 the leftovers of killed runs removed and the manifest prepared (``prepare_output``,
  keyword arguments passed on), while no process writes; an error on any process stops all.
  Returns the settings (``settings()``, called on every process)."""
  def step():
    check_output_dir(out_dir, inputs)
    blob = settings()
    if processes.is_main:
      remove_leftovers(out_dir)
      prepare_output(out_dir, blob, overwrite, log, **prepare)
    return blob
  return run_together(processes, step, _SETUP_ERRORS)


def load_refiners(refiner, checkpoint: Optional[str], devices: Optional[int] = None,
                  min_side: Optional[int] = None, log: Optional[Log] = None, **kwargs) -> list:
  """``refiner`` as a list (``as_refiners``) or, when it is None, one
  ``crm_jax.refine.Refiner`` per local device (``devices``: the first N; default all) with the
  checkpoint read once; keyword arguments go to ``Refiner``. ``min_side`` None: the
  checkpoint's recommendation (``crm_jax.checkpoint.resolve_min_side``), with a note to ``log``
  when it is not 0."""
  if refiner is not None:
    return as_refiners(refiner)
  from crm_jax import checkpoint as ckpt  # JAX is imported only here.
  from crm_jax.sharding import local_refiners

  if not checkpoint:
    raise InputError("no --checkpoint given")
  min_side, note = ckpt.resolve_min_side(min_side, checkpoint)
  if note is not None and log is not None:
    log(f"note: {note}")
  config, variables = ckpt.load_model(checkpoint)
  return local_refiners(config, variables, devices, min_side=min_side, **kwargs)


def join_processes(batch_size: int, refiner, all_processes: Optional[bool] = None) -> Processes:
  """Checks ``batch_size``, then this process's place: among every process of a multi-host run
  (``all_processes``; by default when no ``refiner`` was given, the command line's case), or
  alone (a caller's own refiners, e.g. tests)."""
  if batch_size < 1:
    raise InputError(f"batch size {batch_size}: must be at least 1")
  if all_processes is None:
    all_processes = refiner is None
  if not all_processes:
    return Processes(0, 1)
  initialize_from_env()
  return Processes()


def evaluate(data: Optional[str], checkpoint: Optional[str], out_dir: str,
             scales: Sequence[float] = SCALES, metrics_only: bool = False,
             progress: bool = True, log: Log = print, *, tfds_data_dir: Optional[str] = None,
             split: Optional[str] = None, refiner=None, dtype: str = "float32",
             overwrite: bool = False, plan: str = "auto", batch_size: int = 1,
             devices: Optional[int] = None, all_processes: Optional[bool] = None,
             min_side: Optional[int] = None) -> Dict:
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
      object refined again (without it they are refused; see the module docstring).
    plan: the execution plan (``crm_jax.refine.Refiner``: auto, plain, banded, fused).
    min_side: leave out the leading scales at which an image's shorter side is below this many
      pixels (``crm_jax.refine.Refiner``; 0 is the published loop); the masks of a scale left
      out are the coarse mask. None (default): what the checkpoint recommends
      (``crm_jax.checkpoint.recommended_min_side``; 0 unless it names a value). A ``refiner``
      given carries its own (as its dtype and plan); the manifest records the refiner's.
    batch_size: objects of one bucket refined together (``refine_objects``).
    devices: how many local devices refine (default: all; one Refiner each).
    all_processes: share the work with every process of a multi-host run (default: when no
      ``refiner`` is given); every process must then call ``evaluate`` with the same data.

  Every local device, every host (``crm_jax.sharding``): objects are refined on every local
  device, and with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set
  by every process, each its share, into the shared ``out_dir``; process 0 then computes the
  metrics from the files and writes ``metrics.json``, and every process returns them.

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
  min_side = None if min_side is None else check_min_side(min_side)
  if metrics_only:
    if not os.path.isdir(out_dir):
      raise InputError(f"{out_dir}: no such folder (nothing to evaluate)")
    check_output_dir(out_dir)
    remove_leftovers(out_dir)
    return _write_metrics(out_dir, scales, None, [], read_manifest(out_dir), {}, start, log,
                          progress)
  if not data:
    raise InputError("no data given")
  processes = join_processes(batch_size, refiner, all_processes)
  progress = progress and processes.is_main
  state = {}

  def settings():
    if tfds_data_dir:
      state["objects"], state["problems"] = tfds_objects(data, tfds_data_dir, split)
    else:
      state["objects"], state["problems"] = folder_objects(data)
    state["refiners"] = load_refiners(refiner, checkpoint, devices, dtype=dtype, plan=plan,
                                      min_side=min_side,
                                      log=log if processes.is_main else None)
    return run_settings(state["refiners"][0], scales, checkpoint)

  inputs = [tfds_data_dir if tfds_data_dir else data]
  settings = start_output(out_dir, inputs, settings, overwrite, log, processes)
  if processes.is_main:
    for p in state["problems"]:
      log(f"skipped {p}")
  summary = refine_objects(state["objects"], out_dir, scales, state["refiners"],
                           progress=progress, log=log, batch_size=batch_size,
                           processes=processes)
  skipped = state["problems"] + summary.failed
  # In the data's order, however the work was spread or resumed: the metrics' sums run in it.
  done = set(summary.skipped_complete) | set(summary.refined)
  names = [o.name for o in state["objects"] if o.name in done]
  per = summary.seconds_per_object
  extra = {"refined": len(summary.refined), "already_complete": len(summary.skipped_complete),
           "refine_seconds": summary.seconds, "seconds_per_object": per,
           "object_seconds": summary.object_seconds, "hosts": summary.hosts}

  def finish():
    if not processes.is_main:
      return None
    if processes.count > 1:
      for line in host_lines(summary):
        log(line)
    log(f"refined {len(summary.refined)} object(s) in {summary.seconds:.1f} s"
        + (f" ({per:.2f} s/object)" if per is not None else "")
        + f", {len(summary.skipped_complete)} already complete, {len(skipped)} skipped")
    if not names:
      raise InputError(f"{data}: nothing could be evaluated: every object was skipped "
                       f"({len(skipped)})")
    return _write_metrics(out_dir, scales, names, skipped, settings, extra, start, log,
                          progress)

  result = run_together(processes, finish)
  if result is None:  # not process 0: what process 0 wrote
    with open(os.path.join(out_dir, METRICS_FILE)) as f:
      result = json.load(f)
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
