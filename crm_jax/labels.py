"""Label maps: one class id per pixel, refined class by class and merged (docs/labels.md).

A label map is ``[H, W]`` uint8 or uint16 of class ids; ``ignore`` pixels (default 255) take part
in no class and stay as they are. Files: grey 8-bit PNG, palette PNG (the palette kept), 16-bit
grey PNG; an RGB colour PNG is refused.
"""

from __future__ import annotations

import dataclasses
from io import BytesIO
from typing import Dict, Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from crm_jax import io
from crm_jax.io import InputError
from crm_jax.outputs import write_bytes

IGNORE = 255
CLAIM = 0.5  # a refined class claims a pixel where its probability is > CLAIM


@dataclasses.dataclass
class LabelMap:
  """``labels``: ``[H, W]`` uint8 or uint16 class ids; ``palette``: a palette PNG's RGB
  palette (768 bytes or fewer), kept for the output, or None."""
  labels: np.ndarray
  palette: Optional[bytes] = None


def decode_labels(data: bytes, name: str = "labels", orientation: str = "stored") -> LabelMap:
  """PNG bytes -> ``LabelMap`` (the same checks of damage as every image, ``crm_jax.io``);
  ``InputError`` naming ``name`` for another format or an RGB colour map."""
  if not data.startswith(b"\x89PNG\r\n\x1a\n"):
    raise InputError(f"{name}: not a PNG; label maps are PNG files of class ids (grey 8- or "
                     "16-bit, or palette)")
  _, palette = io.decode_pixels(data, name, orientation)  # damage refused, EXIF warned
  with Image.open(BytesIO(data)) as img:
    mode = img.mode
    if mode in ("RGB", "RGBA", "LA", "I", "F"):
      raise InputError(f"{name}: a colour ({mode}) PNG; give classes as a grey PNG of class ids "
                       "(8-bit, or 16-bit for more than 255 classes) or a palette (indexed) PNG")
    labels = np.array(img.convert("L") if mode == "1" else img)
  labels = labels.astype(np.uint16 if labels.dtype.itemsize > 1 else np.uint8)
  if orientation == "exif":
    labels = io.apply_orientation(labels, io.exif_orientation(data))
  return LabelMap(np.ascontiguousarray(labels), palette)


def read_labels(path: str, orientation: str = "stored") -> LabelMap:
  """A label-map PNG file -> ``LabelMap`` (``decode_labels``)."""
  return decode_labels(io.read_bytes(path), path, orientation)


def encode_labels(label_map: LabelMap) -> bytes:
  """``LabelMap`` -> PNG bytes: palette PNG with its palette, grey 8-bit, or grey 16-bit."""
  labels = np.ascontiguousarray(label_map.labels)
  if labels.dtype == np.uint16:
    img = Image.fromarray(labels)  # I;16
  else:
    img = Image.fromarray(labels.astype(np.uint8), "P" if label_map.palette else "L")
    if label_map.palette:
      img.putpalette(label_map.palette)
  out = BytesIO()
  img.save(out, "PNG")
  return out.getvalue()


def write_labels(path: str, label_map: LabelMap) -> None:
  """Writes ``label_map`` as a PNG, atomically (``crm_jax.outputs.write_bytes``)."""
  write_bytes(path, encode_labels(label_map))


def check_labels(labels, name: str = "labels") -> np.ndarray:
  """An integer ``[H, W]`` array of class ids (uint8/uint16 or another integer type with values
  0-65535) -> itself; ``InputError`` for anything else."""
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise InputError(f"{name}: a label map is [H, W] class ids, got shape {labels.shape} (an "
                     "RGB colour map: give class ids, grey or palette)")
  if labels.dtype.kind not in "ui" or labels.dtype.itemsize > 2 and labels.size and (
      labels.min() < 0 or labels.max() > 65535):
    raise InputError(f"{name}: label maps hold integer class ids 0-65535, got {labels.dtype}")
  return labels


def classes_to_refine(labels: np.ndarray, classes: Optional[Sequence[int]], ignore: Optional[int],
                      name: str = "labels") -> list:
  """The sorted class ids to refine: ``classes`` (those present) or every id present but
  ``ignore``; ``InputError`` when none is left."""
  present = set(np.unique(labels).tolist()) - {ignore}
  chosen = sorted(present if classes is None else present & {int(c) for c in classes})
  if not chosen:
    raise InputError(f"{name}: holds no class to refine ("
                     + ("only ignore pixels" if classes is None else
                        f"none of the classes {sorted(int(c) for c in classes)} is present")
                     + ")")
  return chosen


class Merge:
  """The merge rule (docs/labels.md), fed class by class: a pixel goes to the refined class with
  the highest probability above ``CLAIM`` (ties: the lower id); a pixel no class claims keeps its
  coarse label, unless its own class was refined and dropped it: then it takes the nearest other
  coarse label (ignore aside). ``ignore`` pixels never change."""

  def __init__(self, coarse: np.ndarray, ignore: Optional[int] = IGNORE):
    self.coarse, self.ignore = coarse, ignore
    self.best = np.full(coarse.shape, CLAIM, np.float32)
    self.label = coarse.copy()
    self.refined = np.zeros(coarse.shape, bool)  # its coarse class was refined

  def add(self, cls: int, prob: np.ndarray) -> None:
    """Class ``cls``'s refined probability ``[H, W]`` float32 (classes in increasing order)."""
    wins = prob > self.best
    self.best = np.where(wins, prob, self.best)
    self.label[wins] = cls
    self.refined |= self.coarse == cls

  def result(self) -> np.ndarray:
    """The merged label map ``[H, W]``, dtype of the coarse map."""
    label = self.label
    keep_ignore = self.coarse == self.ignore
    dropped = (self.best <= CLAIM) & self.refined & ~keep_ignore
    if dropped.any():
      others = [c for c in np.unique(self.coarse).tolist() if c != self.ignore]
      nearest = np.full(self.coarse.shape, np.inf, np.float32)
      for c in others:  # distance to each label's coarse pixels; the nearest other one wins
        d = cv2.distanceTransform((self.coarse != c).astype(np.uint8), cv2.DIST_L2,
                                  cv2.DIST_MASK_PRECISE)
        closer = dropped & (self.coarse != c) & (d < nearest)
        nearest = np.where(closer, d, nearest)
        label[closer] = c
    label[keep_ignore] = self.coarse[keep_ignore]
    return label


def merge(coarse: np.ndarray, probs: Dict[int, np.ndarray],
          ignore: Optional[int] = IGNORE) -> np.ndarray:
  """The coarse label map and each refined class's probability ``{class: [H, W]}`` -> the
  merged label map (``Merge``)."""
  m = Merge(check_labels(coarse), ignore)
  for c in sorted(probs):
    m.add(c, probs[c])
  return m.result()
