"""IoU and mBA of refined masks, as the published eval_post scripts compute them (docs/metrics.md).

Pure NumPy + OpenCV (no JAX), so ``python evaluate.py --metrics-only`` starts fast.

The output layout (the published one; ``crm_jax.evaluation`` writes it, ``output_files`` lists
it): per object ``<s>_<name>_mask.png`` per scale ``s`` (the refined mask, ``uint8(prob * 255)``)
and ``<name>_im.png``, ``<name>_seg.png`` (the input coarse mask), ``<name>_gt.png``. The gt and
seg are read by the mask encoding rules (``crm_jax.io.read_mask``), the refined masks as the
8-bit grey they are (``crm_jax.io.read_grey``); all are binarised with ``> 128``. An object is
complete (``is_complete``: a resumed run skips it) when every one of its files is whole
(``crm_jax.io.is_complete_output``), not merely present.

- Small-input rule: when the input seg's grey values sum to less than ``32 * 32`` (fewer than
  5 foreground pixels at 255), the refined mask is replaced by the input seg.
- IoU is aggregated over the data set: sum of intersections / sum of unions (not the mean of
  per-image IoUs). "old" is the input seg, "new" the refined mask.
- mBA per image: radii ``r_i = 1 + int((r_max - 1) / 5 * i)`` for ``i`` in 0..4, with
  ``r_max = (W + H) / 300``; ``int`` truncates towards zero, so images with ``W + H < 600`` use
  radius 1 five times (``floor`` would give radius 0 and an empty band). The band is
  ``morphologyEx(gt, MORPH_GRADIENT, getStructuringElement(MORPH_ELLIPSE, (2r+1, 2r+1))) > 0``
  and the accuracy is the share of band pixels where the mask equals gt. mBA is the mean over
  the radii, then the mean over images.

Decisions where the published code is silent or odd (each tested in ``tests/test_metrics.py``):

- gt given to the gradient: the published code passes the binarised gt as uint8 0/1. The
  gradient of 0/255 is 255 exactly where that of 0/1 is 1, so ``> 0`` gives the same band;
  ``boundary_band`` uses 0/1. OpenCV's default morphology border (the image is extended with
  values that never win the min/max) means the image edge itself is no boundary.
- Empty band: the band is empty at every radius exactly when gt is all background or all
  foreground (the 3x3 ellipse is a cross, so any two 4-adjacent pixels that differ make a band
  pixel). The published code then divides 0 by 0, the image's mBA is NaN and so is the mBA of
  the whole data set. Here ``boundary_accuracy`` returns NaN for such an image, and the
  accumulator leaves it out of the mBA mean (old and new alike, so both average the same
  images) while it still counts towards IoU; the names are listed under ``"no_boundary"``. A
  data set in which no image has a boundary has mBA ``None``.
- Small-input rule: applied for every image as docs/metrics.md states. (The published CascadePSP
  ``eval_post.py`` compares the mask's height with the image's width before the rule, so for
  non-square images it keeps the refined mask; that reads as a bug, and is not reproduced.)
- Sizes: images of different sizes are fine (each image has its own radii). gt, seg and a mask
  of different sizes are an error for that object (the published code resizes a mismatched
  mask bilinearly; this pipeline never writes one, so a mismatch means a foreign file).
- Missing or unreadable files: an object without a readable gt or seg is left out everywhere
  (``"skipped"``); a missing or unreadable mask leaves the object out of that scale only
  (``"missing"`` of the scale). Each such case is reported in one line.
- An empty union (gt and mask both empty) adds 0 to both sums; a data set whose unions all are
  empty has IoU ``None``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from crm_jax.constants import (BINARY_THRESHOLD, MBA_MIN_RADIUS, MBA_NUM_RADII,
                               MBA_RADIUS_DIVISOR, SCALES, SMALL_SEG_GREY_SUM)
from crm_jax.io import InputError, is_complete_output, read_grey, read_mask

COPY_ROLES = ("im", "seg", "gt")  # <name>_<role>.png: the image, input seg and gt as read
MASK_SUFFIX = "_mask.png"


def copy_suffix(role: str) -> str:
  """``_<role>.png``: how a copy's file name ends."""
  return f"_{role}.png"


GT_SUFFIX = copy_suffix("gt")
SEG_SUFFIX = copy_suffix("seg")


def scale_key(scale: float) -> str:
  """How a scale is written in file names and metrics.json (``str``: ``0.125``, ``1.0``)."""
  return str(float(scale))


def mask_path(out_dir: str, name: str, scale: float) -> str:
  """``<out_dir>/<s>_<name>_mask.png``."""
  return os.path.join(out_dir, f"{scale_key(scale)}_{name}{MASK_SUFFIX}")


def copy_path(out_dir: str, name: str, role: str) -> str:
  """``<out_dir>/<name>_<role>.png`` for a role of ``COPY_ROLES``."""
  return os.path.join(out_dir, name + copy_suffix(role))


def output_files(out_dir: str, name: str, scales: Sequence[float]) -> List[str]:
  """Every file one object leaves in the output folder, masks first (the order written)."""
  return ([mask_path(out_dir, name, s) for s in scales]
          + [copy_path(out_dir, name, role) for role in COPY_ROLES])


def is_complete(out_dir: str, name: str, scales: Sequence[float]) -> bool:
  """Whether every file of ``output_files`` is there and whole (``crm_jax.io.is_complete_output``:
  a truncated or damaged PNG does not count, so a resumed run writes the object again)."""
  return all(is_complete_output(p) for p in output_files(out_dir, name, scales))


def is_output_file(file_name: str) -> bool:
  """Whether a file name belongs to the output layout (a refined mask or a copy)."""
  return not file_name.startswith(".") and file_name.endswith(
      (MASK_SUFFIX,) + tuple(copy_suffix(role) for role in COPY_ROLES))


# ---------------------------------------------------------------------------------------------
# Per image.


def binarize(grey: np.ndarray) -> np.ndarray:
  """Grey ``[H, W]`` (any integer or float dtype) -> bool ``[H, W]``: ``grey > 128``."""
  return np.asarray(grey) > BINARY_THRESHOLD


def mba_radii(height: int, width: int) -> List[int]:
  """The five band radii of an ``H x W`` image: ``1 + int((r_max - 1) / 5 * i)``."""
  r_max = (width + height) / MBA_RADIUS_DIVISOR
  return [MBA_MIN_RADIUS + int((r_max - MBA_MIN_RADIUS) / MBA_NUM_RADII * i)
          for i in range(MBA_NUM_RADII)]


def boundary_band(gt: np.ndarray, radius: int) -> np.ndarray:
  """Bool ``[H, W]``: the morphological gradient of gt (bool ``[H, W]``) with an elliptical
  ``(2r+1) x (2r+1)`` structuring element, ``> 0``."""
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
  gradient = cv2.morphologyEx(np.asarray(gt, bool).astype(np.uint8), cv2.MORPH_GRADIENT, kernel)
  return gradient > 0


def boundary_bands(gt: np.ndarray) -> List[np.ndarray]:
  """The five bands (bool ``[H, W]``) of gt (bool or grey ``[H, W]``), one per radius."""
  gt = _as_bool(gt)
  return [boundary_band(gt, r) for r in mba_radii(*gt.shape)]


def boundary_accuracy(gt: np.ndarray, mask: np.ndarray,
                      bands: Optional[Sequence[np.ndarray]] = None) -> float:
  """The boundary accuracy of one image, the mean over the five radii.

  Args:
    gt: bool ``[H, W]`` (or grey, then binarised ``> 128``).
    mask: bool ``[H, W]`` (or grey, binarised likewise), the same size.
    bands: ``boundary_bands(gt)``, when already computed (they depend on gt only).
  Returns:
    A float in [0, 1], or NaN when gt has no boundary (all background or all foreground).
  """
  gt, mask = _as_bool(gt), _as_bool(mask)
  if gt.shape != mask.shape:
    raise ValueError(f"gt is {gt.shape} but mask is {mask.shape}")
  if bands is None:
    bands = boundary_bands(gt)
  correct = gt == mask
  accs = []
  for band in bands:
    n = int(np.count_nonzero(band))
    if n == 0:
      return math.nan
    accs.append(int(np.count_nonzero(correct[band])) / n)
  return sum(accs) / MBA_NUM_RADII


def intersection_union(gt: np.ndarray, mask: np.ndarray) -> Tuple[int, int]:
  """``(|gt & mask|, |gt | mask|)`` of two bool ``[H, W]`` masks."""
  gt, mask = _as_bool(gt), _as_bool(mask)
  return int(np.count_nonzero(gt & mask)), int(np.count_nonzero(gt | mask))


def is_small_seg(seg_grey: np.ndarray) -> bool:
  """Whether the input seg's grey values sum to less than 32*32 (the small-input rule)."""
  return int(np.asarray(seg_grey).sum(dtype=np.int64)) < SMALL_SEG_GREY_SUM


def _as_bool(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return x if x.dtype == bool else binarize(x)


@dataclasses.dataclass(frozen=True)
class ImageScores:
  """The scores of one image at one scale. ``*_mba`` is NaN when gt has no boundary."""
  old_intersection: int
  old_union: int
  new_intersection: int
  new_union: int
  old_mba: float
  new_mba: float
  small_seg: bool  # the small-input rule replaced the refined mask by the seg


def per_image(gt: np.ndarray, seg: np.ndarray, mask: np.ndarray,
              bands: Optional[Sequence[np.ndarray]] = None) -> ImageScores:
  """The scores of one image from grey uint8 ``[H, W]`` gt, input seg and refined mask.

  ``bands``: ``boundary_bands(gt)`` when already computed (a folder reuses them across scales).
  Raises ``ValueError`` when the three are not the same size.
  """
  gt, seg, mask = np.asarray(gt), np.asarray(seg), np.asarray(mask)
  if not (gt.ndim == 2 and gt.shape == seg.shape == mask.shape):
    raise ValueError(f"gt {gt.shape}, seg {seg.shape} and mask {mask.shape} differ "
                     "(expected three [H, W] masks of one size)")
  small = is_small_seg(seg)
  if small:
    mask = seg
  gt_b, seg_b, mask_b = binarize(gt), binarize(seg), binarize(mask)
  if bands is None:
    bands = boundary_bands(gt_b)
  old_i, old_u = intersection_union(gt_b, seg_b)
  new_i, new_u = intersection_union(gt_b, mask_b)
  return ImageScores(old_i, old_u, new_i, new_u, boundary_accuracy(gt_b, seg_b, bands),
                     boundary_accuracy(gt_b, mask_b, bands), small)


class Accumulator:
  """Data-set scores of one scale as exact (sum, count) pairs.

  IoU = sum of intersections / sum of unions; mBA = sum of per-image mBA / number of images
  that have a boundary (see the module docstring).
  """

  def __init__(self):
    self.old_intersection = 0
    self.old_union = 0
    self.new_intersection = 0
    self.new_union = 0
    self.old_mba_sum = 0.0
    self.new_mba_sum = 0.0
    self.num_images = 0
    self.num_mba_images = 0
    self.small_seg: List[str] = []
    self.no_boundary: List[str] = []

  def add(self, scores: ImageScores, name: str = "") -> None:
    self.old_intersection += scores.old_intersection
    self.old_union += scores.old_union
    self.new_intersection += scores.new_intersection
    self.new_union += scores.new_union
    self.num_images += 1
    if scores.small_seg:
      self.small_seg.append(name)
    # old and new share gt, so both are NaN or neither is.
    if math.isnan(scores.new_mba) or math.isnan(scores.old_mba):
      self.no_boundary.append(name)
    else:
      self.old_mba_sum += scores.old_mba
      self.new_mba_sum += scores.new_mba
      self.num_mba_images += 1

  def result(self) -> Dict:
    """``{'iou', 'mba', 'old_iou', 'old_mba', 'num_images', 'num_mba_images'}``; a score that is
    undefined (no union, no boundary) is ``None``."""
    def ratio(a, b):
      return a / b if b else None
    return {
        "iou": ratio(self.new_intersection, self.new_union),
        "mba": ratio(self.new_mba_sum, self.num_mba_images),
        "old_iou": ratio(self.old_intersection, self.old_union),
        "old_mba": ratio(self.old_mba_sum, self.num_mba_images),
        "num_images": self.num_images,
        "num_mba_images": self.num_mba_images,
    }


# ---------------------------------------------------------------------------------------------
# Over a folder.


def list_names(out_dir: str) -> List[str]:
  """The object names of an output folder: every ``<name>_gt.png``, sorted."""
  if not os.path.isdir(out_dir):
    raise InputError(f"{out_dir}: no such folder")
  return sorted(f[:-len(GT_SUFFIX)] for f in os.listdir(out_dir)
                if f.endswith(GT_SUFFIX) and len(f) > len(GT_SUFFIX) and not f.startswith("."))


def evaluate_folder(out_dir: str, scales: Sequence[float] = SCALES,
                    names: Optional[Sequence[str]] = None, progress: bool = False,
                    log: Callable[[str], None] = print) -> Dict:
  """The metrics of an output folder, per scale.

  Args:
    out_dir: folder with ``<name>_gt.png``, ``<name>_seg.png`` and ``<s>_<name>_mask.png``.
    scales: the scales to evaluate.
    names: the objects to evaluate (default: every ``<name>_gt.png`` in ``out_dir``).
    progress: show a tqdm bar.
    log: where the one-line reports of left-out objects go.

  Returns:
    ``{"scales": {scale_key(s): {"iou", "mba", "old_iou", "old_mba", "num_images",
    "num_mba_images", "missing": [names without a usable mask at s]}}, "num_images": objects
    evaluated at one scale at least, "num_objects": objects looked at, "skipped":
    ["name: reason"] (no usable gt or seg), "small_seg": [names], "no_boundary": [names]}``.
    Scores are ``None`` when undefined (nothing evaluated at that scale, no union, no boundary).
  """
  if names is None:
    names = list_names(out_dir)
  accs = {scale_key(s): Accumulator() for s in scales}
  missing: Dict[str, List[str]] = {k: [] for k in accs}
  skipped: List[str] = []
  evaluated = set()
  bar = tqdm(names, desc="metrics", unit="object", disable=not progress, leave=False)

  def say(msg: str) -> None:
    with tqdm.external_write_mode():
      log(msg)

  for name in bar:
    try:
      gt = read_mask(copy_path(out_dir, name, "gt"))
      seg = read_mask(copy_path(out_dir, name, "seg"))
      if seg.shape != gt.shape:
        raise InputError(f"{name}{SEG_SUFFIX} is {_wxh(seg)} but {name}{GT_SUFFIX} is "
                         f"{_wxh(gt)}")
    except InputError as e:
      skipped.append(f"{name}: {e}")
      say(f"metrics: skipped {name}: {e}")
      continue
    bands = boundary_bands(gt)
    for s in scales:
      key = scale_key(s)
      path = mask_path(out_dir, name, s)
      try:
        mask = read_grey(path)
        if mask.shape != gt.shape:
          raise InputError(f"{path}: {_wxh(mask)} but {name}{GT_SUFFIX} is {_wxh(gt)}")
      except InputError as e:
        missing[key].append(name)
        say(f"metrics: {name} left out of scale {key}: {e}")
        continue
      accs[key].add(per_image(gt, seg, mask, bands), name)
      evaluated.add(name)
  small = sorted({n for a in accs.values() for n in a.small_seg})
  no_boundary = sorted({n for a in accs.values() for n in a.no_boundary})
  return {
      "scales": {k: {**a.result(), "missing": missing[k]} for k, a in accs.items()},
      "num_images": len(evaluated),
      "num_objects": len(names),
      "skipped": skipped,
      "small_seg": small,
      "no_boundary": no_boundary,
  }


def _wxh(m: np.ndarray) -> str:
  return f"{m.shape[1]}x{m.shape[0]}"


def _fmt(x: Optional[float]) -> str:
  return "   n/a" if x is None else f"{x:.4f}"


def _delta(new: Optional[float], old: Optional[float]) -> str:
  return "    n/a" if new is None or old is None else f"{new - old:+.4f}"


def format_table(result: Dict) -> str:
  """The metrics as a table: one row per scale (old/new IoU and mBA and their deltas)."""
  lines = [f"{'scale':>6}  {'old IoU':>7}  {'new IoU':>7}  {'delta':>7}  "
           f"{'old mBA':>7}  {'new mBA':>7}  {'delta':>7}  {'images':>6}"]
  for key, m in result["scales"].items():
    lines.append(f"{key:>6}  {_fmt(m['old_iou']):>7}  {_fmt(m['iou']):>7}  "
                 f"{_delta(m['iou'], m['old_iou']):>7}  {_fmt(m['old_mba']):>7}  "
                 f"{_fmt(m['mba']):>7}  {_delta(m['mba'], m['old_mba']):>7}  "
                 f"{m.get('num_images', ''):>6}")
  notes = []
  for label, key in (("left out (no usable gt/seg)", "skipped"),
                     ("small input seg (refined := seg)", "small_seg"),
                     ("gt without boundary (not in mBA)", "no_boundary")):
    if result.get(key):
      notes.append(f"{label}: {len(result[key])}")
  for key, m in result["scales"].items():
    if m.get("missing"):
      notes.append(f"scale {key}: {len(m['missing'])} object(s) without a mask")
  return "\n".join(lines + notes)
