"""Refining many pairs on every local device and host: one ``Refiner`` per local device, a
deterministic share per process, a thread per device (docs/devices.md)."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from crm_jax.io import InputError
from crm_jax.outputs import error_line
from crm_jax.refine import Refiner

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Item:
  """One object: ``load() -> (image RGB uint8 [H, W, 3], mask uint8 [H, W], *extra)``, raising
  ``InputError`` naming the file; ``size``: ``(H, W)`` from the file header, or None."""
  name: str
  load: Callable[[], tuple]
  size: Optional[Tuple[int, int]] = None

  @property
  def pixels(self) -> int:
    return int(np.prod(self.size)) if self.size else 0


def local_refiners(config, variables, devices: Optional[int] = None, **kwargs) -> List[Refiner]:
  """One ``Refiner`` per local device (the first ``devices``; default all); no
  ``SmallImageWarning`` unless ``warn_small=True`` (a dataset run prints one line itself)."""
  local = jax.local_devices()
  if devices is not None:
    if devices < 1:
      raise InputError(f"--devices {devices}: must be at least 1")
    if devices > len(local):
      raise InputError(f"--devices {devices}: this process has {len(local)} local device(s)")
    local = local[:devices]
  kwargs = {"warn_small": False, **kwargs}
  return [Refiner(config, variables, device=d, **kwargs) for d in local]


def share(items: Sequence[Item], batch_size: int = 1, bucket_of: Optional[Callable] = None, *,
          index: Optional[int] = None, count: Optional[int] = None) -> List[List[Item]]:
  """Process ``index``'s batches (default: this process's, of ``jax.process_count()``): items
  in batches of up to ``batch_size`` of one bucket (``bucket_of(size)``), largest first, each
  batch given to the process with the fewest pixels so far. Every process computes the same
  split; no message is sent."""
  order = sorted(items, key=lambda it: (-it.pixels, it.name))
  groups: Dict[object, List[Item]] = {}
  for it in order:
    key = (bucket_of(it.size) if batch_size > 1 and it.size and bucket_of else ("alone", it.name))
    groups.setdefault(key, []).append(it)
  batches = sorted((g[i:i + batch_size] for g in groups.values()
                    for i in range(0, len(g), batch_size)),
                   key=lambda b: (-sum(it.pixels for it in b), b[0].name))
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  load, mine = [0] * count, []
  for batch in batches:
    k = min(range(count), key=lambda i: (load[i], i))
    load[k] += max(1, sum(it.pixels for it in batch))
    if k == index:
      mine.append(batch)
  return mine


@dataclasses.dataclass
class ShareResult:
  """What one process did: names refined, ``"name: reason"`` lines of failures, seconds per
  object (a batch's time shared evenly), pixels refined, and the error that stopped it."""
  refined: List[str] = dataclasses.field(default_factory=list)
  failed: List[str] = dataclasses.field(default_factory=list)
  object_seconds: Dict[str, float] = dataclasses.field(default_factory=dict)
  pixels: int = 0
  seconds: float = 0.0
  devices: int = 0
  error: Optional[BaseException] = None
  records: Dict[str, object] = dataclasses.field(default_factory=dict)


def refine_share(batches: Sequence[List[Item]], refiners: Sequence[Refiner],
                 scales: Sequence[float], handle: Callable, *, log: Log = print,
                 bar=None, keep: Optional[Sequence[float]] = None, labels: bool = False,
                 ignore: Optional[int] = None) -> ShareResult:
  """Refines ``batches`` on a thread per refiner; ``handle(item, loaded, probs)`` runs on that
  thread for every refined item (``probs``: ``{s: [H, W] float32}`` of the scales in ``keep``,
  default all) and may return a JSON-able record (kept in ``records``). A bad input or an XLA
  error fails its item (logged); any other error (an output that cannot be written) stops
  every thread and is the result's ``error``. ``bar``: a tqdm bar of objects, or None.
  ``labels``: items load ``(image, crm_jax.labels.LabelMap, ...)``, refined one image at a time
  by ``Refiner.refine_labels`` (``probs``: ``{last scale: refined label map}``)."""
  todo: "queue.SimpleQueue[List[Item]]" = queue.SimpleQueue()
  for b in batches:
    todo.put(b)
  result, lock, start = ShareResult(devices=len(refiners)), threading.Lock(), time.time()

  def fail(name: str, e: BaseException) -> None:
    with lock:
      result.failed.append(f"{name}: {error_line(e)}")
    log(f"skipped {name}: {error_line(e)}")

  def refine(refiner: Refiner, batch: List[Item]) -> None:
    t0, group = time.time(), []
    for it in batch:
      try:
        group.append((it, it.load()))
      except (InputError, MemoryError) as e:
        fail(it.name, e)
    if not group:
      if bar is not None:
        bar.update(len(batch))
      return
    try:
      if labels:
        results = [{scales[-1]: refiner.refine_labels(x[0], x[1].labels, ignore=ignore,
                                                      scales=scales)} for _, x in group]
      else:
        results = refiner.refine_batch_all_scales([x[0] for _, x in group],
                                                  [x[1] for _, x in group], scales, keep=keep)
    except (InputError, MemoryError, RuntimeError) as e:
      results = getattr(e, "results", [None] * len(group))  # BatchInputError: the good ones
      bad = getattr(e, "bad", {i: str(e) for i in range(len(group))})
      for i, message in bad.items():
        fail(group[i][0].name, InputError(message) if hasattr(e, "bad") else e)
    each = (time.time() - t0) / len(group)
    for (it, loaded), probs in zip(group, results):
      if probs is None:
        continue
      record = handle(it, loaded, probs)
      with lock:
        result.refined.append(it.name)
        result.object_seconds[it.name] = each
        result.pixels += int(np.prod(loaded[0].shape[:2]))
        if record is not None:
          result.records[it.name] = record
    if bar is not None:
      with lock:
        bar.set_postfix_str(rate(result.pixels, time.time() - start), refresh=False)
        bar.update(len(batch))

  def work(refiner: Refiner) -> None:
    while result.error is None:
      try:
        batch = todo.get_nowait()
      except queue.Empty:
        return
      try:
        refine(refiner, batch)
      except Exception as e:  # pylint: disable=broad-except
        with lock:
          result.error = result.error or e

  threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in refiners]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  result.seconds = time.time() - start
  return result


def rate(pixels: int, seconds: float) -> str:
  r = pixels / seconds if seconds > 0 else 0.0
  return f"{r / 1e6:.2f} Mpixel/s" if r >= 1e6 else f"{r / 1e3:.1f} kpixel/s"
