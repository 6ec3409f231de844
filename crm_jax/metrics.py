"""IoU and mBA of refined masks as the published eval_post scripts compute them (docs/metrics.md),
and the output layout (``<s>_<name>_mask.png`` per scale, ``<name>_{im,seg,gt}.png``). Pure
NumPy + OpenCV (no JAX), so ``crm-evaluate --metrics-only`` starts fast."""

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
from crm_jax.io import InputError, as_mask, read_grey, read_mask
from crm_jax.outputs import is_complete_output

COPY_ROLES = ("im", "seg", "gt")  # <name>_<role>.png: the image, input seg and gt as read
MASK_SUFFIX = "_mask.png"
GT_SUFFIX, SEG_SUFFIX = "_gt.png", "_seg.png"


def scale_key(scale: float) -> str:
  """How a scale is written in file names and metrics.json (``str``: ``0.125``, ``1.0``)."""
  return str(float(scale))


def mask_path(out_dir: str, name: str, scale: float) -> str:
  """``<out_dir>/<s>_<name>_mask.png``."""
  return os.path.join(out_dir, f"{scale_key(scale)}_{name}{MASK_SUFFIX}")


def copy_path(out_dir: str, name: str, role: str) -> str:
  """``<out_dir>/<name>_<role>.png`` for a role of ``COPY_ROLES``."""
  return os.path.join(out_dir, f"{name}_{role}.png")


def output_files(out_dir: str, name: str, scales: Sequence[float]) -> List[str]:
  """Every file one object leaves in the output folder, masks first (the order written)."""
  return ([mask_path(out_dir, name, s) for s in scales]
          + [copy_path(out_dir, name, role) for role in COPY_ROLES])


def is_complete(out_dir: str, name: str, scales: Sequence[float]) -> bool:
  """Whether every file of ``output_files`` is there and whole (``io.is_complete_output``)."""
  return all(is_complete_output(p) for p in output_files(out_dir, name, scales))


def is_output_file(file_name: str) -> bool:
  """Whether a file name belongs to the output layout (a refined mask or a copy)."""
  return not file_name.startswith(".") and file_name.endswith(
      (MASK_SUFFIX,) + tuple(f"_{role}.png" for role in COPY_ROLES))


# -- per image ---------------------------------------------------------------------------------

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
  """The mBA of one image (the mean over the five radii) in [0, 1], NaN when gt has no boundary.
  gt, mask: bool (or grey, binarised ``> 128``) ``[H, W]``; bands: ``boundary_bands(gt)``."""
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
  """The scores of one image from grey uint8 ``[H, W]`` gt, input seg and refined mask
  (``ValueError`` unless of one size); ``bands``: ``boundary_bands(gt)``, if computed."""
  gt, seg, mask = np.asarray(gt), np.asarray(seg), np.asarray(mask)
  if not (gt.ndim == 2 and gt.shape == seg.shape == mask.shape):
    raise ValueError(f"gt {gt.shape}, seg {seg.shape} and mask {mask.shape} differ "
                     "(expected three [H, W] masks of one size)")
  small = int(seg.sum(dtype=np.int64)) < SMALL_SEG_GREY_SUM  # the small-input rule
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
  """Data-set scores of one scale as exact (sum, count) pairs: IoU = sum of intersections / sum
  of unions; mBA = sum of per-image mBA / number of images that have a boundary."""

  def __init__(self):
    self.old_intersection = self.old_union = self.new_intersection = self.new_union = 0
    self.old_mba_sum = self.new_mba_sum = 0.0
    self.num_images = self.num_mba_images = 0
    self.small_seg: List[str] = []
    self.no_boundary: List[str] = []

  def add(self, scores: ImageScores, name: str = "") -> None:
    for field in ("old_intersection", "old_union", "new_intersection", "new_union"):
      setattr(self, field, getattr(self, field) + getattr(scores, field))
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


# -- over a folder -----------------------------------------------------------------------------

def list_names(out_dir: str) -> List[str]:
  """The object names of an output folder: every ``<name>_gt.png``, sorted."""
  if not os.path.isdir(out_dir):
    raise InputError(f"{out_dir}: no such folder")
  return sorted(f[:-len(GT_SUFFIX)] for f in os.listdir(out_dir)
                if f.endswith(GT_SUFFIX) and len(f) > len(GT_SUFFIX) and not f.startswith("."))


def score_object(gt: np.ndarray, seg: np.ndarray, masks: Dict[str, np.ndarray]) -> Dict:
  """One object's JSON-able record, ``{"scales": {scale_key: ImageScores fields as a list}}``,
  from grey uint8 ``[H, W]`` gt, input seg and the refined mask of each scale."""
  bands = boundary_bands(gt)
  return {"scales": {k: list(dataclasses.astuple(per_image(gt, seg, m, bands)))
                     for k, m in masks.items()}, "missing": {}}


def score_refined(seg: np.ndarray, gt: np.ndarray, masks: Dict[str, np.ndarray]) -> Dict:
  """``score_object`` of an object refined now, from its seg and gt as loaded: read as their
  written copies are read back (``as_mask``), so the scores equal ``score_files``'."""
  return score_object(as_mask(gt), as_mask(seg), masks)


def score_files(out_dir: str, name: str, scales: Sequence[float],
                say: Callable[[str], None] = print) -> Dict:
  """``score_object`` of an object's files in an output folder; no usable gt or seg:
  ``{"skipped": reason}``, no usable mask: under ``"missing"``; each said in one line."""
  try:
    gt = read_mask(copy_path(out_dir, name, "gt"))
    seg = read_mask(copy_path(out_dir, name, "seg"))
    if seg.shape != gt.shape:
      raise InputError(f"{name}{SEG_SUFFIX} is {_wxh(seg)} but {name}{GT_SUFFIX} is "
                       f"{_wxh(gt)}")
  except InputError as e:
    say(f"metrics: skipped {name}: {e}")
    return {"skipped": f"{name}: {e}"}
  masks, missing = {}, {}
  for s in scales:
    path = mask_path(out_dir, name, s)
    try:
      mask = read_grey(path)
      if mask.shape != gt.shape:
        raise InputError(f"{path}: {_wxh(mask)} but {name}{GT_SUFFIX} is {_wxh(gt)}")
      masks[scale_key(s)] = mask
    except InputError as e:
      missing[scale_key(s)] = str(e)
      say(f"metrics: {name} left out of scale {scale_key(s)}: {e}")
  return {**score_object(gt, seg, masks), "missing": missing}


def summarize(records: Sequence[Tuple[str, Dict]], scales: Sequence[float]) -> Dict:
  """The metrics of ``(name, record)`` pairs: ``{"scales": {scale_key: Accumulator.result() +
  "missing"}, "num_images", "num_objects", "skipped", "small_seg", "no_boundary"}``."""
  accs = {scale_key(s): Accumulator() for s in scales}
  missing: Dict[str, List[str]] = {k: [] for k in accs}
  skipped, evaluated = [], set()
  for name, record in records:
    if "skipped" in record:
      skipped.append(record["skipped"])
      continue
    for key in accs:
      if key in record["scales"]:
        accs[key].add(ImageScores(*record["scales"][key]), name)
        evaluated.add(name)
      else:
        missing[key].append(name)
  return {
      "scales": {k: {**a.result(), "missing": missing[k]} for k, a in accs.items()},
      "num_images": len(evaluated),
      "num_objects": len(records),
      "skipped": skipped,
      "small_seg": sorted({n for a in accs.values() for n in a.small_seg}),
      "no_boundary": sorted({n for a in accs.values() for n in a.no_boundary}),
  }


def evaluate_folder(out_dir: str, scales: Sequence[float] = SCALES,
                    names: Optional[Sequence[str]] = None, progress: bool = False,
                    log: Callable[[str], None] = print) -> Dict:
  """``summarize`` of ``score_files`` of ``names`` (default: every ``<name>_gt.png``)."""
  if names is None:
    names = list_names(out_dir)

  def say(msg: str) -> None:
    with tqdm.external_write_mode():
      log(msg)

  bar = tqdm(names, desc="metrics", unit="object", disable=not progress, leave=False)
  return summarize([(n, score_files(out_dir, n, scales, say)) for n in bar], scales)


# -- label maps (docs/labels.md) -------------------------------------------------------------

def score_labels(gt: np.ndarray, coarse: np.ndarray, refined: np.ndarray,
                 ignore: Optional[int] = 255) -> Dict[str, List[float]]:
  """One image's record ``{class id: [coarse |gt&pred|, |gt|pred|, refined |gt&pred|,
  |gt|pred|, coarse mBA, refined mBA]}`` for each class of gt (``[H, W]`` class ids); pixels
  where gt is ``ignore`` count for no class; an mBA is NaN where the class has no boundary."""
  valid = gt != ignore
  record = {}
  for c in np.unique(gt[valid]).tolist():
    truth, bands, row = gt == c, boundary_bands(gt == c), []
    for pred in (coarse, refined):
      row += intersection_union(truth, (pred == c) & valid)
    record[str(c)] = row + [boundary_accuracy(truth, (p == c) & valid, bands)
                            for p in (coarse, refined)]
  return record


def summarize_labels(records: Sequence[Dict[str, List[float]]]) -> Dict:
  """``{"coarse": {"miou", "mba"}, "refined": {...}, "classes": {id: {"coarse_iou", "iou",
  "coarse_mba", "mba", "images"}}}``: a class's IoU from its pixels summed over the images, its
  mBA the mean over the images where it has a boundary; mIoU and mBA the means over classes."""
  sums: Dict[str, list] = {}
  for record in records:
    for c, row in record.items():
      total = sums.setdefault(c, [0, 0, 0, 0, [], [], 0])
      for i in range(4):
        total[i] += row[i]
      for i in (4, 5):
        if not math.isnan(row[i]):
          total[i].append(row[i])
      total[6] += 1
  mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
  classes = {c: {"coarse_iou": t[0] / t[1] if t[1] else None, "iou": t[2] / t[3] if t[3] else None,
                 "coarse_mba": mean(t[4]), "mba": mean(t[5]), "images": t[6]}
             for c, t in sorted(sums.items(), key=lambda kv: int(kv[0]))}
  over = lambda key: mean([v[key] for v in classes.values() if v[key] is not None])  # noqa: E731
  return {"coarse": {"miou": over("coarse_iou"), "mba": over("coarse_mba")},
          "refined": {"miou": over("iou"), "mba": over("mba")}, "classes": classes}


def format_label_table(result: Dict) -> str:
  """Coarse and refined mIoU and mean mBA, and the class count."""
  old, new = result["coarse"], result["refined"]
  return "\n".join([f"{'':>8}  {'mIoU':>7}  {'mBA':>7}",
                     f"{'coarse':>8}  {_fmt(old['miou']):>7}  {_fmt(old['mba']):>7}",
                     f"{'refined':>8}  {_fmt(new['miou']):>7}  {_fmt(new['mba']):>7}",
                     f"{'delta':>8}  {_delta(new['miou'], old['miou']):>7}  "
                     f"{_delta(new['mba'], old['mba']):>7}  ({len(result['classes'])} classes)"])


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
