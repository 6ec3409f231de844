"""Reading images and masks by one set of rules, checking outputs before the work, atomic writes.

Every reader decodes the file's bytes with ``cv2.imdecode(..., IMREAD_UNCHANGED)``: pixels as
stored, as PIL (which the published code reads with, without ``exif_transpose``) gives them, so
an image and its mask always stay aligned. A file whose EXIF orientation is not 1 (JPEG APP1 or
PNG eXIf) is read as stored and warned about in one line (viewers show it turned; its mask must
match the stored pixels and the outputs are not turned); ``orientation="exif"`` applies the tag
instead, as viewers and PIL's ``exif_transpose`` do (docs/faults_and_files.md).

Decoding problems are errors (``InputError`` naming the file). OpenCV's ``imread`` decodes a
truncated JPEG to a half-grey image with only a warning on stderr, so the bytes are checked first
(``check_encoded``): a JPEG's markers are walked to its end-of-image marker (data after it, such as
a motion photo's video, is allowed), and a PNG's chunks are walked to ``IEND`` with every chunk's
CRC checked. A JPEG whose data is damaged inside (zeroed or overwritten bytes, its end intact)
decodes without an error too; libjpeg only prints "Corrupt JPEG data: ..." on stderr. So a JPEG
is decoded listening to that stream (``imdecode``): a corrupt-data report is an ``InputError``
(a few stray bytes before the end marker, a known encoder quirk, are only warned about). Other
formats rely on OpenCV's own decoding errors.

Mask encodings (``as_mask`` for arrays, ``decode_mask``/``read_mask`` for files; the README's
"Input rules" lists them): a mask becomes grey uint8 ``[H, W]`` in 0-255, where ``> 128`` is
foreground.

- 8-bit grey: as it is; but a mask whose values are only {0, 1} is a binary mask (1 -> 255).
- 16-bit grey: {0, 1} is binary; all values <= 255 are 8-bit values (warned); otherwise scaled to
  8 bits (0/65535 -> 0/255).
- bool: 0/255. Float: [0, 1] is a probability (x 255, rounded); otherwise [0, 255] values;
  anything else (negative, above 255, NaN) is refused. Other integer types: {0, 1} is
  binary, other values in 0-255 are 8-bit values, anything else is refused.
- Alpha (grey+alpha, RGBA): an alpha that is not constant holds the mask (warned when the colour
  channels hold something else: neither constant nor equal to the alpha); a constant alpha is
  dropped.
- Colour: channels that agree within ``GREY_TOLERANCE`` are grey (BT.601 weights, as PIL's
  ``convert('L')``); otherwise a colour mask: every pixel that is not black is foreground (warned).
- Palette PNG: a grey palette is read as grey; any other palette is a label map: index 0 is
  background, every other index foreground (warned when several labels occur).

A rule that had to guess warns once per file (``MaskWarning``, through ``warnings``); so do an
ignored EXIF orientation and stray JPEG bytes (``InputWarning``, ``MaskWarning``'s base).

Outputs (``write_image``, ``write_text``, ``write_bytes``): encoded in memory, written to a
temporary file in the target's folder, fsynced, renamed over the target, the folder fsynced; any
failure (a full disk included: OpenCV's ``imwrite`` reports success when only its last flush
fails) is a ``WriteError`` naming the target and the cause, and leaves neither a temporary file
nor a partial target. ``is_complete_output`` tells whether an output file is whole.
"""

import contextlib
import errno
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import warnings
import zlib
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import cv2
import numpy as np


class InputError(ValueError):
  """Bad user input: the message names the file and the problem."""


class InputWarning(UserWarning):
  """An input read by a rule the user may not expect (the message names the file and the rule)."""


class MaskWarning(InputWarning):
  """A mask encoding rule had to guess (the message names the file and the rule)."""


class WriteError(OSError):
  """An output that could not be written. ``str(e)`` is one line naming the target and the cause;
  ``errno`` and ``strerror`` are the cause's, ``filename`` the target."""

  def __str__(self) -> str:
    return f"{self.filename}: cannot be written ({self.strerror})"


GREY_TOLERANCE = 8  # colour channels that differ by no more than this are grey (JPEG noise).
TMP_MARK = ".tmp-"  # temporary names: <stem>.tmp-<pid>-<random>
ORIENTATIONS = ("stored", "exif")  # how readers treat an EXIF orientation tag
JPEG_STRAY_BYTES = 16  # at most this many stray bytes before a JPEG's end marker: warned only
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_PALETTE = 3  # IHDR colour type
# Inside entropy-coded JPEG data, 0xFF is followed by 0x00 (stuffing) or a restart marker
# (0xD0-0xD7); anything else starts the next marker.
_JPEG_SEGMENT_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


# ---------------------------------------------------------------------------------------------
# Checking and decoding bytes.


def _jpeg_complete(data: bytes) -> bool:
  """Whether the JPEG's markers lead to its end-of-image marker (FFD9)."""
  n, pos = len(data), 2
  while True:
    if pos >= n or data[pos] != 0xFF:
      return False
    while pos < n and data[pos] == 0xFF:  # fill bytes
      pos += 1
    if pos >= n:
      return False
    code = data[pos]
    pos += 1
    if code == 0xD9:
      return True
    if 0xD0 <= code <= 0xD7 or code == 0x01:  # markers without a length
      continue
    if pos + 2 > n:
      return False
    pos += int.from_bytes(data[pos:pos + 2], "big")
    if pos > n:
      return False
    if code == 0xDA:  # start of scan: entropy-coded data up to the next marker
      found = _JPEG_SEGMENT_END.search(data, pos)
      if found is None:
        return False
      pos = found.start()


def _png_chunks(data: bytes, name: str) -> dict:
  """``{b'IHDR': ..., b'PLTE': ..., b'eXIf': ...}`` (those present) of a PNG whose chunks, every
  CRC checked, lead to ``IEND``; ``InputError`` otherwise."""
  chunks, pos, view = {}, len(_PNG_MAGIC), memoryview(data)
  while pos + 12 <= len(data):
    length, kind = struct.unpack(">I4s", view[pos:pos + 8])
    end = pos + 12 + length
    if end > len(data):
      break
    body = view[pos + 8:end - 4]
    if zlib.crc32(view[pos + 4:end - 4]) != struct.unpack(">I", view[end - 4:end])[0]:
      raise InputError(f"{name}: corrupt PNG (bad checksum in its {kind.decode('latin-1')} "
                       "chunk)")
    if kind in (b"IHDR", b"PLTE", b"eXIf"):
      chunks.setdefault(kind, bytes(body))
    if kind == b"IEND":
      return chunks
    pos = end
  raise InputError(f"{name}: truncated PNG (the file ends before its IEND chunk)")


def check_encoded(data: bytes, name: str) -> dict:
  """Raises ``InputError`` for an empty, truncated or corrupt JPEG/PNG (as far as its bytes tell:
  damage inside a JPEG's data shows only when decoding, ``imdecode``); returns the PNG's chunks
  (``{b'IHDR': ..., b'PLTE': ..., b'eXIf': ...}``), ``{}`` for other formats."""
  if not data:
    raise InputError(f"{name}: empty file")
  if data.startswith(_JPEG_MAGIC):
    if not _jpeg_complete(data):
      raise InputError(f"{name}: truncated or corrupt JPEG (no end-of-image marker after its "
                       "data)")
    return {}
  if data.startswith(_PNG_MAGIC):
    return _png_chunks(data, name)
  return {}


# EXIF orientation (TIFF tag 0x0112) as viewers apply it to the stored pixels.
_ORIENTATION_WORDS = {2: "mirrored left-right", 3: "turned 180°", 4: "mirrored top-bottom",
                      5: "mirrored and turned 90° counter-clockwise", 6: "turned 90° clockwise",
                      7: "mirrored and turned 90° clockwise", 8: "turned 90° counter-clockwise"}
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _tiff_orientation(tiff: bytes) -> int:
  """The Orientation entry of a TIFF header's first IFD (EXIF's layout); 1 when absent or odd."""
  if len(tiff) < 8 or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
    return 1
  order = "<" if tiff[:2] == b"II" else ">"
  ifd = struct.unpack(order + "I", tiff[4:8])[0]
  if ifd + 2 > len(tiff):
    return 1
  count = struct.unpack(order + "H", tiff[ifd:ifd + 2])[0]
  for i in range(count):
    entry = ifd + 2 + 12 * i
    if entry + 12 > len(tiff):
      break
    tag, kind, n = struct.unpack(order + "HHI", tiff[entry:entry + 8])
    if tag == 0x0112 and kind == 3 and n >= 1:  # SHORT, stored in the entry itself
      value = struct.unpack(order + "H", tiff[entry + 8:entry + 10])[0]
      return value if value in _ORIENT else 1
  return 1


def _jpeg_exif(data: bytes) -> Optional[bytes]:
  """The TIFF block of a JPEG's first APP1 ``Exif`` segment (the markers before its first scan)."""
  pos, n = 2, len(data)
  while pos + 4 <= n and data[pos] == 0xFF:
    code = data[pos + 1]
    if code == 0xFF:  # fill byte
      pos += 1
      continue
    if code in (0xDA, 0xD9):  # start of scan, end of image: no metadata after
      return None
    if 0xD0 <= code <= 0xD7 or code == 0x01:
      pos += 2
      continue
    length = int.from_bytes(data[pos + 2:pos + 4], "big")
    body = data[pos + 4:pos + 2 + length]
    if code == 0xE1 and body.startswith(b"Exif\x00\x00"):
      return body[6:]
    pos += 2 + length
  return None


def exif_orientation(data: bytes, chunks: Optional[dict] = None) -> int:
  """The EXIF orientation (1-8) of JPEG (APP1 ``Exif``) or PNG (``eXIf`` chunk) bytes; 1 when
  the file has none (other formats: 1). ``chunks``: ``check_encoded``'s answer, if at hand."""
  if data.startswith(_JPEG_MAGIC):
    tiff = _jpeg_exif(data)
  elif data.startswith(_PNG_MAGIC):
    if chunks is None:
      try:
        chunks = _png_chunks(data, "")
      except InputError:
        return 1
    tiff = chunks.get(b"eXIf")
  else:
    tiff = None
  return _tiff_orientation(tiff) if tiff else 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
  """Stored pixels ``[H, W, ...]`` as viewers show them under an EXIF ``orientation`` (1-8)."""
  if orientation == 1:
    return img
  return np.ascontiguousarray(_ORIENT[orientation](img))


# libjpeg reports damaged data only as a warning printed on stderr (the first of each decode).
_JPEG_CORRUPT = re.compile(r"^(Corrupt JPEG data: (?!bad ICC marker).*|Premature end of JPEG file"
                           r"|Inconsistent progression sequence .*)$")
_JPEG_STRAY = re.compile(r"^Corrupt JPEG data: (\d+) extraneous bytes before marker 0xd9$")
_STDERR_LOCK = threading.Lock()


def _sink() -> int:
  """A file descriptor to catch stderr in (memory where the OS offers it)."""
  if hasattr(os, "memfd_create"):
    try:
      return os.memfd_create("crm-jax-stderr", getattr(os, "MFD_CLOEXEC", 0))
    except OSError:
      pass
  fd, path = tempfile.mkstemp(prefix=tmp_prefix())
  os.remove(path)
  return fd


def _imdecode_listening(buf: np.ndarray) -> Tuple[Optional[np.ndarray], List[str]]:
  """``cv2.imdecode(buf, IMREAD_UNCHANGED)`` and the lines the decoder printed on stderr
  meanwhile. The process's stderr is caught for the call (one call at a time); whatever else was
  printed meanwhile, by other threads, is passed on. Where stderr cannot be caught, no lines."""
  with _STDERR_LOCK:
    try:
      if sys.stderr is not None:
        sys.stderr.flush()
      sink = _sink()
    except (OSError, ValueError, AttributeError):
      return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), []
    try:
      try:
        saved = os.dup(2)
      except OSError:
        return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), []
      try:
        os.dup2(sink, 2)
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
      finally:
        os.dup2(saved, 2)
        os.close(saved)
      os.lseek(sink, 0, os.SEEK_SET)
      parts = []
      while True:
        part = os.read(sink, 1 << 16)
        if not part:
          break
        parts.append(part)
    finally:
      os.close(sink)
  lines = b"".join(parts).decode("utf-8", "replace").splitlines(keepends=True)
  said = [s.strip() for s in lines if _JPEG_CORRUPT.match(s.strip())]
  others = "".join(s for s in lines if not _JPEG_CORRUPT.match(s.strip()))
  if others:
    try:
      os.write(2, others.encode())
    except OSError:
      pass
  return img, said


def imdecode(data: bytes, name: str) -> np.ndarray:
  """The file's pixels as OpenCV decodes them (``IMREAD_UNCHANGED``: stored orientation, BGR(A)
  order), after ``check_encoded``; ``InputError`` naming ``name`` for unreadable data and for a
  JPEG whose decoder reports damaged data (warned only for at most ``JPEG_STRAY_BYTES`` stray
  bytes before its end marker)."""
  return _imdecode(data, name)[0]


def _imdecode(data: bytes, name: str) -> Tuple[np.ndarray, dict]:
  """``imdecode`` and ``check_encoded``'s chunks."""
  chunks = check_encoded(data, name)
  buf = np.frombuffer(data, dtype=np.uint8)
  if data.startswith(_JPEG_MAGIC):
    img, said = _imdecode_listening(buf)
    for line in said:
      stray = _JPEG_STRAY.match(line)
      if stray and int(stray.group(1)) <= JPEG_STRAY_BYTES:
        warnings.warn(f"{name}: {stray.group(1)} stray bytes before the JPEG's end marker "
                      f"(libjpeg: \"{line}\"); read anyway, as encoders that pad their data "
                      "leave such bytes", InputWarning, stacklevel=3)
        continue
      raise InputError(f"{name}: corrupt JPEG, its data is damaged (libjpeg: \"{line}\"); "
                       "its pixels would be wrong")
  else:
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
  if img is None:
    raise InputError(f"{name}: unreadable or not an image")
  return img, chunks


def _check_orientation(orientation: str) -> None:
  if orientation not in ORIENTATIONS:
    raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")


def _decode(data: bytes, name: str, orientation: str = "stored") -> Tuple[np.ndarray, dict]:
  """Pixels (RGB or RGBA order; stored, or turned by the EXIF tag with ``orientation="exif"``)
  and the PNG chunks."""
  _check_orientation(orientation)
  img, chunks = _imdecode(data, name)
  img = img_bgr_to_rgb(img)
  tag = exif_orientation(data, chunks)
  if tag != 1:
    if orientation == "exif":
      img = apply_orientation(img, tag)
    else:
      h, w = img.shape[:2]
      warnings.warn(f"{name}: EXIF orientation {tag} ({_ORIENTATION_WORDS[tag]} in viewers) "
                    f"ignored, as in the published code: read as stored, {w}x{h}; image and "
                    "mask must match as stored and outputs are not turned "
                    "(docs/faults_and_files.md)", InputWarning, stacklevel=3)
  return img, chunks


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
  """OpenCV's BGR/BGRA channel order as RGB/RGBA (grey unchanged)."""
  if img.ndim == 3 and img.shape[2] == 3:
    return img[:, :, ::-1]
  if img.ndim == 3 and img.shape[2] == 4:
    return img[:, :, [2, 1, 0, 3]]
  return img


# ---------------------------------------------------------------------------------------------
# Images.


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


def decode_image(data: bytes, name: str = "image", orientation: str = "stored") -> np.ndarray:
  """Encoded bytes -> RGB uint8 ``[H, W, 3]`` (``as_rgb``). ``orientation``: ``"stored"``
  (default, as published: an EXIF orientation is ignored, with a warning) or ``"exif"`` (the
  pixels turned as viewers show them)."""
  return as_rgb(_decode(data, name, orientation)[0], name)


def read_image(path: str, orientation: str = "stored") -> np.ndarray:
  """An image file as RGB uint8 ``[H, W, 3]`` (``decode_image``)."""
  return decode_image(read_bytes(path), path, orientation)


# ---------------------------------------------------------------------------------------------
# Masks.


def _warn(name: str, rule: str) -> None:
  warnings.warn(f"{name}: {rule}", MaskWarning, stacklevel=3)


def _grey_from_colour(rgb: np.ndarray, name: str) -> np.ndarray:
  """``[H, W, 3]`` (uint8/uint16/float) -> ``[H, W]`` of the same kind (see the module rules)."""
  spread = rgb.max(axis=2).astype(np.float64) - rgb.min(axis=2)
  if spread.max(initial=0) <= GREY_TOLERANCE:
    weights = np.asarray([0.299, 0.587, 0.114])
    grey = rgb.astype(np.float64) @ weights
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
  """Grey uint8 ``[H, W]`` in 0-255 from any common mask array (the module's rules).

  Accepts ``[H, W]``, ``[H, W, 1]``, RGB ``[H, W, 3]``, grey+alpha ``[H, W, 2]`` and RGBA
  ``[H, W, 4]``, of bool, unsigned/signed integer or float values. Raises ``InputError`` for
  anything it cannot read unambiguously; warns (``MaskWarning``) where a rule guessed.
  """
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[2] in (2, 4):
    alpha = mask[:, :, -1]
    colour = mask[:, :, :-1]
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
    if mask.dtype == bool:
      mask = mask.any(axis=2)
    else:
      mask = _grey_from_colour(mask, name)
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


def _palette_mask(rgb: np.ndarray, plte: bytes, name: str) -> Optional[np.ndarray]:
  """A palette PNG as a mask (None when its palette is grey: then it is read as grey)."""
  palette = np.frombuffer(plte, np.uint8).reshape(-1, 3)
  if np.all(palette == palette[:, :1]):
    return None
  foreground = np.any(rgb[:, :, :3] != palette[0], axis=2)
  labels = np.unique(rgb[:, :, :3][foreground].reshape(-1, 3), axis=0)
  if len(labels) > 1:
    _warn(name, f"palette (label) mask with {len(labels)} labels besides index 0: all of them "
          "count as foreground")
  return foreground.astype(np.uint8) * 255


def decode_mask(data: bytes, name: str = "mask", orientation: str = "stored") -> np.ndarray:
  """Encoded bytes -> grey uint8 ``[H, W]`` in 0-255 (the module's encoding rules;
  ``orientation`` as for ``decode_image``)."""
  img, chunks = _decode(data, name, orientation)
  ihdr = chunks.get(b"IHDR", b"")
  if len(ihdr) >= 10 and ihdr[9] == _PNG_PALETTE:
    if b"PLTE" not in chunks:
      raise InputError(f"{name}: corrupt PNG (palette image without a PLTE chunk)")
    mask = _palette_mask(img, chunks[b"PLTE"], name)
    if mask is not None:
      return mask
    img = img[:, :, :3]
  return as_mask(img, name)


def read_mask(path: str, orientation: str = "stored") -> np.ndarray:
  """A mask file as grey uint8 ``[H, W]`` in 0-255 (``decode_mask``: the encoding rules)."""
  return decode_mask(read_bytes(path), path, orientation)


def read_grey(path: str) -> np.ndarray:
  """An 8-bit grey file this package wrote (``uint8(prob * 255)``) as uint8 ``[H, W]``, values
  as stored: no encoding rule applies (a faint mask of only 0s and 1s stays faint)."""
  img, _ = _decode(read_bytes(path), path)
  if img.dtype != np.uint8 or img.ndim != 2:
    raise InputError(f"{path}: expected an 8-bit grey mask, got {img.dtype} with shape "
                     f"{img.shape}")
  return img


def show_warnings_as_lines() -> None:
  """Command lines: print each warning as one line ``warning: <message>``."""
  warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


# ---------------------------------------------------------------------------------------------
# Outputs: checked before the work, written atomically, leftovers of killed runs removed.


def os_error_line(e: OSError) -> str:
  """An ``OSError`` as one line naming the path and the problem."""
  if isinstance(e, WriteError):
    return str(e)
  if e.filename is not None and e.strerror:
    return f"{e.filename}: {e.strerror}"
  return str(e)


def _same_or_inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _writable_dir(path: str) -> None:
  """Creates ``path`` if needed and proves a file can be made in it (``InputError`` if not)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"{path}: is a file, not a folder")
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=tmp_prefix(), dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise InputError(f"{path}: cannot write in this folder ({e.strerror or e})") from None


def check_output_dir(path: str, inputs: Iterable[str] = ()) -> str:
  """Before any work: ``path`` as an output folder, created if needed; ``InputError`` when it is
  a file, cannot be written, or is (or lies inside) one of the ``inputs`` folders."""
  for folder in inputs:
    if folder and os.path.isdir(folder) and _same_or_inside(path, folder):
      raise InputError(f"{path}: the output folder is (or lies inside) the input folder "
                       f"{folder}; its files would be mixed with or overwrite the inputs: "
                       "choose another output folder")
  _writable_dir(path)
  return path


def check_output_file(path: str, inputs: Iterable[str] = ()) -> str:
  """Before any work: ``path`` as an output image file; ``InputError`` when it is a folder, has
  no image extension OpenCV writes, is one of the ``inputs`` files, or its folder cannot be
  written. The folder is created if needed."""
  if path.endswith(("/", os.sep)) or os.path.isdir(path):
    raise InputError(f"{path}: is a folder; give an image file name such as refined.png")
  if not cv2.haveImageWriter(path):
    raise InputError(f"{path}: not an image file name (use a .png extension, or .jpg, .bmp, "
                     ".tif)")
  for f in inputs:
    if f and os.path.exists(path) and os.path.exists(f) and os.path.samefile(path, f):
      raise InputError(f"{path}: is the input {f}; writing would overwrite it: choose another "
                       "output file")
  try:
    _writable_dir(os.path.dirname(os.path.abspath(path)))
  except InputError as e:
    raise InputError(f"{path}: cannot be written there ({e})") from None
  return path


def tmp_prefix(stem: str = "") -> str:
  """The start of a temporary name made by this process: ``<stem>.tmp-<pid>-``."""
  return f"{stem}{TMP_MARK}{os.getpid()}-"


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_leftovers(directory: str, stem: str = "") -> List[str]:
  """Removes the temporary files (and folders) named ``<stem>.tmp-<pid>-*`` in ``directory``
  that a killed process left (its ``pid`` runs no more; older names without a pid too).
  Returns the names removed. A missing folder has none."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  removed = []
  for f in sorted(names):
    if not f.startswith(stem + TMP_MARK):
      continue
    pid = f[len(stem + TMP_MARK):].split("-", 1)[0]
    if pid.isdigit() and _alive(int(pid)):
      continue
    path = os.path.join(directory, f)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      try:
        os.remove(path)
      except FileNotFoundError:
        pass
    removed.append(f)
  return removed


# ---------------------------------------------------------------------------------------------
# Sizes from file headers (for scheduling work without decoding).


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers
_HEAD_BYTES = 1 << 16


def encoded_size(data: bytes) -> Optional[Tuple[int, int]]:
  """``(H, W)`` from the header of PNG or JPEG bytes; None for other formats or a header that
  ends early (the object is then loaded to learn its size)."""
  if data.startswith(_PNG_MAGIC) and len(data) >= 24 and data[12:16] == b"IHDR":
    w, h = struct.unpack(">II", data[16:24])
    return int(h), int(w)
  if not data.startswith(b"\xff\xd8"):
    return None
  pos = 2
  while pos + 4 <= len(data):
    if data[pos] != 0xFF:
      return None
    code = data[pos + 1]
    if code == 0xFF:  # fill byte
      pos += 1
      continue
    if 0xD0 <= code <= 0xD9 or code == 0x01:  # markers without a length
      pos += 2
      continue
    length = int.from_bytes(data[pos + 2:pos + 4], "big")
    if code in _JPEG_SOF:
      if pos + 9 > len(data):
        return None
      h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
      return int(h), int(w)
    pos += 2 + length
  return None


def file_image_size(path: str) -> Optional[Tuple[int, int]]:
  """``(H, W)`` of an image file from its header (``encoded_size``), reading the whole file only
  when the header is not in its first 64 KiB; None when it cannot be told."""
  try:
    with open(path, "rb") as f:
      head = f.read(_HEAD_BYTES)
    size = encoded_size(head)
    if size is None and len(head) == _HEAD_BYTES:
      size = encoded_size(read_bytes(path))
  except (OSError, InputError):
    return None
  return size


def _umask() -> int:
  """The process's umask, read without changing it where the OS tells it (Linux), since setting
  it to read it races with threads creating files."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _write_error(path: str, e: OSError) -> WriteError:
  return WriteError(e.errno or errno.EIO, e.strerror or str(e) or type(e).__name__, path)


def _fsync_dir(directory: str) -> None:
  """Makes a rename in ``directory`` durable where the OS allows it (not on every OS or file
  system: then nothing)."""
  try:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    n = os.write(fd, view)
    if n <= 0:  # regular files raise (ENOSPC...) rather than write nothing; never loop forever
      raise OSError(errno.EIO, "the system wrote nothing")
    view = view[n:]


# The temporary files this process is filling now (under ``_WRITES_LOCK``), and whether writes
# were stopped (``stop_writes``; set and read under the same lock).
_WRITES_LOCK = threading.Lock()
_FILLING: set = set()
_STOPPED = threading.Event()


def stop_writes() -> List[str]:
  """Ends this process's output writes for good, for a run that a signal interrupts: the
  temporary files being filled now (by any thread) are removed and every later write raises
  ``WriteError`` (``ECANCELED``), so that no temporary file is left once the caller exits.
  A write whose rename already happened is whole. Returns the paths removed."""
  with _WRITES_LOCK:
    _STOPPED.set()
    removed = sorted(_FILLING)
    for tmp in removed:
      try:
        os.remove(tmp)
      except OSError:
        pass
    _FILLING.clear()
  return removed


def _replace(path: str, fill: Callable[[int, str], None]) -> None:
  """The one way outputs are written: ``fill(fd, tmp)`` fills a new temporary file in the
  target's folder, which is fsynced, closed and renamed over ``path``; then the folder is fsynced.
  A failure removes the temporary file, leaves ``path`` as it was, and raises ``WriteError``
  (an ``OSError`` naming ``path``, never the temporary file) for an ``OSError``; so does a
  write after ``stop_writes``."""
  directory = os.path.dirname(os.path.abspath(path))
  with _WRITES_LOCK:
    try:
      if _STOPPED.is_set():
        raise OSError(errno.ECANCELED, "the run was interrupted: no more writes")
      os.makedirs(directory, exist_ok=True)
      fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(), suffix=os.path.splitext(path)[1],
                                 dir=directory)
    except OSError as e:
      raise _write_error(path, e) from None
    _FILLING.add(tmp)
  try:
    _fill_and_rename(path, fill, fd, tmp)
  finally:
    with _WRITES_LOCK:
      _FILLING.discard(tmp)
  _fsync_dir(directory)


def _fill_and_rename(path: str, fill: Callable[[int, str], None], fd: int, tmp: str) -> None:
  try:
    try:
      fill(fd, tmp)
      os.fchmod(fd, 0o666 & ~_umask())  # what a plain open(path, "w") gives
      os.fsync(fd)  # a full disk or a failing device shows here at the latest
    finally:
      os.close(fd)  # network file systems report write errors at close
    os.replace(tmp, path)
  except BaseException as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    if isinstance(e, OSError):
      raise _write_error(path, e) from None
    raise


def write_bytes(path: str, data: bytes) -> None:
  """Creates or replaces ``path`` with ``data``, atomically and durably (``_replace``): the
  target is either as before or whole; ``WriteError`` names ``path`` and the cause."""
  _replace(path, lambda fd, tmp: _write_all(fd, data))


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Creates ``path`` atomically from a writer that wants a file name: ``write(tmp)`` fills a
  temporary file beside it, which is then fsynced and renamed (``_replace``; prefer
  ``write_bytes`` where the bytes can be made in memory).

  The temporary name is ``.tmp-<pid>-*`` (``remove_leftovers`` removes those of killed runs).
  The file gets the permissions a plain ``open(path, "w")`` would give (0o666 less the umask);
  a failure leaves no temporary file behind and ``path`` untouched; an ``OSError`` becomes a
  ``WriteError`` naming ``path`` (never the temporary file).
  """
  def fill(fd: int, tmp: str) -> None:
    write(tmp)
    written = os.open(tmp, os.O_RDONLY)  # the writer may have made a new file under the name
    try:
      os.fsync(written)
    finally:
      os.close(written)
  _replace(path, fill)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically and durably (``write_bytes``)."""
  write_bytes(path, text.encode("utf-8"))


def encode_image(img: np.ndarray, ext: str = ".png") -> bytes:
  """An RGB (or grey) image encoded in memory by OpenCV as ``ext`` (``.png``, ``.jpg``...);
  ``ValueError`` when OpenCV cannot encode it."""
  img = np.asarray(img)
  if img.ndim == 3 and img.shape[2] == 3:
    img = img[:, :, ::-1]
  try:
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(img))
  except cv2.error as e:
    raise ValueError(f"OpenCV cannot encode a {img.dtype} {tuple(img.shape)} image as {ext} "
                     f"({str(e).strip().splitlines()[-1]})") from None
  if not ok:
    raise ValueError(f"OpenCV cannot encode a {img.dtype} {tuple(img.shape)} image as {ext}")
  return buf.tobytes()


def write_image(path: str, img: np.ndarray) -> None:
  """Writes a PNG/JPG (the format of ``path``'s extension) atomically and durably: encoded in
  memory, then ``write_bytes``. RGB in. ``WriteError`` names ``path`` and the cause (an image
  OpenCV cannot encode included)."""
  try:
    data = encode_image(img, os.path.splitext(path)[1] or ".png")
  except ValueError as e:
    raise WriteError(errno.EINVAL, str(e), path) from None
  write_bytes(path, data)


def is_complete_output(path: str) -> bool:
  """Whether ``path`` is a whole image file, as an output must be to count as done: a PNG whose
  chunks, every CRC checked, lead to ``IEND`` (the whole file is read; no decompression); a
  JPEG whose markers lead to its end marker; another format that OpenCV decodes. False for a
  missing, empty, truncated or damaged file (a rerun then writes it again)."""
  try:
    data = read_bytes(path)
    check_encoded(data, path)
  except InputError:
    return False
  if data.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
    return True
  return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


@contextlib.contextmanager
def folder_written_atomically(path: str) -> Iterator[str]:
  """``with folder_written_atomically(PATH) as tmp:`` fill ``tmp``, a new folder beside PATH
  (leftovers of killed writes of PATH removed first); when the block ends, ``tmp`` replaces
  PATH (a folder there is removed), so PATH is either whole or as it was. On an error the
  temporary folder is removed and the error raised; an ``OSError`` making it is raised as is."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  remove_leftovers(parent, os.path.basename(path))
  tmp = tempfile.mkdtemp(prefix=tmp_prefix(os.path.basename(path)), dir=parent)
  try:
    yield tmp
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
