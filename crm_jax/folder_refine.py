"""The folder mode of ``python -m crm_jax.refine``: every image of a folder with its coarse mask
from another folder (any segmenter's output), refined on every local device and host.

Pairing, by file stem. ``IMAGES/<x>.<ext>`` (``ext``: one of ``IMAGE_EXTS``, any case) goes with
``MASKS/<x><suffix>.png`` (``suffix``: ``--mask-suffix``, empty by default, e.g. ``_mask`` for
``x_mask.png``); the refined mask is written as ``OUTPUT/<x><suffix>.png`` (the coarse mask's
name), ``uint8(p * 255)`` of the last scale. Only the files directly in each folder count;
hidden files are ignored. Left out, one line each: an image without its mask, two images of one
stem (``x.jpg`` and ``x.png``), a file of MASKS that no image claims, and a file of IMAGES that
is no image; then, as they are met, an unreadable or corrupt file and a mask whose size is not
the image's.

Resume and provenance: ``OUTPUT/manifest.json`` and its rules are ``crm_jax.evaluation``'s (the
model's fingerprint, scales, dtype, plan, ``min_side``); a run started again with the same
settings skips every pair whose output exists (each is written atomically), one with others is
refused unless ``overwrite``. ``OUTPUT/summary.json`` records the run: objects refined, already complete and
skipped (with reasons), the seconds of each refined object and the counts per process.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from crm_jax import evaluation
from crm_jax.metrics import scale_key
from crm_jax.constants import SCALES
from crm_jax.io import InputError, read_image, read_mask, write_image
from crm_jax.preprocess import prob_to_uint8
from crm_jax.scales import check_min_side, check_scales
from crm_jax.io import file_image_size
from crm_jax.sharding import Job, host_lines, refine_jobs, run_together

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXT = ".png"
SUMMARY_FILE = "summary.json"

Log = evaluation.Log


def read_pair(image_path: str, mask_path: str) -> Tuple[np.ndarray, np.ndarray]:
  """The image (RGB uint8 ``[H, W, 3]``) and its coarse mask (uint8 ``[H, W]``), read by the
  rules of ``crm_jax.io``; ``InputError`` naming the file when one is unreadable or the sizes
  differ."""
  image = read_image(image_path)
  mask = read_mask(mask_path)
  if image.shape[:2] != mask.shape:
    raise InputError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but {image_path} "
                     f"is {image.shape[1]}x{image.shape[0]}")
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
  file left out. ``InputError`` when a folder is missing or nothing pairs up."""
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
    raise InputError(f"{images}, {masks}: no image pairs with a mask <name>{suffix}{MASK_EXT} "
                     f"({len(problems)} file(s) left out)")
  return pairs, problems


def _is_png(file_name: str) -> bool:
  return not file_name.startswith(".") and file_name.lower().endswith(MASK_EXT)


def pair_jobs(pairs: Sequence[FolderPair], out_dir: str, last_scale: float) -> List[Job]:
  """The pairs as ``crm_jax.sharding.Job`` s writing ``out_dir/<output>`` (the last scale)."""
  def write(path):
    return lambda loaded, probs: write_image(path, prob_to_uint8(probs[last_scale]))
  return [Job(p.name, lambda p=p: read_pair(p.image, p.mask) + (None,),
              write(os.path.join(out_dir, p.output)),
              lambda p=p: os.path.isfile(os.path.join(out_dir, p.output)),
              lambda p=p: file_image_size(p.image)) for p in pairs]


def refine_folder(images: str, masks: str, out_dir: str, checkpoint: str, *,
                  suffix: str = "", scales: Sequence[float] = SCALES,
                  min_side: Optional[int] = None,
                  dtype: str = "float32", plan: str = "auto", batch_size: int = 1,
                  devices: Optional[int] = None, overwrite: bool = False,
                  progress: bool = True, log: Log = print, refiner=None) -> Dict:
  """Refines every pair of ``pair_folders(images, masks, suffix)`` into ``out_dir`` on every
  local device (and every host, with ``JAX_COORDINATOR_ADDRESS`` etc.: ``crm_jax.sharding``);
  writes ``out_dir/summary.json`` (process 0) and returns it.

  ``refiner``: a loaded ``crm_jax.refine.Refiner`` or a list of them, instead of
  ``checkpoint`` (it carries its own ``min_side``, dtype and plan). ``min_side``: as
  ``Refiner(min_side=...)``, 0 being the published loop; None (default): what the checkpoint
  recommends (``crm_jax.checkpoint.recommended_min_side``). Raises ``InputError`` for bad
  arguments or folders (before any work) and when nothing could be refined (nothing refined now
  and nothing complete before); a ``CheckpointError`` for a bad checkpoint; an ``OSError``
  naming an output that cannot be written.
  """
  start = time.time()
  scales = check_scales(scales)
  min_side = None if min_side is None else check_min_side(min_side)
  processes = evaluation.join_processes(batch_size, refiner)
  progress = progress and processes.is_main
  state = {}

  def settings():
    state["pairs"], state["problems"] = pair_folders(images, masks, suffix)
    state["refiners"] = evaluation.load_refiners(refiner, checkpoint, devices, dtype=dtype,
                                                 plan=plan, min_side=min_side,
                                                 log=log if processes.is_main else None)
    return evaluation.run_settings(state["refiners"][0], scales, checkpoint)

  blob = evaluation.start_output(out_dir, [images, masks], settings, overwrite, log, processes,
                                 is_output=_is_png, results_file=SUMMARY_FILE)
  if processes.is_main:
    for p in state["problems"]:
      log(f"skipped {p}")
  summary = refine_jobs(pair_jobs(state["pairs"], out_dir, scales[-1]), scales,
                        state["refiners"], batch_size=batch_size, progress=progress, log=log,
                        processes=processes)
  skipped = state["problems"] + summary.failed
  result = {"model": blob, "scales": [scale_key(s) for s in scales],
            "pairs": len(state["pairs"]), "refined": len(summary.refined),
            "already_complete": len(summary.skipped_complete), "skipped": skipped,
            "seconds": time.time() - start, "refine_seconds": summary.seconds,
            "seconds_per_object": summary.seconds_per_object,
            "object_seconds": summary.object_seconds, "hosts": summary.hosts}

  def finish():
    if not processes.is_main:
      return
    if processes.count > 1:
      for line in host_lines(summary):
        log(line)
    log(f"refined {len(summary.refined)} of {len(state['pairs'])} pair(s) into {out_dir} in "
        f"{summary.seconds:.1f} s, {len(summary.skipped_complete)} already complete; "
        f"{len(skipped)} file(s) or pair(s) not refined" + (" (listed above)" if skipped else ""))
    if not summary.refined and not summary.skipped_complete:
      raise InputError(f"{images}: nothing could be refined ({len(skipped)} file(s) or pair(s) "
                       "skipped)")
    evaluation.write_json(os.path.join(out_dir, SUMMARY_FILE), result)

  run_together(processes, finish)
  return result
