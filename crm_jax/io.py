"""Reading and writing images with clear errors; atomic writes."""

import os
import tempfile
from typing import Callable

import cv2
import numpy as np


class InputError(ValueError):
  """Bad user input: the message names the file and the problem."""


def read_image(path: str) -> np.ndarray:
  """An image file as RGB uint8 ``[H, W, 3]`` (grey is replicated, alpha dropped)."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if img is None:
    raise InputError(f"{path}: unreadable or not an image")
  return as_rgb(img_bgr_to_rgb(img), path)


def img_bgr_to_rgb(img: np.ndarray) -> np.ndarray:
  if img.ndim == 3 and img.shape[2] == 3:
    return img[:, :, ::-1]
  if img.ndim == 3 and img.shape[2] == 4:
    return img[:, :, [2, 1, 0, 3]]
  return img


def as_rgb(img: np.ndarray, name: str = "image") -> np.ndarray:
  """RGB uint8 ``[H, W, 3]`` from grey ``[H, W]``/``[H, W, 1]``, RGB or RGBA.

  Grey is replicated to three channels; an alpha channel is dropped; 16-bit
  images are scaled to 8 bits. Anything else raises ``InputError``.
  """
  img = np.asarray(img)
  if img.dtype == np.uint16:
    img = (img // 257).astype(np.uint8)
  if img.dtype != np.uint8:
    raise InputError(f"{name}: expected uint8 pixels, got {img.dtype}")
  if img.ndim == 2:
    img = img[:, :, None]
  if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
    raise InputError(f"{name}: expected [H, W], [H, W, 3] or [H, W, 4], got {img.shape}")
  if img.shape[2] == 1:
    img = np.repeat(img, 3, axis=2)
  return np.ascontiguousarray(img[:, :, :3])


def read_mask(path: str) -> np.ndarray:
  """A mask file as grey uint8 ``[H, W]`` (colour masks are converted to grey)."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
  if mask is None:
    raise InputError(f"{path}: unreadable or not an image")
  return mask


def as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
  """Grey uint8 ``[H, W]`` from ``[H, W]`` or ``[H, W, 1]`` (bool becomes 0/255)."""
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[2] == 1:
    mask = mask[:, :, 0]
  if mask.ndim != 2:
    raise InputError(f"{name}: expected a [H, W] mask, got shape {mask.shape}")
  if mask.dtype == bool:
    mask = mask.astype(np.uint8) * 255
  if mask.dtype != np.uint8:
    raise InputError(f"{name}: expected uint8 values 0-255, got {mask.dtype}")
  return mask


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Creates ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, then a rename.

  The file gets the permissions a plain ``open(path, "w")`` would give (0o666 less the umask);
  a failure leaves no temporary file behind and ``path`` untouched.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (``atomic_write``)."""
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  atomic_write(path, write)


def write_image(path: str, img: np.ndarray) -> None:
  """Writes a PNG/JPG atomically (``atomic_write``). RGB in."""
  img = np.asarray(img)
  if img.ndim == 3 and img.shape[2] == 3:
    img = img[:, :, ::-1]

  def write(tmp):
    if not cv2.imwrite(tmp, np.ascontiguousarray(img)):
      raise OSError(f"{path}: could not be written")
  atomic_write(path, write)
