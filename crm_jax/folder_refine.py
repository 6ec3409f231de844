"""Folder mode of ``crm-refine``: every image of a folder with its coarse mask from another
folder (``IMAGES/<x>.<ext>`` with ``MASKS/<x><suffix>.png``), refined into
``OUTPUT/<x><suffix>.png`` (the last scale's ``uint8(p * 255)``) by ``crm_jax.dataset_run.run``,
and ``OUTPUT/summary.json``. For users: docs/refining.md.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from crm_jax import dataset_run
from crm_jax.constants import SCALES
from crm_jax.io import InputError, file_image_size, read_image, read_mask
from crm_jax.labels import IGNORE, LabelMap, classes_to_refine, read_labels, write_labels
from crm_jax.outputs import is_complete_output, write_image
from crm_jax.metrics import scale_key
from crm_jax.parallel import Item, Log
from crm_jax.preprocess import prob_to_uint8


class NothingToRefine(InputError):
  """A listing that found nothing to refine; ``problems``: one line per file left out."""

  def __init__(self, message: str, problems: Sequence[str]):
    super().__init__(message)
    self.problems = list(problems)


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXT = ".png"
SUMMARY_FILE = "summary.json"


def read_pair(image_path: str, mask_path: str, orientation: str = "stored",
              labels: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """The image (RGB uint8 ``[H, W, 3]``) and its coarse mask (uint8 ``[H, W]``; ``labels``: a
  ``LabelMap``), read by the rules of ``crm_jax.io`` (``orientation``: ``"stored"``, as
  published, or ``"exif"``, as viewers show them); ``InputError`` naming the file when one is
  unreadable or the sizes differ."""
  image = read_image(image_path, orientation)
  mask = read_labels(mask_path, orientation) if labels else read_mask(mask_path, orientation)
  size = mask.labels.shape if labels else mask.shape
  if image.shape[:2] != size:
    raise InputError(f"{mask_path}: {'label map' if labels else 'mask'} is {size[1]}x{size[0]} "
                     f"but {image_path} is {image.shape[1]}x{image.shape[0]}")
  return image, mask


@dataclasses.dataclass(frozen=True)
class FolderPair:
  """One image and its coarse mask; ``output`` is the refined mask's file name."""
  name: str
  image: str
  mask: str
  output: str


def _files(folder: str, what: str) -> List[str]:
  if not os.path.isdir(folder):
    raise InputError(f"{folder}: no such folder ({what})")
  try:
    names = os.listdir(folder)
  except OSError as e:
    raise InputError(f"{folder}: cannot be listed ({e.strerror or e})") from None
  return sorted(f for f in names
                if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))


def pair_folders(images: str, masks: str, suffix: str = "") -> Tuple[List[FolderPair], List[str]]:
  """The pairs of ``images`` and ``masks`` (see the module docstring), by name, and one line per
  file left out. ``InputError`` when a folder is missing; ``NothingToRefine`` (an
  ``InputError`` carrying those lines) when nothing pairs up."""
  image_files, mask_files = _files(images, "--images"), _files(masks, "--masks")
  problems: List[str] = []
  by_stem: Dict[str, List[str]] = {}
  for f in image_files:
    stem, ext = os.path.splitext(f)
    if ext.lower() in IMAGE_EXTS:
      by_stem.setdefault(stem, []).append(f)
    else:
      problems.append(f"{os.path.join(images, f)}: not an image (extensions: "
                      f"{' '.join(IMAGE_EXTS)})")
  mask_set = set(mask_files)
  claimed = set()
  pairs = []
  for stem, files in sorted(by_stem.items()):
    mask_name = stem + suffix + MASK_EXT
    if len(files) > 1:
      claimed.add(mask_name)
      problems.append(f"{stem}: ambiguous, several images of one name: "
                      + ", ".join(os.path.join(images, f) for f in files))
      continue
    if mask_name not in mask_set:
      problems.append(f"{os.path.join(images, files[0])}: no mask "
                      f"{os.path.join(masks, mask_name)}")
      continue
    claimed.add(mask_name)
    pairs.append(FolderPair(stem, os.path.join(images, files[0]), os.path.join(masks, mask_name),
                            mask_name))
  ending = suffix + MASK_EXT
  for f in mask_files:
    if f in claimed:
      continue
    if f.endswith(ending) and len(f) > len(ending):
      problems.append(f"{os.path.join(masks, f)}: no image {f[:-len(ending)]}.* in {images}")
    else:
      problems.append(f"{os.path.join(masks, f)}: not a mask name <name>{ending}")
  if not pairs:
    raise NothingToRefine(
        f"{images}, {masks}: no image pairs with a mask <name>{suffix}{MASK_EXT} "
        f"({len(problems)} file(s) left out, listed above)"
        + _suffix_hint(list(by_stem), mask_files, suffix), problems)
  return pairs, problems


def _suffix_hint(stems: Sequence[str], mask_files: Sequence[str], suffix: str) -> str:
  """``; ... --mask-suffix X`` when every mask is named ``<image stem>X.png`` for one X other
  than ``suffix``, else empty."""
  endings = set()
  for f in mask_files:
    if not f.endswith(MASK_EXT):
      return ""
    stem = f[:-len(MASK_EXT)]
    rests = [stem[len(s):] for s in stems if stem.startswith(s) and len(stem) > len(s)]
    if not rests:
      return ""
    endings.add(min(rests, key=len))
  if len(endings) != 1 or suffix in endings:
    return ""
  ending = endings.pop()
  return f"; every mask is named <image name>{ending}{MASK_EXT}: pass --mask-suffix {ending}"


def _is_png(file_name: str) -> bool:
  return not file_name.startswith(".") and file_name.lower().endswith(MASK_EXT)


def refine_folder(images: str, masks: str, out_dir: str, checkpoint: str, *,
                  suffix: str = "", scales: Sequence[float] = SCALES,
                  min_side: Optional[int] = None,
                  dtype: str = "float32", plan: str = "auto", batch_size: int = 1,
                  devices: Optional[int] = None, overwrite: bool = False,
                  progress: bool = True, log: Log = print, refiner=None,
                  export: Optional[str] = None, orientation: str = "stored",
                  labels: bool = False, ignore: int = IGNORE) -> Dict:
  """Refines every pair of ``pair_folders(images, masks, suffix)`` into ``out_dir`` on every
  local device and host; process 0 writes ``out_dir/summary.json``, which is returned.

  ``refiner``: a ``Refiner`` or one per device instead of ``checkpoint``. ``min_side``, dtype,
  ``plan``, ``export``: as ``Refiner`` (``min_side`` None: the checkpoint's recommendation).
  ``orientation``: ``"stored"`` (as published; EXIF orientation warned about) or ``"exif"``.
  ``labels``: the masks are label maps, refined into label maps (``Refiner.refine_labels``,
  ``ignore`` pixels kept; the classes of one image are its batch).
  Raises ``InputError`` (bad arguments or folders, before any work; nothing refined now or
  before), ``CheckpointError``, ``OSError`` (an output that cannot be written).
  """
  scales = dataset_run.start(out_dir, [images, masks], scales, min_side, batch_size,
                             all_processes=refiner is None)
  main = jax.process_index() == 0
  try:
    pairs, problems = pair_folders(images, masks, suffix)
  except NothingToRefine as e:
    for p in e.problems if main else ():
      log(f"skipped {p}")
    raise
  by_name = {p.name: p for p in pairs}
  def load(p):
    loaded = read_pair(p.image, p.mask, orientation, labels)
    if labels:  # a map with no class to refine is an error naming its file
      classes_to_refine(loaded[1].labels, None, ignore, p.mask)
    return loaded

  items = [Item(p.name, lambda p=p: load(p),
                None if orientation == "exif" else file_image_size(p.image))  # a tag may turn it
           for p in pairs]
  last = scales[-1]

  def write(item, loaded, probs):
    path = os.path.join(out_dir, by_name[item.name].output)
    if labels:
      write_labels(path, LabelMap(probs[last], loaded[1].palette))
    else:
      write_image(path, prob_to_uint8(probs[last]))

  run = dataset_run.run(
      out_dir, [images, masks], items, problems, scales, write,
      is_complete=lambda item: is_complete_output(os.path.join(out_dir,
                                                               by_name[item.name].output)),
      is_output=_is_png, results_file=SUMMARY_FILE, refiner=refiner, checkpoint=checkpoint,
      min_side=min_side, dtype=dtype, plan=plan, batch_size=1 if labels else batch_size,
      devices=devices, overwrite=overwrite, progress=progress, log=log, export=export,
      orientation=orientation, keep=(last,), labels={"ignore": ignore} if labels else None)
  if main:
    log(f"refined {len(run.refined)} of {len(pairs)} pair(s) into {out_dir} in "
        f"{run.refine_seconds:.1f} s, {len(run.complete)} already complete; "
        f"{len(run.skipped)} file(s) or pair(s) not refined"
        + (" (listed above)" if run.skipped else ""))
  if not run.refined and not run.complete:
    raise InputError(f"{images}: nothing could be refined ({len(run.skipped)} file(s) or "
                     "pair(s) skipped)")
  result = {"model": run.settings, "scales": [scale_key(s) for s in scales],
            "pairs": len(pairs), "refined": len(run.refined),
            "already_complete": len(run.complete), "skipped": run.skipped,
            "seconds": time.time() - run.start, "refine_seconds": run.refine_seconds,
            "seconds_per_object": run.seconds_per_object,
            "object_seconds": run.object_seconds, "hosts": run.hosts}
  if main:
    dataset_run.write_json(os.path.join(out_dir, SUMMARY_FILE), result)
  return result
