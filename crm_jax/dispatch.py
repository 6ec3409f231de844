"""Dispatch: a dataset's jobs to the worker threads of the local devices and to the hosts.

Owns ``Job`` (one object: load, write, is it complete), the schedule (batches by bucket, largest
first; ``assign_shares`` gives each process its share with no message sent), ``refine_jobs``
(one thread per local ``Refiner``), the processes of a multi-host run (``Processes``:
``allgather``, ``agree``; ``run_together``) and the progress bar. How work is spread over devices
and hosts, and the figures: docs/devices.md.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from crm_jax.io import InputError, os_error_line
from crm_jax.refine import Refiner
from crm_jax.scales import check_scales, small_images_line

Log = Callable[[str], None]  # where a run's lines go (``print`` on the command line)
POLL_SECONDS = 5.0  # how often process 0 looks for the other processes' finished objects
# How long a process waits for the others. A dead process ends the run sooner: the coordination
# service misses its heartbeats and terminates the others (about 100 s, measured).
_WAIT_MS = 7 * 24 * 3600 * 1000
_KV_CHUNK = 1 << 20  # characters per value in the coordination service's key-value store

_BAR_FORMAT = ("{desc}: {n_fmt}/{total_fmt} objects |{bar}| {elapsed} elapsed, {remaining} "
               "left{postfix}")


# ---------------------------------------------------------------------------------------------
# Jobs and their schedule.


@dataclasses.dataclass(frozen=True)
class Job:
  """One object of a dataset.

  Attributes:
    name: unique within the dataset.
    load: ``() -> (image RGB uint8 [H, W, 3], mask uint8 [H, W], extra)``; raises
      ``InputError`` naming the file and the problem.
    write: ``(loaded, {scale: prob [H, W] float32}) -> None`` writes the object's files, each
      atomically, the one that makes it complete last.
    is_complete: whether its outputs are all there (a resumed run skips it).
    size: ``() -> (H, W)`` without decoding (a file header), or None when unknown.
  """
  name: str
  load: Callable[[], tuple]
  write: Callable[[tuple, Dict[float, np.ndarray]], None]
  is_complete: Callable[[], bool]
  size: Callable[[], Optional[Tuple[int, int]]] = lambda: None


@dataclasses.dataclass(frozen=True)
class Item:
  """A job to refine, with its pixel count (0 when unknown) and bucket (None: batched alone)."""
  job: Job
  pixels: int
  bucket: Optional[tuple]


def make_batches(items: Sequence[Item], batch_size: int = 1) -> List[List[Item]]:
  """Items in batches of up to ``batch_size`` of one bucket, the largest items first; the
  batches ordered by their pixel count, largest first (ties by the first name)."""
  order = sorted(items, key=lambda it: (-it.pixels, it.job.name))
  if batch_size <= 1:
    return [[it] for it in order]
  groups: Dict[object, List[Item]] = {}
  for it in order:
    key = it.bucket if it.bucket is not None else ("alone", it.job.name)
    groups.setdefault(key, []).append(it)
  batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
  return sorted(batches, key=lambda b: (-sum(it.pixels for it in b), b[0].job.name))


def assign_shares(batches: Sequence[List[Item]], count: int) -> List[List[List[Item]]]:
  """``count`` shares of ``batches`` (kept in order): each batch goes to the share with the
  fewest pixels so far, the lowest index on a tie. Deterministic: every process computes it."""
  shares: List[List[List[Item]]] = [[] for _ in range(count)]
  load = [0] * count
  for batch in batches:
    k = min(range(count), key=lambda i: (load[i], i))
    shares[k].append(batch)
    load[k] += max(1, sum(it.pixels for it in batch))
  return shares


# ---------------------------------------------------------------------------------------------
# Processes.


_ALLGATHER_CALLS = itertools.count(1)


class Processes:
  """This process's place among the processes of the run (one when not distributed)."""

  def __init__(self, index: Optional[int] = None, count: Optional[int] = None):
    if index is None or count is None:
      index, count = jax.process_index(), jax.process_count()
    self.index, self.count = index, count

  @property
  def is_main(self) -> bool:
    return self.index == 0

  def allgather(self, value) -> list:
    """Every process's ``value`` (anything JSON can write), in process order; a barrier: no
    process returns before every process has called it.

    Through the key-value store of JAX's coordination service (the ``jax.distributed`` client,
    ``coordination_client``), not a collective: a collective on the CPU (gloo) gives up after
    30 s, and processes wait here for each other's whole share. Where a JAX version no longer
    exposes that client, a collective (``allgather_by_collective``) does the same.
    """
    if self.count == 1:
      return [value]
    client = coordination_client()
    if client is None:
      return allgather_by_collective(value)
    # Numbered over the whole process (every process makes the same sequence of calls), so a
    # second run in the same processes (validation during training) never reuses a key.
    prefix = f"crm_jax/allgather/{next(_ALLGATHER_CALLS)}"
    text = json.dumps(value)
    chunks = [text[i:i + _KV_CHUNK] for i in range(0, len(text), _KV_CHUNK)] or [""]
    for k, chunk in enumerate(chunks):
      client.key_value_set(f"{prefix}/{self.index}/{k}", chunk)
    client.key_value_set(f"{prefix}/{self.index}/n", str(len(chunks)))
    out = []
    for i in range(self.count):
      n = int(client.blocking_key_value_get(f"{prefix}/{i}/n", _WAIT_MS))
      out.append(json.loads("".join(client.blocking_key_value_get(f"{prefix}/{i}/{k}", _WAIT_MS)
                                    for k in range(n))))
    return out

  def agree(self, error: Optional[str] = None, value=None):
    """A barrier that fails together: ``InputError`` on every process when any process passes
    an ``error`` (the first one, with its process index when there are several processes).
    Returns process 0's ``value`` (anything JSON can write) on every process."""
    gathered = self.allgather([error, value])
    for i, (e, _) in enumerate(gathered):
      if e is not None:
        raise InputError(e if self.count == 1 or i == self.index else f"process {i}: {e}")
    return gathered[0][1]


def coordination_client():
  """The ``jax.distributed`` coordination-service client, or None where there is none.

  JAX has no public handle on it: it is ``jax._src.distributed.global_state.client`` (present,
  with ``key_value_set`` and ``blocking_key_value_get``, in JAX 0.10 and 0.11). A JAX without it
  gives None, and ``Processes.allgather`` uses a collective instead.
  """
  try:
    from jax._src import distributed  # private JAX: may be missing in a later version
    client = distributed.global_state.client
  except (ImportError, AttributeError):
    return None
  if client is None or not all(hasattr(client, m)
                               for m in ("key_value_set", "blocking_key_value_get")):
    return None
  return client


def allgather_by_collective(value) -> list:
  """``Processes.allgather`` through ``multihost_utils.process_allgather`` (public JAX): every
  process's ``value`` as JSON bytes, padded to the longest, in process order. A collective: on
  the CPU (gloo) it fails when a process arrives more than 30 s after the others."""
  data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
  lengths = lengths.reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(bytes(rows[i, :n]).decode("utf-8")) for i, n in enumerate(lengths)]


def run_together(processes: Processes, step: Callable[[], object],
                 errors: Tuple[type, ...] = (InputError, OSError), share_main: bool = False):
  """``step()`` on every process, then a barrier. An error of ``errors`` on one process is
  raised there as it is, and as an ``InputError`` naming that process on every other one (so
  none waits for a process that has left).

  ``share_main``: every process returns process 0's value (JSON-able), carried by the barrier
  itself, so that no process reads a file that process 0 wrote and may remove next.
  """
  try:
    out = step()
  except errors as e:
    if processes.count > 1:
      try:
        processes.agree(_error_line(e))
      except InputError:
        pass
    raise
  if processes.count == 1:
    return out
  shared = processes.agree(None, out if share_main and processes.is_main else None)
  return shared if share_main else out


# ---------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class RunSummary:
  """What a run did, over every process.

  ``refined`` and ``skipped_complete`` are names; ``failed`` holds ``"name: reason"`` lines;
  ``object_seconds`` the seconds each refined object took (a batch's time shared evenly);
  ``hosts`` one ``{"process", "devices", "refined", "failed", "seconds", "pixels"}`` per
  process.
  """
  refined: List[str]
  skipped_complete: List[str]
  failed: List[str]
  seconds: float
  object_seconds: Dict[str, float]
  hosts: List[Dict]

  @property
  def seconds_per_object(self) -> Optional[float]:
    return self.seconds / len(self.refined) if self.refined else None


def one_line(e: BaseException) -> str:
  """An error's message on one line."""
  return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


class _Run:
  """One process's share on its local devices (the threads of ``refine_jobs``)."""

  def __init__(self, scales, batch_size: int, log: Log, bar):
    self.scales = scales
    self.batch_size = batch_size
    self.log = log
    self.bar = bar
    self.lock = threading.Lock()
    self.load_lock = threading.Lock()  # warnings.catch_warnings is process-wide
    self.queue: collections.deque = collections.deque()
    self.refined: List[str] = []
    self.failed: List[str] = []
    self.object_seconds: Dict[str, float] = {}
    self.pixels = 0
    self.other_pixels = 0  # of the other processes' objects seen complete (process 0's bar)
    self.start = time.time()
    self.error: Optional[BaseException] = None

  def say(self, msg: str) -> None:
    with self.lock, tqdm.external_write_mode():
      self.log(msg)

  def fail(self, name: str, e: BaseException) -> None:
    # RuntimeError: XLA errors such as running out of device memory on one huge image.
    reason = one_line(e)
    if not isinstance(e, InputError):
      reason = f"{type(e).__name__}: {reason}"
    with self.lock:
      self.failed.append(f"{name}: {reason}")
    self.say(f"skipped {name}: {reason}")

  def finished(self, names: Sequence[str], pixels: int = 0, other: bool = False) -> None:
    with self.lock:
      if other:
        self.other_pixels += pixels
      else:
        self.pixels += pixels
      if self.bar is not None:
        _set_rate(self.bar, self.pixels + self.other_pixels, time.time() - self.start)
        self.bar.update(len(names))

  def load(self, item: Item):
    """The item's loaded tuple, or None (reported) when it cannot be refined."""
    try:
      with self.load_lock, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = item.job.load()
      for w in caught:
        self.say(f"warning: {w.message}")
      check_scales(self.scales, loaded[0].shape[:2])
      return loaded
    except (InputError, MemoryError, RuntimeError) as e:
      self.fail(item.job.name, e)
      return None

  def refine_batch(self, refiner, batch: List[Item]) -> None:
    t0 = time.time()
    loaded = [(it, self.load(it)) for it in batch]
    bad = [it.job.name for it, x in loaded if x is None]
    group = [(it, x) for it, x in loaded if x is not None]
    if bad:
      self.finished(bad)
    if not group:
      return
    try:
      if self.batch_size == 1:
        results = [refiner.refine_all_scales(group[0][1][0], group[0][1][1], self.scales)]
      else:
        results = refiner.refine_batch_all_scales([x[0] for _, x in group],
                                                  [x[1] for _, x in group], self.scales)
    except (InputError, MemoryError, RuntimeError) as e:
      # crm_jax.refine.BatchInputError: the pairs it names failed, the others were refined.
      failures = getattr(e, "bad", None)
      if failures is None:
        for it, _ in group:
          self.fail(it.job.name, e)
        self.finished([it.job.name for it, _ in group])
        return
      results = e.results
      for i, message in failures.items():
        self.fail(group[i][0].job.name, InputError(message))
    each = (time.time() - t0) / len(group)
    for (it, x), probs in zip(group, results):
      if probs is not None:
        it.job.write(x, probs)
        with self.lock:
          self.refined.append(it.job.name)
          self.object_seconds[it.job.name] = each
      self.finished([it.job.name], int(np.prod(x[0].shape[:2])) if probs is not None else 0)

  def work(self, refiner) -> None:
    while True:
      with self.lock:
        if self.error is not None or not self.queue:
          return
        batch = self.queue.popleft()
      try:
        self.refine_batch(refiner, batch)
      except BaseException as e:  # an output that cannot be written: stop every thread
        with self.lock:
          if self.error is None:
            self.error = e
        return


def _fingerprint(names: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def refine_jobs(jobs: Sequence[Job], scales: Sequence[float], refiners: Sequence, *,
                batch_size: int = 1, progress: bool = True, log: Log = print,
                processes: Optional[Processes] = None) -> RunSummary:
  """Refines every job that is not complete, this process's share on every Refiner of
  ``refiners`` (one per local device), and gathers the results of every process.

  ``refiners``: objects with ``refine_all_scales(image, mask, scales)``, and with
  ``batch_size > 1`` ``bucket_of(size)`` and ``refine_batch_all_scales`` (``crm_jax.refine``).
  Jobs that fail (bad input, an XLA error) are reported through ``log`` and listed in
  ``failed``; an ``OSError`` writing an output stops the run (on every process). Unless the
  refiners have a ``min_side``, one ``warning:`` line (process 0) counts the objects to refine
  whose header size is small for the scales (``crm_jax.scales.small_images_line``).
  Every process returns the same summary.
  """
  processes = processes or Processes(0, 1)
  refiners = list(refiners)
  complete = [j.name for j in jobs if j.is_complete()]
  done = set(complete)
  todo = [j for j in jobs if j.name not in done]
  # Every process must see the same list (they share the output folder and nobody has written).
  fingerprints = processes.allgather(_fingerprint([j.name for j in todo]))
  if len(set(fingerprints)) > 1:
    raise InputError("the processes see different objects to refine (is the data and output "
                     "folder shared by every host?)")
  if complete and processes.is_main:
    log(f"{len(complete)} object(s) already complete: skipped")
  items, sizes = [], []
  for j in todo:
    size = j.size()
    sizes.append((j.name, size))
    bucket = refiners[0].bucket_of(size) if batch_size > 1 and size is not None else None
    items.append(Item(j, int(np.prod(size)) if size else 0, bucket))
  small = None if getattr(refiners[0], "min_side", 0) else small_images_line(sizes, scales)
  if small is not None and processes.is_main:
    log(small)
  shares = assign_shares(make_batches(items, batch_size), processes.count)
  mine = shares[processes.index]
  start = time.time()  # compilation counts, loading the checkpoint does not
  show = progress and processes.is_main
  with tqdm(total=len(todo), desc="refining", unit="object", disable=not show,
            bar_format=_BAR_FORMAT, dynamic_ncols=True) as bar:
    run = _Run(scales, batch_size, log, bar if show else None)
    run.queue.extend(mine)
    threads = [threading.Thread(target=run.work, args=(r,), daemon=True) for r in refiners]
    for t in threads:
      t.start()
    # Process 0's bar counts the other processes' objects too, until every result is gathered.
    others = [it for k, share in enumerate(shares) if k != processes.index
              for batch in share for it in batch]
    stop = threading.Event()
    poller = threading.Thread(target=_poll_others, args=(others, run, stop), daemon=True)
    if show and others:
      poller.start()
    for t in threads:
      t.join()
    local_seconds = time.time() - start
    error = run.error
    mine_result = {"process": processes.index, "refined": run.refined, "failed": run.failed,
                   "object_seconds": run.object_seconds, "seconds": local_seconds,
                   "pixels": run.pixels, "devices": len(refiners),
                   "error": None if error is None else _error_line(error)}
    every = processes.allgather(mine_result)
    stop.set()
    if poller.is_alive():
      poller.join()
    if show:
      bar.update(len(todo) - bar.n)
      _set_rate(bar, sum(r["pixels"] for r in every), time.time() - start)
  if error is not None:
    raise error
  for r in every:
    if r["error"] is not None:
      raise InputError(f"process {r['process']}: {r['error']}")
  refined = sorted(n for r in every for n in r["refined"])
  failed = sorted(f for r in every for f in r["failed"])
  seconds = {n: s for r in every for n, s in r["object_seconds"].items()}
  hosts = [{"process": r["process"], "devices": r["devices"], "refined": len(r["refined"]),
            "failed": len(r["failed"]), "seconds": r["seconds"], "pixels": r["pixels"]}
           for r in every]
  return RunSummary(refined, complete, failed, time.time() - start,
                    {n: seconds[n] for n in sorted(seconds)}, hosts)


def _error_line(e: BaseException) -> str:
  if isinstance(e, OSError):
    return os_error_line(e)
  if isinstance(e, ValueError):  # InputError, CheckpointError: their message says it all
    return one_line(e)
  return f"{type(e).__name__}: {one_line(e)}"


def _poll_others(others: List[Item], run: _Run, stop: threading.Event) -> None:
  """Every ``POLL_SECONDS`` until ``stop``: counts the other processes' objects that became
  complete (process 0's progress)."""
  while others and not stop.wait(POLL_SECONDS):
    found = [it for it in others if it.job.is_complete()]
    if found:
      names = {it.job.name for it in found}
      others[:] = [it for it in others if it.job.name not in names]
      run.finished(sorted(names), sum(it.pixels for it in found), other=True)


def _rate(pixels: int, seconds: float) -> str:
  rate = pixels / seconds if seconds > 0 else 0.0
  return f"{rate / 1e6:.2f} Mpixel/s" if rate >= 1e6 else f"{rate / 1e3:.1f} kpixel/s"


def _set_rate(bar, pixels: int, seconds: float) -> None:
  bar.set_postfix_str(_rate(pixels, seconds), refresh=False)


def host_lines(summary: RunSummary) -> List[str]:
  """One line per process: objects refined and failed, seconds, pixels per second."""
  lines = []
  for h in summary.hosts:
    lines.append(f"process {h['process']} ({h['devices']} device(s)): refined {h['refined']} "
                 f"object(s), {h['failed']} skipped, {h['seconds']:.1f} s, "
                 f"{_rate(h['pixels'], h['seconds'])}")
  return lines


def local_refiners(config, variables, devices: Optional[int] = None, **kwargs) -> List:
  """One ``crm_jax.refine.Refiner`` per local device (the first ``devices`` of them; default
  all), sharing the parameters' host copy. They give no ``SmallImageWarning`` (unless
  ``warn_small=True`` is passed): ``refine_jobs`` prints one line for the whole run."""
  local = jax.local_devices()
  if devices is not None:
    if devices < 1:
      raise InputError(f"--devices {devices}: must be at least 1")
    if devices > len(local):
      raise InputError(f"--devices {devices}: this process has {len(local)} local device(s)")
    local = local[:devices]
  kwargs = {"warn_small": False, **kwargs}
  return [Refiner(config, variables, device=d, **kwargs) for d in local]
