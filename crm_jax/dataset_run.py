"""The one dataset run of ``crm-evaluate`` and folder mode (``run``), and its output folder.

``run`` reads top to bottom: lock the folder and load one ``Refiner`` per local device; process
0 removes leftovers of killed runs and writes the manifest; one barrier shares its list of
complete objects (and any error); every process refines its share on a thread per device,
each output written atomically; one barrier merges the per-process results. The manifest
says what made the masks: a run with the same settings resumes, one with others is refused
unless ``overwrite``. For users: docs/refining.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
from tqdm import tqdm

from crm_jax import checkpoint as ckpt
from crm_jax import distributed
from crm_jax import export as export_lib
from crm_jax.folder_lock import FolderLock
from crm_jax.io import InputError, InputWarning
from crm_jax.outputs import check_output_dir, remove_leftovers, write_text
from crm_jax.metrics import scale_key
from crm_jax.outputs import one_line
from crm_jax.parallel import Item, Log, local_refiners, rate, refine_share, share
from crm_jax.scales import check_min_side, check_scales, small_images_line

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "crm-jax-output"
SETTINGS = ("fingerprint", "scales", "dtype", "plan", "min_side", "orientation", "labels")
SETTING_DEFAULTS = {"min_side": 0, "orientation": "stored", "labels": None}  # older manifests
DEFAULT_PLAN = "banded"  # for a refiner that does not name its execution plan
_BAR = "{desc}: {n_fmt}/{total_fmt} objects |{bar}| {elapsed} elapsed, {remaining} left{postfix}"


def start(out_dir: str, inputs: Sequence[str], scales: Sequence[float], min_side: Optional[int],
          batch_size: int, all_processes: bool) -> Tuple[float, ...]:
  """Before any listing: the run's arguments and output folder checked (the scales returned as a
  tuple) and, with ``all_processes``, this process joined to a multi-host run (``JAX_*``)."""
  check_output_dir(out_dir, inputs, create=False)
  scales = check_scales(scales)
  if min_side is not None:
    check_min_side(min_side)
  if batch_size < 1:
    raise InputError(f"batch size {batch_size}: must be at least 1")
  if all_processes:
    distributed.maybe_initialize_distributed()
  return scales


def write_json(path: str, blob) -> None:
  """Writes JSON atomically (``crm_jax.io.write_text``)."""
  write_text(path, json.dumps(blob, indent=2, allow_nan=False) + "\n")


def run_settings(refiner, scales: Sequence[float], checkpoint: Optional[str] = None,
                 orientation: str = "stored", labels: Optional[Dict] = None) -> Dict:
  """The manifest of a run: what the masks depend on (``SETTINGS``; ``labels``: None, or
  ``{"ignore": id}`` for label maps) and the checkpoint path."""
  fp = getattr(refiner, "fingerprint", None) or ckpt.fingerprint(refiner.config,
                                                                  refiner.variables)
  return {"format": MANIFEST_FORMAT, "fingerprint": fp,
          "scales": [scale_key(s) for s in scales],
          "dtype": str(getattr(refiner, "dtype", "float32")),
          "plan": str(getattr(refiner, "plan", DEFAULT_PLAN)),
          "min_side": int(getattr(refiner, "min_side", 0)),
          "orientation": orientation, "labels": labels,
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


def prepare_output(out_dir: str, settings: Dict, overwrite: bool, log: Log,
                   is_output: Callable[[str], bool], results_file: str) -> None:
  """Makes ``out_dir`` hold outputs of ``settings`` only, then writes its manifest: outputs
  (``is_output(file name)``) made otherwise are refused, or removed with ``overwrite``."""
  old = read_manifest(out_dir)
  setting = lambda m, k: m.get(k, SETTING_DEFAULTS.get(k))  # noqa: E731
  if old is not None and all(setting(old, k) == settings[k] for k in SETTINGS):
    return
  existing = sorted(f for f in os.listdir(out_dir)
                    if is_output(f) and os.path.isfile(os.path.join(out_dir, f)))
  if existing:
    if not overwrite:
      if old is None:
        why = f"no {MANIFEST_FILE} says what made them"
      else:
        why = "made with " + "; ".join(
            f"{k} {setting(old, k)}"
            + (f" (checkpoint {old.get('checkpoint')})" if k == "fingerprint" else "")
            + f" instead of {settings[k]}" for k in SETTINGS if setting(old, k) != settings[k])
      raise InputError(f"{out_dir}: holds {len(existing)} output file(s) {why}; choose another "
                       "--output, or pass --overwrite to refine everything again")
    for f in [results_file] + existing:
      if os.path.exists(os.path.join(out_dir, f)):
        os.remove(os.path.join(out_dir, f))
    log(f"--overwrite: removed {len(existing)} output file(s) of another run from {out_dir}")
  write_json(os.path.join(out_dir, MANIFEST_FILE), settings)


def load_refiners(refiner, checkpoint: Optional[str], devices: Optional[int] = None,
                  min_side: Optional[int] = None, log: Optional[Log] = None,
                  export: Optional[str] = None, **kwargs) -> list:
  """``refiner`` as a list, or one ``Refiner`` per local device from ``checkpoint`` (read
  once); ``min_side`` None: the checkpoint's recommendation (a ``note:`` line to ``log``);
  ``export``: a ``crm-export`` folder whose programs run the fused plan."""
  if refiner is not None:
    return list(refiner) if isinstance(refiner, (list, tuple)) else [refiner]
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


@dataclasses.dataclass
class Outcome:
  """What a run did over every process: the manifest, names complete before (``complete``) and
  refined now, ``skipped`` lines (the listing's, then the failures'), the records ``handle``
  returned, seconds per object, one summary per process (``hosts``)."""
  settings: Dict
  complete: List[str]
  refined: List[str]
  skipped: List[str]
  records: Dict[str, object]
  object_seconds: Dict[str, float]
  hosts: List[Dict]
  refine_seconds: float
  start: float

  @property
  def seconds_per_object(self) -> Optional[float]:
    return self.refine_seconds / len(self.refined) if self.refined else None


@contextlib.contextmanager
def _input_warnings_to(log: Log):
  """Every ``InputWarning`` (a file read by a rule that guessed) as a ``warning:`` line."""
  with warnings.catch_warnings():
    warnings.simplefilter("always", InputWarning)
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
      if issubclass(category, InputWarning):
        log(f"warning: {message}")
      else:
        shown(message, category, *args, **kwargs)
    warnings.showwarning = show
    yield


def run(out_dir: str, inputs: Sequence[str], items: Sequence[Item], problems: Sequence[str],
        scales: Sequence[float], handle: Callable, *, is_complete: Callable[[Item], bool],
        is_output: Callable[[str], bool], results_file: str, refiner=None,
        checkpoint: Optional[str] = None, min_side: Optional[int] = None,
        dtype: str = "float32", plan: str = "auto", batch_size: int = 1,
        devices: Optional[int] = None, overwrite: bool = False, progress: bool = True,
        log: Log = print, export: Optional[str] = None, orientation: str = "stored",
        keep: Optional[Sequence[float]] = None, labels: Optional[Dict] = None) -> Outcome:
  """Refines every item not complete in ``out_dir`` (checked first: ``check_output_dir``) on
  every local device and process; ``handle(item, loaded, probs)`` writes an item's outputs
  (the one that makes it complete last) and may return a JSON-able record. An error on any
  process (setup, an output that cannot be written) stops every process; a bad item is skipped
  and reported. ``labels`` (``{"ignore": id}``): items load label maps (``refine_share``)."""
  start, main = time.time(), jax.process_index() == 0
  say = log if not (progress and main) else (lambda m: _bar_safe(log, m))
  existed = os.path.isdir(out_dir)
  lock = FolderLock(out_dir) if main else None
  try:
    error, complete, refiners, settings = None, [], [], {}
    try:
      check_output_dir(out_dir, inputs)
      if lock is not None:
        lock.acquire()
      refiners = load_refiners(refiner, checkpoint, devices, min_side, log if main else None,
                               export, dtype=dtype, plan=plan)
      settings = run_settings(refiners[0], scales, checkpoint, orientation, labels)
      if main:
        remove_leftovers(out_dir)
        prepare_output(out_dir, settings, overwrite, log, is_output, results_file)
        complete = [it.name for it in items if is_complete(it)]
    except (InputError, OSError, ckpt.CheckpointError) as e:
      if jax.process_count() == 1:
        raise
      error = e
    # The start barrier: any process's setup error stops all; process 0's list of complete
    # objects is everyone's (it looked after removing outputs, before anyone wrote).
    names = hashlib.sha256("\n".join(it.name for it in items).encode()).hexdigest()
    gathered = distributed.gather([names, complete], error)
    if len({g[0] for g in gathered}) > 1:
      raise InputError("the processes see different objects to refine (is the data and output "
                       "folder shared by every host?)")
    complete = gathered[0][1]
    done = set(complete)
    todo = [it for it in items if it.name not in done]
    if main:
      for p in problems:
        log(f"skipped {p}")
      if complete:
        log(f"{len(complete)} object(s) already complete: skipped")
      small = None if refiners[0].min_side else small_images_line(
          [(it.name, it.size) for it in todo], scales)
      if small is not None:
        log(small)
    mine = share(todo, batch_size, refiners[0].bucket_of)
    with tqdm(total=sum(map(len, mine)), desc="refining", unit="object", bar_format=_BAR,
              disable=not (progress and main), dynamic_ncols=True) as bar, \
        _input_warnings_to(say):
      result = refine_share(mine, refiners, scales, handle, log=say,
                            bar=bar if progress and main else None, keep=keep,
                            ignore=None if labels is None else labels["ignore"],
                            labels=labels is not None)
    # The end barrier: every process's result (and error).
    every = distributed.gather({
        "refined": result.refined, "failed": result.failed, "records": result.records,
        "object_seconds": result.object_seconds, "seconds": result.seconds,
        "pixels": result.pixels, "devices": result.devices}, result.error)
    hosts = [{"process": i, "devices": r["devices"], "refined": len(r["refined"]),
              "failed": len(r["failed"]), "seconds": r["seconds"], "pixels": r["pixels"]}
             for i, r in enumerate(every)]
    if main and len(every) > 1:
      for h in hosts:
        log(f"process {h['process']} ({h['devices']} device(s)): refined {h['refined']} "
            f"object(s), {h['failed']} skipped, {h['seconds']:.1f} s, "
            f"{rate(h['pixels'], h['seconds'])}")
    seconds = {n: s for r in every for n, s in r["object_seconds"].items()}
    return Outcome(settings, complete, sorted(n for r in every for n in r["refined"]),
                   list(problems) + sorted(f for r in every for f in r["failed"]),
                   {n: v for r in every for n, v in r["records"].items()},
                   {n: seconds[n] for n in sorted(seconds)}, hosts,
                   max(r["seconds"] for r in every), start)
  except BaseException:
    if lock is not None and lock.fd is not None and not existed:
      with contextlib.suppress(OSError):
        if not os.listdir(out_dir):
          os.rmdir(out_dir)  # a folder this run made and nothing was written into
    raise
  finally:
    if lock is not None:
      lock.release()


def _bar_safe(log: Log, message: str) -> None:
  with tqdm.external_write_mode():
    log(message)
