"""The output folder of a dataset run, and the one run loop of ``evaluate`` and folder mode.

Owns the rules of an output folder: ``manifest.json`` says what made the masks (the model's
fingerprint, scales, dtype, plan, ``min_side``); a run with the same settings resumes (complete
objects are skipped), one with other settings is refused unless ``overwrite``; leftovers of a
killed run are removed before anyone writes. ``run_dataset`` is the sequence both dataset commands
run: list the objects, load one ``Refiner`` per local device, prepare the folder, refine through
``crm_jax.dispatch`` on every device and host, then a finishing step on process 0 whose result
every process returns. The rules for users: docs/refining.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from crm_jax import checkpoint as ckpt
from crm_jax import export as export_lib
from crm_jax.distributed import maybe_initialize_distributed
from crm_jax.dispatch import (Job, Log, Processes, RunSummary, host_lines, local_refiners,
                              one_line, refine_jobs, run_together)
from crm_jax.folder_lock import FolderLock
from crm_jax.io import InputError, check_output_dir, remove_leftovers, write_text
from crm_jax.metrics import scale_key
from crm_jax.scales import check_min_side, check_scales

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "crm-jax-output"
# What the masks depend on.
SETTINGS = ("fingerprint", "scales", "dtype", "plan", "min_side", "orientation")
# A setting added later: its value in a manifest written before it existed.
SETTING_DEFAULTS = {"min_side": 0, "orientation": "stored"}
DEFAULT_PLAN = "banded"  # for a refiner that does not name its execution plan
_SETUP_ERRORS = (InputError, OSError, ckpt.CheckpointError)  # stop every process before any work


def write_json(path: str, blob) -> None:
  """Writes JSON atomically (``crm_jax.io.write_text``)."""
  write_text(path, json.dumps(blob, indent=2, allow_nan=False) + "\n")


def as_refiners(refiner) -> list:
  """One refiner, or a sequence of them (one per device), as a list."""
  return list(refiner) if isinstance(refiner, (list, tuple)) else [refiner]


# ---------------------------------------------------------------------------------------------
# Provenance: the manifest.


def run_settings(refiner, scales: Sequence[float], checkpoint: Optional[str] = None,
                 orientation: str = "stored") -> Dict:
  """The manifest of a run: the model's fingerprint, the scales, dtype, plan, ``min_side`` and
  how EXIF orientation is read (``SETTINGS``) and, for information, the checkpoint path."""
  fp = getattr(refiner, "fingerprint", None)
  if fp is None:
    fp = ckpt.fingerprint(refiner.config, refiner.variables)
  return {"format": MANIFEST_FORMAT, "fingerprint": fp,
          "scales": [scale_key(s) for s in scales],
          "dtype": str(getattr(refiner, "dtype", "float32")),
          "plan": str(getattr(refiner, "plan", DEFAULT_PLAN)),
          "min_side": int(getattr(refiner, "min_side", 0)),
          "orientation": orientation,
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
    raise InputError(f"{path}: unreadable manifest ({one_line(e)}); remove it, or pass "
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
                   is_output: Callable[[str], bool], results_file: str) -> None:
  """Makes ``out_dir`` hold outputs of ``settings`` only, then writes its manifest.

  Outputs (files for which ``is_output(name)`` holds: the masks of the run's layout) made with other settings (or without a
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
# The run.


def start_output(out_dir: str, inputs: Sequence[str], settings: Callable[[], Dict],
                 overwrite: bool, log: Log, processes: Processes,
                 lock: Optional[FolderLock] = None, **prepare) -> Dict:
  """The output folder made ready on every process: checked (``check_output_dir``), ``lock``
  taken (process 0's: a second run into the folder is refused), then on process 0 the leftovers
  of killed runs removed and the manifest prepared (``prepare_output``, keyword arguments passed
  on), while no process writes; an error on any process stops all. Returns the settings
  (``settings()``, called on every process)."""
  def step():
    check_output_dir(out_dir, inputs)
    if lock is not None:
      lock.acquire()
    blob = settings()
    if processes.is_main:
      remove_leftovers(out_dir)
      prepare_output(out_dir, blob, overwrite, log, **prepare)
    return blob
  return run_together(processes, step, _SETUP_ERRORS)


def load_refiners(refiner, checkpoint: Optional[str], devices: Optional[int] = None,
                  min_side: Optional[int] = None, log: Optional[Log] = None,
                  export: Optional[str] = None, **kwargs) -> list:
  """``refiner`` as a list (``as_refiners``) or, when it is None, one
  ``crm_jax.refine.Refiner`` per local device (``devices``: the first N; default all) with the
  checkpoint read once; keyword arguments go to ``Refiner``. ``min_side`` None: the
  checkpoint's recommendation (``crm_jax.checkpoint.resolve_min_side``), with a note to ``log``
  when it is not 0. ``export``: a ``crm_jax.export`` folder of this checkpoint whose programs
  the refiners run (the fused plan, the export's dtype; no tracing)."""
  if refiner is not None:
    return as_refiners(refiner)
  if not checkpoint:
    raise InputError("no --checkpoint given")
  min_side, note = ckpt.resolve_min_side(min_side, checkpoint)
  if note is not None and log is not None:
    log(f"note: {note}")
  config, variables = ckpt.load_model(checkpoint)
  exported = None
  if export:
    exported = export_lib.load_fused(export)
    exported.check_variables(config, variables)
    kwargs.update(exported.refiner_kwargs())
  refiners = local_refiners(config, variables, devices, min_side=min_side, **kwargs)
  for r in refiners:
    r.exported = exported
  return refiners


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
  maybe_initialize_distributed()
  return Processes()




class NothingToRefine(InputError):
  """A dataset listing that found nothing to refine; ``problems`` holds one line per file or
  object left out (``run_dataset`` prints them before the error)."""

  def __init__(self, message: str, problems: Sequence[str]):
    super().__init__(message)
    self.problems = list(problems)


@dataclasses.dataclass
class DatasetRun:
  """What ``run_dataset`` did: the manifest written (``settings``), this process's place, the
  jobs in the data's order, the refinement summary of every process, and every object or file
  that was not refined (``skipped``: the listing's lines, then the failures)."""
  settings: Dict
  processes: Processes
  jobs: List[Job]
  summary: RunSummary
  skipped: List[str]
  start: float

  def done_names(self) -> List[str]:
    """The jobs complete in the output folder (refined now or before), in the data's order."""
    done = set(self.summary.skipped_complete) | set(self.summary.refined)
    return [j.name for j in self.jobs if j.name in done]


def run_dataset(out_dir: str, inputs: Sequence[str],
                list_jobs: Callable[[], Tuple[List[Job], List[str]]], scales: Sequence[float],
                finish: Callable[[DatasetRun], object], *, checkpoint: Optional[str] = None,
                refiner=None, min_side: Optional[int] = None, dtype: str = "float32",
                plan: str = "auto", batch_size: int = 1, devices: Optional[int] = None,
                overwrite: bool = False, progress: bool = True, log: Log = print,
                all_processes: Optional[bool] = None, export: Optional[str] = None,
                orientation: str = "stored", **prepare) -> Tuple[DatasetRun, object]:
  """The dataset run of ``evaluate`` and folder mode; returns ``(run, finish(run))``.

  ``list_jobs()`` gives the jobs in the data's order and one line per object left out;
  ``refiner`` (one ``Refiner`` or a list) or ``checkpoint`` gives the models (``load_refiners``:
  ``min_side``, ``dtype``, ``plan``, ``devices``). The output folder is checked and prepared
  (``start_output``; keyword arguments go to ``prepare_output``), every job not complete is
  refined (``crm_jax.dispatch.refine_jobs``), then ``finish(run)`` runs on process 0 and every
  process returns its value (JSON-able). An error on any process stops every process.
  ``orientation``: how the jobs read EXIF orientation (``crm_jax.io.ORIENTATIONS``), recorded in
  the manifest.
  """
  start = time.time()
  scales = check_scales(scales)
  min_side = None if min_side is None else check_min_side(min_side)
  processes = join_processes(batch_size, refiner, all_processes)
  state = {}

  def settings():
    try:
      state["jobs"], state["problems"] = list_jobs()
    except NothingToRefine as e:
      if processes.is_main:
        for p in e.problems:
          log(f"skipped {p}")
      raise
    state["refiners"] = load_refiners(refiner, checkpoint, devices, dtype=dtype, plan=plan,
                                      min_side=min_side, log=log if processes.is_main else None,
                                      export=export)
    return run_settings(state["refiners"][0], scales, checkpoint, orientation)

  existed = os.path.isdir(out_dir)
  lock = FolderLock(out_dir) if processes.is_main else None
  try:
    blob = start_output(out_dir, inputs, settings, overwrite, log, processes, lock, **prepare)
    if processes.is_main:
      for p in state["problems"]:
        log(f"skipped {p}")
    summary = refine_jobs(state["jobs"], scales, state["refiners"], batch_size=batch_size,
                          progress=progress and processes.is_main, log=log, processes=processes)
    run = DatasetRun(blob, processes, state["jobs"], summary,
                     state["problems"] + summary.failed, start)

    def step():
      if not processes.is_main:
        return None
      if processes.count > 1:
        for line in host_lines(summary):
          log(line)
      return finish(run)

    return run, run_together(processes, step, share_main=True)
  except BaseException:
    if lock is not None and lock.fd is not None and not existed:
      _remove_if_unused(out_dir)  # a folder this run made and nothing was written into
    raise
  finally:
    if lock is not None:
      lock.release()


def _remove_if_unused(folder: str) -> None:
  try:
    if not os.listdir(folder):
      os.rmdir(folder)
  except OSError:
    pass
