"""Reading images and masks by one set of rules (writing outputs: ``crm_jax.outputs``).

Images come out as RGB uint8 ``[H, W, 3]``, masks as grey uint8 ``[H, W]`` (0-255, ``> 128`` is
foreground), as stored; a damaged file is an ``InputError`` naming it. The rules: the input rules
of docs/refining.md and docs/faults_and_files.md. libjpeg-turbo (simplejpeg: outside the GIL, its
warnings refused) decodes JPEGs, OpenCV the rest; Pillow reads headers, PNG checksums and EXIF.
"""

import os
import re
import warnings
from io import BytesIO
from typing import Optional, Tuple

import cv2
import numpy as np
import simplejpeg
from PIL import Image, JpegImagePlugin, PngImagePlugin


class InputError(ValueError):
  """Bad user input: the message names the file and the problem."""


class InputWarning(UserWarning):
  """An input read by a rule the user may not expect (the message names the file and the rule)."""


class MaskWarning(InputWarning):
  """A mask encoding rule had to guess (the message names the file and the rule)."""


GREY_TOLERANCE = 8  # colour channels that differ by no more than this are grey (JPEG noise).
ORIENTATIONS = ("stored", "exif")  # how readers treat an EXIF orientation tag
JPEG_STRAY_BYTES = 16  # at most this many stray bytes before a JPEG's end marker: warned only
_JPEG_MAGIC, _PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
# libjpeg's warnings that leave the pixels whole (its others, and its errors, mean damage).
_JPEG_HARMLESS = re.compile(r"Warning: unknown JFIF|Unknown Adobe color transform|Invalid SOS "
                            r"parameters for sequential|Application transferred too many|"
                            r"Corrupt JPEG data: bad ICC marker")
_JPEG_STRAY = re.compile(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0xd9$")
_ORIENTATION_WORDS = {2: "mirrored left-right", 3: "turned 180°", 4: "mirrored top-bottom",
                      5: "mirrored and turned 90° counter-clockwise", 6: "turned 90° clockwise",
                      7: "mirrored and turned 90° clockwise", 8: "turned 90° counter-clockwise"}
# EXIF orientation -> (mirrored left-right first, then np.rot90's k), as viewers turn the pixels.
_ORIENT = {2: (1, 0), 3: (0, 2), 4: (1, 2), 5: (1, 1), 6: (0, 3), 7: (1, 3), 8: (0, 1)}


# ---------------------------------------------------------------------------------------------
# Reading images.


def _header(data) -> Optional[Image.Image]:
  """PNG/JPEG bytes (or binary file) -> Pillow's image, header read only; None: another format."""
  fp = BytesIO(data) if isinstance(data, bytes) else data
  head = fp.read(8)
  fp.seek(0)
  if head.startswith(_PNG_MAGIC):
    return PngImagePlugin.PngImageFile(fp)  # no guess at decompression bombs: OpenCV decodes
  return JpegImagePlugin.JpegImageFile(fp) if head.startswith(_JPEG_MAGIC) else None


def exif_orientation(data) -> int:
  """JPEG/PNG bytes (or Pillow's image of them) -> EXIF orientation 1-8 (1: none or unreadable)."""
  try:
    exif = Image.Exif()
    exif.load((data if isinstance(data, Image.Image) else _header(data)).info["exif"])
    value = exif.get(0x0112)
  except Exception:  # noqa: BLE001 - metadata never stops a read
    return 1
  return value if isinstance(value, int) and value in _ORIENT else 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
  """Stored pixels ``[H, W, ...]`` -> as viewers show them under an EXIF ``orientation`` (1-8)."""
  if orientation == 1:
    return img
  mirror, k = _ORIENT[orientation]
  return np.ascontiguousarray(np.rot90(img[:, ::-1] if mirror else img, k))


def _jpeg(data: bytes, name: str) -> Optional[np.ndarray]:
  """JPEG bytes -> RGB ``[H, W, 3]`` or grey ``[H, W]`` by libjpeg-turbo, its warnings of damage
  refused; a layout TurboJPEG cannot decode, OpenCV decodes after Pillow's truncation check."""
  try:
    grey = simplejpeg.decode_jpeg_header(data, strict=False)[2] == "Gray"
  except Exception:  # noqa: BLE001 - an unreadable header: decode_jpeg says why
    grey = False
  try:
    img = simplejpeg.decode_jpeg(data, colorspace="GRAY" if grey else "RGB", strict=True)
  except ValueError as e:  # libjpeg warned (the first warning), or failed
    said, stray = str(e), _JPEG_STRAY.match(str(e))
    if "Could not determine subsampling level" in said:  # an unusual layout, or no header
      try:
        with JpegImagePlugin.JpegImageFile(BytesIO(data)) as whole:
          whole.load()  # refuses a truncated file
      except Exception:  # noqa: BLE001
        raise InputError(f"{name}: truncated or corrupt JPEG (unreadable header or data)") from None
      img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
      return None if img is None else img_bgr_to_rgb(img)
    if said.startswith("Premature end of JPEG file"):
      raise InputError(f"{name}: truncated or corrupt JPEG (libjpeg: \"{said}\": the file ends "
                       "before its image data does)") from None
    if not (_JPEG_HARMLESS.match(said) or stray and int(stray[1]) <= JPEG_STRAY_BYTES):
      raise InputError(f"{name}: corrupt JPEG, its data is damaged (libjpeg: \"{said}\"); its "
                       "pixels would be wrong") from None
    if stray:
      warnings.warn(f"{name}: {stray[1]} stray bytes before the JPEG's end marker (libjpeg: "
                    f"\"{said}\"); read anyway, as encoders that pad their data leave such "
                    "bytes", InputWarning, stacklevel=4)
    try:
      img = simplejpeg.decode_jpeg(data, colorspace="GRAY" if grey else "RGB", strict=False)
    except ValueError as later:
      raise InputError(f"{name}: corrupt JPEG (libjpeg: \"{said}\", then \"{later}\")") from None
  return img[:, :, 0] if grey else img


def _png(data: bytes, name: str) -> Tuple[Optional[bytes], int]:
  """PNG bytes -> (its palette or None, EXIF orientation), every chunk's checksum checked."""
  try:
    with _header(data) as img:
      palette = img.palette.tobytes() if img.mode == "P" and img.palette else None
      tag = exif_orientation(img)
      img.verify()
  except SyntaxError as e:
    if "checksum" in str(e) and "incomplete" not in str(e):
      raise InputError(f"{name}: corrupt PNG (bad checksum: {e})") from None
    raise InputError(f"{name}: truncated or corrupt PNG ({e})") from None
  except (OSError, EOFError) as e:
    raise InputError(f"{name}: truncated PNG (the file ends before its IEND chunk: {e})") from None
  return palette, tag


def _pixels(data: bytes, name: str) -> Tuple[np.ndarray, Optional[bytes], int]:
  """Bytes -> (pixels as stored, RGB(A) or grey; a palette PNG's palette; EXIF orientation)."""
  if not data:
    raise InputError(f"{name}: empty file")
  palette, tag = None, 1
  if data.startswith(_JPEG_MAGIC):
    img, tag = _jpeg(data, name), exif_orientation(data)
  else:
    if data.startswith(_PNG_MAGIC):
      palette, tag = _png(data, name)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    img = None if img is None else img_bgr_to_rgb(img)
  if img is None:
    raise InputError(f"{name}: unreadable or not an image")
  return img, palette, tag


def imdecode(data: bytes, name: str) -> np.ndarray:
  """Checked bytes -> pixels as ``cv2.imdecode(..., IMREAD_UNCHANGED)`` gives them: BGR(A), grey;
  ``InputError`` naming ``name`` for a damaged or unreadable file."""
  return np.ascontiguousarray(img_bgr_to_rgb(_pixels(data, name)[0]))


def decode_pixels(data: bytes, name: str, orientation: str = "stored"):
  """Bytes -> (pixels, RGB(A) or grey, stored or turned by EXIF; a palette PNG's palette)."""
  if orientation not in ORIENTATIONS:
    raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
  img, palette, tag = _pixels(data, name)
  if tag != 1 and orientation == "exif":
    img = apply_orientation(img, tag)
  elif tag != 1:
    warnings.warn(f"{name}: EXIF orientation {tag} ({_ORIENTATION_WORDS[tag]} in viewers) "
                  f"ignored, as in the published code: read as stored, {img.shape[1]}x"
                  f"{img.shape[0]}; image and mask must match as stored and outputs are not "
                  "turned (docs/faults_and_files.md)", InputWarning, stacklevel=3)
  return img, palette


def read_bytes(path: str) -> bytes:
  """The file's bytes; ``InputError`` naming ``path`` when it cannot be read."""
  if os.path.isdir(path):
    raise InputError(f"{path}: is a folder, not an image file")
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None


def img_bgr_to_rgb(img: np.ndarray) -> np.ndarray:
  """OpenCV's BGR/BGRA channel order as RGB/RGBA and back (a view; grey unchanged)."""
  if img.ndim == 3 and img.shape[2] in (3, 4):
    return img[:, :, [2, 1, 0, 3]] if img.shape[2] == 4 else img[:, :, ::-1]
  return img


def as_rgb(img: np.ndarray, name: str = "image") -> np.ndarray:
  """Grey ``[H, W(, 1)]``, RGB or RGBA (8 or 16 bits) -> RGB uint8 ``[H, W, 3]`` (grey replicated,
  alpha dropped); ``InputError`` for anything else."""
  img = np.asarray(img)
  if img.dtype == np.uint16:
    img = (img // 257).astype(np.uint8)
  if img.dtype != np.uint8:
    raise InputError(f"{name}: expected uint8 pixels, got {img.dtype}")
  img = img[:, :, None] if img.ndim == 2 else img
  if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
    raise InputError(f"{name}: expected [H, W], [H, W, 3] or [H, W, 4], got {img.shape}")
  return np.ascontiguousarray(np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[:, :, :3])


def decode_image(data: bytes, name: str = "image", orientation: str = "stored") -> np.ndarray:
  """Encoded bytes -> RGB uint8 ``[H, W, 3]``; ``orientation``: ``"stored"`` (as published: an
  EXIF orientation is ignored, with a warning) or ``"exif"`` (turned as viewers show it)."""
  return as_rgb(decode_pixels(data, name, orientation)[0], name)


def read_image(path: str, orientation: str = "stored") -> np.ndarray:
  """An image file -> RGB uint8 ``[H, W, 3]`` (``decode_image``)."""
  return decode_image(read_bytes(path), path, orientation)


def encoded_size(data) -> Optional[Tuple[int, int]]:
  """PNG/JPEG bytes (or binary file) -> ``(H, W)`` from the header; None when it cannot tell."""
  try:
    img = _header(data)
    return None if img is None else img.size[::-1]
  except Exception:  # noqa: BLE001
    return None


def file_image_size(path: str) -> Optional[Tuple[int, int]]:
  """A PNG/JPEG file -> ``(H, W)`` from its header (only that is read); None when it cannot tell."""
  try:
    with open(path, "rb") as f:
      return encoded_size(f)
  except OSError:
    return None


def show_warnings_as_lines() -> None:
  """Command lines: print each warning as one line ``warning: <message>``."""
  warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


# ---------------------------------------------------------------------------------------------
# Masks: the input rules of docs/refining.md.


def _warn(name: str, rule: str) -> None:
  warnings.warn(f"{name}: {rule}", MaskWarning, stacklevel=3)


def _grey_from_colour(rgb: np.ndarray, name: str) -> np.ndarray:
  """``[H, W, 3]`` (uint8/uint16/float) -> ``[H, W]`` of the same kind."""
  if (rgb.max(axis=2).astype(np.float64) - rgb.min(axis=2)).max(initial=0) <= GREY_TOLERANCE:
    grey = rgb.astype(np.float64) @ np.asarray([0.299, 0.587, 0.114])
    return np.rint(grey).astype(rgb.dtype) if rgb.dtype.kind in "ui" else grey
  _warn(name, "colour mask: every pixel that is not black counts as foreground")
  return np.where(rgb.max(axis=2) > 0, 255, 0).astype(np.uint8)


def _integer_to_uint8(mask: np.ndarray, name: str) -> np.ndarray:
  lo, hi = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
  if lo < 0:
    raise InputError(f"{name}: mask values must not be negative (got {lo})")
  if hi <= 1:
    return (mask * 255).astype(np.uint8)  # binary {0, 1}
  if hi <= 255:
    if mask.dtype == np.uint16:
      _warn(name, "16-bit mask whose values are all <= 255: read as 8-bit values")
    return mask.astype(np.uint8)
  if mask.dtype == np.uint16:
    return ((mask.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
  raise InputError(f"{name}: mask values up to {hi} in {mask.dtype}; expected 0/1 or 0-255 "
                   "(or 0-65535 in uint16)")


def _float_to_uint8(mask: np.ndarray, name: str) -> np.ndarray:
  if not np.all(np.isfinite(mask)):
    raise InputError(f"{name}: mask holds NaN or infinite values")
  lo, hi = (float(mask.min()), float(mask.max())) if mask.size else (0.0, 0.0)
  if lo < 0 or hi > 255:
    raise InputError(f"{name}: float mask values must lie in [0, 1] (probabilities) or "
                     f"[0, 255], got {lo:g}..{hi:g}")
  return np.rint(mask * 255 if hi <= 1 else mask).astype(np.uint8)


def as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
  """A mask array (``[H, W(, 1)]``, RGB, grey+alpha, RGBA; bool, integer, float) -> grey uint8
  ``[H, W]`` in 0-255; ``InputError`` when ambiguous, ``MaskWarning`` where a rule guessed."""
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[2] in (2, 4):
    alpha, colour = mask[:, :, -1], mask[:, :, :-1]
    if alpha.size and alpha.min() != alpha.max():
      flat = colour.reshape(-1, colour.shape[2])
      if np.any(flat != flat[0]) and np.any(colour != alpha[:, :, None]):
        _warn(name, "mask held in the alpha channel (its colour channels are ignored)")
      mask = alpha
    else:
      mask = colour
  if mask.ndim == 3 and mask.shape[2] == 1:
    mask = mask[:, :, 0]
  if mask.ndim == 3 and mask.shape[2] == 3:
    mask = mask.any(axis=2) if mask.dtype == bool else _grey_from_colour(mask, name)
  if mask.ndim != 2:
    raise InputError(f"{name}: expected a [H, W] mask (or RGB, grey+alpha, RGBA), got shape "
                     f"{mask.shape}")
  if mask.dtype == bool:
    return mask.astype(np.uint8) * 255
  if mask.dtype.kind in "ui":
    return _integer_to_uint8(mask, name)
  if mask.dtype.kind == "f":
    return _float_to_uint8(mask, name)
  raise InputError(f"{name}: mask of unsupported type {mask.dtype}")


def decode_mask(data: bytes, name: str = "mask", orientation: str = "stored") -> np.ndarray:
  """Encoded bytes -> grey uint8 ``[H, W]`` in 0-255 (a palette PNG whose palette is not grey is
  a label map: index 0 background, every other index foreground)."""
  img, palette = decode_pixels(data, name, orientation)
  if palette is not None:
    colours = np.frombuffer(palette, np.uint8).reshape(-1, 3)
    img = img[:, :, :3]
    if not np.all(colours == colours[:, :1]):
      foreground = np.any(img != colours[0], axis=2)
      labels = np.unique(img[foreground].reshape(-1, 3), axis=0)
      if len(labels) > 1:
        _warn(name, f"palette (label) mask with {len(labels)} labels besides index 0: all of "
              "them count as foreground")
      return foreground.astype(np.uint8) * 255
  return as_mask(img, name)


def read_mask(path: str, orientation: str = "stored") -> np.ndarray:
  """A mask file -> grey uint8 ``[H, W]`` in 0-255 (``decode_mask``)."""
  return decode_mask(read_bytes(path), path, orientation)


def read_grey(path: str) -> np.ndarray:
  """An 8-bit grey file this package wrote -> uint8 ``[H, W]`` as stored (no encoding rule)."""
  img, _ = decode_pixels(read_bytes(path), path)
  if img.dtype != np.uint8 or img.ndim != 2:
    raise InputError(f"{path}: expected an 8-bit grey mask, got {img.dtype} with shape "
                     f"{img.shape}")
  return img
