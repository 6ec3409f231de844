"""Reading images and masks by one set of rules, checking outputs before the work, atomic writes.

Images come out as RGB uint8 ``[H, W, 3]``, masks as grey uint8 ``[H, W]`` (0-255, ``> 128`` is
foreground), as stored; a damaged file is an ``InputError`` naming it. The rules: the input rules
of docs/refining.md and docs/faults_and_files.md. libjpeg-turbo (simplejpeg: outside the GIL, its
warnings refused) decodes JPEGs, OpenCV the rest; Pillow reads headers, PNG checksums and EXIF.
"""

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import warnings
from io import BytesIO
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

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


class WriteError(OSError):
  """An output that could not be written: one line naming the target (``filename``) and cause."""

  def __str__(self) -> str:
    return f"{self.filename}: cannot be written ({self.strerror})"


GREY_TOLERANCE = 8  # colour channels that differ by no more than this are grey (JPEG noise).
TMP_MARK = ".tmp-"  # temporary names: <stem>.tmp-<pid>-<random>
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


def _decode(data: bytes, name: str, orientation: str = "stored"):
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
  return as_rgb(_decode(data, name, orientation)[0], name)


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
  img, palette = _decode(data, name, orientation)
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
  img, _ = _decode(read_bytes(path), path)
  if img.dtype != np.uint8 or img.ndim != 2:
    raise InputError(f"{path}: expected an 8-bit grey mask, got {img.dtype} with shape "
                     f"{img.shape}")
  return img


# ---------------------------------------------------------------------------------------------
# Outputs: checked before the work, written atomically, leftovers of killed runs removed.


def os_error_line(e: OSError) -> str:
  """An ``OSError`` as one line naming the path and the problem."""
  if e.filename is not None and e.strerror and not isinstance(e, WriteError):
    return f"{e.filename}: {e.strerror}"
  return str(e)


def one_line(e: BaseException) -> str:
  """An error's message on one line."""
  return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def error_line(e: BaseException) -> str:
  """An error as one line: an OS error names its path; any but a bad input's names its type."""
  if isinstance(e, OSError):
    return os_error_line(e)
  return one_line(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {one_line(e)}"


def _writable_dir(path: str) -> None:
  """Creates ``path`` if needed and proves a file can be made in it (``InputError`` if not)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"{path}: is a file, not a folder")
  try:
    os.makedirs(path, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()  # a file can be made there
  except OSError as e:
    raise InputError(f"{path}: cannot write in this folder ({e.strerror or e})") from None


def check_output_dir(path: str, inputs: Iterable[str] = (), create: bool = True) -> str:
  """Before any work: ``path`` as an output folder, created; ``InputError`` when it is a file,
  cannot be written, or is (or lies inside) one of the ``inputs`` folders. ``create=False``:
  only the checks that need no folder (before the inputs are listed)."""
  real = os.path.realpath(path)
  for folder in inputs:
    inside = os.path.realpath(folder or ".").rstrip(os.sep)
    if folder and os.path.isdir(folder) and (real == inside or real.startswith(inside + os.sep)):
      raise InputError(f"{path}: the output folder is (or lies inside) the input folder "
                       f"{folder}; its files would be mixed with or overwrite the inputs: "
                       "choose another output folder")
  if create:
    _writable_dir(path)
  elif os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"{path}: is a file, not a folder")
  return path


def check_output_file(path: str, inputs: Iterable[str] = ()) -> str:
  """Before any work: ``path`` as an output image file (its folder created); ``InputError`` when
  it is a folder, no image name OpenCV writes, one of the ``inputs``, or in an unwritable folder."""
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


def _alive(pid: str) -> bool:
  """Whether process ``pid`` (from a temporary name) runs; False for no pid."""
  try:
    os.kill(int(pid), 0)
  except (ValueError, ProcessLookupError):
    return False
  except PermissionError:
    pass
  return True


def remove_leftovers(directory: str, stem: str = "") -> List[str]:
  """Removes the ``<stem>.tmp-<pid>-*`` files and folders in ``directory`` whose process is gone
  (killed writes); returns their names."""
  try:
    names = sorted(os.listdir(directory))
  except OSError:
    return []
  removed = []
  for f in names:
    if f.startswith(stem + TMP_MARK) and not _alive(f[len(stem + TMP_MARK):].split("-", 1)[0]):
      path = os.path.join(directory, f)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
      removed.append(f)
  return removed


# The temporary files being filled now and whether writes were stopped (under ``_WRITES_LOCK``).
_WRITES_LOCK, _FILLING, _STOPPED = threading.Lock(), set(), threading.Event()


def stop_writes() -> List[str]:
  """Ends this process's writes for good (a run stopped by a signal): removes the temporary files
  being filled and makes every later write a ``WriteError`` (``ECANCELED``); returns them."""
  with _WRITES_LOCK:
    _STOPPED.set()
    removed = sorted(_FILLING)
    for tmp in removed:
      with contextlib.suppress(OSError):
        os.remove(tmp)
    _FILLING.clear()
  return removed


def _write_error(path: str, e: OSError) -> WriteError:
  return WriteError(e.errno or errno.EIO, e.strerror or str(e) or type(e).__name__, path)


def _replace(path: str, fill: Callable[[int, str], None]) -> None:
  """``fill(fd, tmp)`` fills a new temporary file beside ``path`` (mode 0o666 less the umask),
  which is fsynced, closed and renamed over ``path``, the folder then fsynced. A failure leaves
  ``path`` as it was and no temporary file, and raises ``WriteError`` naming ``path``."""
  directory = os.path.dirname(os.path.abspath(path))
  with _WRITES_LOCK:
    try:
      if _STOPPED.is_set():
        raise OSError(errno.ECANCELED, "the run was interrupted: no more writes")
      os.makedirs(directory, exist_ok=True)
      tmp = os.path.join(directory, tmp_prefix() + secrets.token_hex(8) + os.path.splitext(path)[1])
      fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
      raise _write_error(path, e) from None
    _FILLING.add(tmp)
  try:
    try:
      fill(fd, tmp)
      os.fsync(fd)  # a full disk or a failing device shows here at the latest
    finally:
      os.close(fd)  # network file systems report write errors at close
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise _write_error(path, e) from None
    raise
  finally:
    with _WRITES_LOCK:
      _FILLING.discard(tmp)
  with contextlib.suppress(OSError):  # makes the rename durable where the OS allows it
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


def write_bytes(path: str, data: bytes) -> None:
  """Creates or replaces ``path`` with ``data``, atomically and durably (``_replace``)."""
  def fill(fd: int, tmp: str) -> None:
    view = memoryview(data)
    while view:  # every byte checked (a full disk raises ENOSPC)
      n = os.write(fd, view)
      if n <= 0:
        raise OSError(errno.EIO, "the system wrote nothing")
      view = view[n:]
  _replace(path, fill)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Creates ``path`` atomically from a writer that wants a file name: ``write(tmp)`` fills a
  temporary ``.tmp-<pid>-*`` file beside it, then fsynced and renamed (``_replace``)."""
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
  """RGB ``[H, W, 3]`` (or grey) -> the bytes of ``ext`` (``.png``, ``.jpg``...) by OpenCV;
  ``ValueError`` when OpenCV cannot encode it."""
  img = np.asarray(img)
  what = f"OpenCV cannot encode a {img.dtype} {tuple(img.shape)} image as {ext}"
  try:
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(
        img[:, :, ::-1] if img.ndim == 3 and img.shape[2] == 3 else img))
  except cv2.error as e:
    raise ValueError(f"{what} ({str(e).strip().splitlines()[-1]})") from None
  if not ok:
    raise ValueError(what)
  return buf.tobytes()


def write_image(path: str, img: np.ndarray) -> None:
  """Writes RGB (or grey) ``img`` as ``path``'s extension says, atomically (``write_bytes``);
  ``WriteError`` names ``path`` and the cause (an image OpenCV cannot encode too)."""
  try:
    data = encode_image(img, os.path.splitext(path)[1] or ".png")
  except ValueError as e:
    raise WriteError(errno.EINVAL, str(e), path) from None
  write_bytes(path, data)


def is_complete_output(path: str) -> bool:
  """Whether ``path`` is a whole output: a non-empty regular file (written under a temporary name
  and renamed, so a killed write leaves no file under the final name)."""
  try:
    st = os.stat(path)
  except OSError:
    return False
  return stat.S_ISREG(st.st_mode) and st.st_size > 0


@contextlib.contextmanager
def folder_written_atomically(path: str) -> Iterator[str]:
  """``with folder_written_atomically(PATH) as tmp:`` fill ``tmp``, a new folder beside PATH
  (leftovers of killed writes removed first); at the end it replaces PATH, so PATH is whole or as
  it was. On an error the temporary folder is removed and the error raised."""
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
