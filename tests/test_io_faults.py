"""Faults around files (crm_jax.io): write errors such as a full disk, what counts as a complete
output, JPEGs damaged inside, EXIF orientation (docs/faults_and_files.md). No JAX."""

import errno
import os
import signal
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from io import BytesIO

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from crm_jax import io, metrics
from crm_jax import outputs
from crm_jax.io import InputError, InputWarning
from crm_jax.outputs import WriteError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "crm_jax", "assets", "demo_big")
NOSPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def _noise(h=96, w=128, channels=3, seed=0):
  """Noise PNGs do not compress: their size is known to be about h * w * channels."""
  rng = np.random.default_rng(seed)
  shape = (h, w, channels) if channels > 1 else (h, w)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _photo(seed=1, h=120, w=160):
  rng = np.random.default_rng(seed)
  return cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (9, 9), 3)


def _jpeg(img, **params):
  flags = []
  for key, value in params.items():
    flags += [getattr(cv2, f"IMWRITE_JPEG_{key.upper()}"), value]
  ok, buf = cv2.imencode(".jpg", img, flags)
  assert ok
  return buf.tobytes()


def _demo_jpegs():
  names = sorted(f for f in os.listdir(DEMO) if f.endswith(".jpg"))
  assert names
  return [os.path.join(DEMO, f) for f in names]


def _leftovers(folder):
  return [f for f in os.listdir(folder) if outputs.TMP_MARK in f]


# ---------------------------------------------------------------------------------------------
# Writes: a failure at any point leaves the target as it was and no temporary file.


class _Faults:
  """os.write that writes ``budget`` bytes in all, then fails with ``err`` (a disk that fills)."""

  def __init__(self, budget, err=errno.ENOSPC):
    self.budget, self.err, self.real = budget, err, os.write

  def write(self, fd, data):
    if self.budget <= 0:
      raise OSError(self.err, os.strerror(self.err))
    n = self.real(fd, bytes(data[:self.budget]))
    self.budget -= n
    return n


def _targets(tmp_path):
  img = _noise()
  png = outputs.encode_image(img, ".png")
  text = '{"a": ' + "1" * 5000 + "}\n"
  return [("image", str(tmp_path / "out.png"), lambda p: outputs.write_image(p, img), len(png)),
          ("text", str(tmp_path / "summary.json"), lambda p: outputs.write_text(p, text), len(text))]


@pytest.mark.parametrize("share", [0.0, 0.001, 0.5, 0.999])
@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_during_write_leaves_nothing(tmp_path, monkeypatch, share, existing):
  for kind, target, write, size in _targets(tmp_path):
    old = b"the previous, complete version"
    if existing:
      with open(target, "wb") as f:
        f.write(old)
    faults = _Faults(int(size * share))
    monkeypatch.setattr(os, "write", faults.write)
    with pytest.raises(WriteError) as e:
      write(target)
    monkeypatch.undo()
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    line = str(e.value)
    assert line.startswith(target) and NOSPACE in line and "\n" not in line, line
    assert outputs.TMP_MARK not in line and outputs.os_error_line(e.value) == line
    if existing:
      with open(target, "rb") as f:
        assert f.read() == old, kind
    else:
      assert not os.path.exists(target), kind
    assert not _leftovers(tmp_path), kind


@pytest.mark.parametrize("call, err", [("fsync", errno.ENOSPC), ("fsync", errno.EIO),
                                       ("close", errno.EDQUOT), ("replace", errno.EIO),
                                       ("open", errno.EACCES)])
def test_late_write_errors_leave_nothing(tmp_path, monkeypatch, call, err):
  """Errors that show only after the data was handed over: fsync (delayed allocation), close
  (network file systems), the rename; and the temporary file that cannot be made."""
  real = getattr(os, call)
  failed = []

  def failing(*args, **kwargs):
    if call == "close" and not failed:  # close for real, then report, as NFS does
      real(*args, **kwargs)
    if call == "fsync" and failed:  # the folder's fsync after the rename never comes
      return real(*args, **kwargs)
    failed.append(args)
    raise OSError(err, os.strerror(err))

  for kind, target, write, _ in _targets(tmp_path):
    failed.clear()
    monkeypatch.setattr(os, call, failing)
    with pytest.raises(WriteError) as e:
      write(target)
    monkeypatch.undo()
    assert failed, f"{kind}: os.{call} was never called"
    assert e.value.errno == err and str(e.value).startswith(target)
    assert os.strerror(err) in str(e.value)
    assert not os.path.exists(target) and not _leftovers(tmp_path), kind


def test_writes_are_whole_and_fsynced(tmp_path, monkeypatch):
  synced = []
  real = os.fsync
  monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
  img = _noise(channels=1)
  target = str(tmp_path / "mask.png")
  outputs.write_image(target, img)
  assert len(synced) >= 1  # the file (and the folder where the OS allows)
  assert np.array_equal(cv2.imread(target, cv2.IMREAD_UNCHANGED), img)
  outputs.write_text(str(tmp_path / "a.json"), "{}\n")
  with open(tmp_path / "a.json") as f:
    assert f.read() == "{}\n"
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # as a plain open(path, "w") gives
  assert not _leftovers(tmp_path)


def test_unencodable_image_is_a_write_error(tmp_path):
  target = str(tmp_path / "out.png")
  with pytest.raises(WriteError) as e:
    outputs.write_image(target, np.zeros((4, 4, 5), np.uint8))
  assert str(e.value).startswith(target) and "encode" in str(e.value)
  assert not os.listdir(tmp_path)


def _mount_tmpfs(path, size):
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root")
  os.makedirs(path, exist_ok=True)
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                        capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def test_real_full_disk(tmp_path):
  """A 64 KiB tmpfs: a noise PNG of about 100 KB does not fit."""
  disk = str(tmp_path / "disk")
  _mount_tmpfs(disk, "64k")
  try:
    big = _noise(200, 170, 3)
    target = os.path.join(disk, "0.5_obj_mask.png")
    with pytest.raises(WriteError) as e:
      outputs.write_image(target, big)
    assert e.value.errno == errno.ENOSPC and str(e.value).startswith(target)
    assert NOSPACE in str(e.value)
    assert not os.listdir(disk)  # neither the target nor a temporary file
    assert not outputs.is_complete_output(target)  # so a rerun writes it
    # A small file still fits, whole.
    outputs.write_image(target, big[:20, :20])
    assert outputs.is_complete_output(target)
  finally:
    subprocess.run(["umount", disk], check=False)


# ---------------------------------------------------------------------------------------------
# Complete outputs: outputs are written under a temporary name and renamed, so a file under its
# final name is whole; a killed write leaves none (and a rerun writes it).

_KILLED_WRITE = """
import os, signal, sys
import numpy as np
from crm_jax import outputs
real = os.write
def write(fd, data):  # the process dies with half of the bytes written
  real(fd, bytes(data[:len(data) // 2]))
  os.kill(os.getpid(), signal.SIGKILL)
os.write = write
outputs.write_image(sys.argv[1], np.full((60, 80), 7, np.uint8))
"""


def _killed_write(target):
  proc = subprocess.run([sys.executable, "-c", _KILLED_WRITE, target], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == -signal.SIGKILL


def test_a_killed_write_leaves_no_output(tmp_path):
  target = str(tmp_path / "m.png")
  _killed_write(target)
  assert not os.path.exists(target) and not outputs.is_complete_output(target)
  assert len(_leftovers(tmp_path)) == 1  # removed by the next run (outputs.remove_leftovers)
  # Over an earlier output, the earlier one stays, whole.
  img = _noise(60, 80, 1)
  outputs.write_image(target, img)
  _killed_write(target)
  assert outputs.is_complete_output(target)
  assert np.array_equal(cv2.imread(target, cv2.IMREAD_UNCHANGED), img)
  with open(target, "wb") as f:
    f.write(b"")
  assert not outputs.is_complete_output(target)
  assert not outputs.is_complete_output(str(tmp_path / "missing.png"))
  assert not outputs.is_complete_output(str(tmp_path))


def test_other_formats_complete_when_whole(tmp_path):
  img = _photo()
  for ext in (".jpg", ".bmp", ".png"):
    target = str(tmp_path / f"out{ext}")
    outputs.write_image(target, img)
    assert outputs.is_complete_output(target), ext
    assert np.array_equal(cv2.imread(target)[:, :, ::-1], io.read_image(target)), ext


def test_metrics_is_complete_needs_every_file(tmp_path):
  out, name, scales = str(tmp_path), "obj", (0.5, 1.0)
  for path in metrics.output_files(out, name, scales):
    outputs.write_image(path, _noise(40, 50, 1))
  assert metrics.is_complete(out, name, scales)
  path = metrics.mask_path(out, name, 0.5)
  os.remove(path)
  _killed_write(path)  # the rerun of that mask is killed: the object is still not complete
  assert not metrics.is_complete(out, name, scales)
  outputs.write_image(path, _noise(40, 50, 1))
  assert metrics.is_complete(out, name, scales)


# ---------------------------------------------------------------------------------------------
# JPEGs damaged inside: their end is intact, so only the decoder can tell.


ZEROED = 3000  # bytes set to zero inside a JPEG's data, as in the issue


def _zeroed(data, where, count=ZEROED):
  start = int(len(data) * where)
  return data[:start] + bytes(count) + data[start + count:]


def _corrupt_cases():
  with open(_demo_jpegs()[0], "rb") as f:
    demo = f.read()
  photo = cv2.resize(_photo(3), (640, 480))
  return {"demo": demo, "progressive": _jpeg(photo, progressive=1, quality=95),
          "optimized": _jpeg(photo, optimize=1, quality=90)}


@pytest.mark.parametrize("where", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("kind", ["demo", "progressive", "optimized"])
def test_jpeg_with_zeroed_bytes_is_refused(tmp_path, kind, where):
  data = _corrupt_cases()[kind]
  damaged = _zeroed(data, where)
  assert damaged.endswith(b"\xff\xd9") and len(damaged) == len(data)  # its end looks whole
  # What this guards against: OpenCV decodes it without an error, to wrong pixels.
  wrong = cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_UNCHANGED)
  right = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  assert wrong is not None and wrong.shape == right.shape
  path = str(tmp_path / f"{kind}.jpg")
  with open(path, "wb") as f:
    f.write(damaged)
  for read in (io.read_image, io.read_mask):
    with pytest.raises(InputError) as e:
      read(path)
    line = str(e.value)
    assert line.startswith(path + ": ") and "corrupt JPEG" in line and "\n" not in line, line


def _valid_jpegs():
  cases = {}
  for path in _demo_jpegs():
    with open(path, "rb") as f:
      cases[os.path.basename(path)] = f.read()
  photo, noise = _photo(4, 200, 264), _noise(150, 200, 3, seed=2)
  # Black borders (a letterboxed photo): optimised or progressive tables code the flat blocks
  # as long runs of zero bytes, so zero runs alone cannot tell damage from a valid file.
  bordered = np.pad(photo, ((400, 400), (600, 600), (0, 0)))
  for name, img in (("photo", photo), ("noise", noise), ("bordered", bordered),
                    ("grey", photo[:, :, 1]), ("white", np.full((90, 130, 3), 255, np.uint8))):
    for quality in (5, 50, 95, 100):
      cases[f"{name} q{quality} baseline"] = _jpeg(img, quality=quality)
      cases[f"{name} q{quality} progressive"] = _jpeg(img, quality=quality, progressive=1)
      cases[f"{name} q{quality} optimized"] = _jpeg(img, quality=quality, optimize=1)
    cases[f"{name} restarts"] = _jpeg(img, rst_interval=2)
    if img.ndim == 3:
      for sampling in ("444", "440", "422", "420", "411"):  # chroma subsamplings
        cases[f"{name} {sampling}"] = _jpeg(
            img, sampling_factor=getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{sampling}"))
  cmyk = BytesIO()  # Pillow writes CMYK JPEGs (Adobe inverted)
  Image.fromarray(photo).convert("CMYK").save(cmyk, "JPEG", quality=90)
  cases["photo CMYK"] = cmyk.getvalue()
  return cases


def test_valid_jpegs_are_accepted_without_a_word():
  longest_zero_run = 0
  for name, data in _valid_jpegs().items():
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      img = io.decode_image(data, name)
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(img, io.as_rgb(io.img_bgr_to_rgb(expected))), name
    scan = data[data.index(b"\xff\xda"):]
    longest_zero_run = max(longest_zero_run, _longest_zero_run(scan))
  # The valid set holds zero runs as long as the damage above: the rule is not about zeros.
  assert longest_zero_run >= ZEROED


def _longest_zero_run(data):
  zero = np.concatenate([[0], (np.frombuffer(data, np.uint8) == 0).astype(np.int8), [0]])
  edges = np.flatnonzero(np.diff(zero))
  return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


def test_stray_bytes_before_the_end_marker(tmp_path):
  data = _jpeg(_photo())
  assert data.endswith(b"\xff\xd9")
  right = io.decode_image(data)
  # A few padding bytes: warned once, read as they are.
  few = data[:-2] + b"\x12" * io.JPEG_STRAY_BYTES + b"\xff\xd9"
  with pytest.warns(InputWarning, match="stray bytes") as caught:
    assert np.array_equal(io.decode_image(few, "pad.jpg"), right)
  assert all(str(w.message).startswith("pad.jpg: ") for w in caught)
  # Many: the data is damaged.
  many = data[:-2] + b"\x12" * (io.JPEG_STRAY_BYTES * 4) + b"\xff\xd9"
  with pytest.raises(InputError, match="corrupt JPEG"):
    io.decode_image(many, "many.jpg")


def test_decoding_leaves_stderr_alone(monkeypatch, capfd):
  """No decode swaps the process's stderr (libjpeg's warnings come back as exceptions): fd 2 is
  the same file while libjpeg runs, what other threads print meanwhile goes out as usual, and
  damage is still refused."""
  stderr, seen, real = os.fstat(2), [], simplejpeg.decode_jpeg

  def watched(*args, **kwargs):
    now = os.fstat(2)
    seen.append((now.st_dev, now.st_ino) == (stderr.st_dev, stderr.st_ino))
    return real(*args, **kwargs)

  monkeypatch.setattr(simplejpeg, "decode_jpeg", watched)
  good, bad = _jpeg(_photo()), _zeroed(_jpeg(_photo(6, 300, 400), quality=95), 0.4, count=4000)
  printing = threading.Thread(target=lambda: [os.write(2, b"a line from elsewhere\n"),
                                              io.decode_image(good)])
  printing.start()
  io.decode_image(good)
  with pytest.raises(InputError, match="corrupt JPEG"):
    io.decode_image(bad, "bad.jpg")
  printing.join()
  assert seen and all(seen), seen
  assert "a line from elsewhere" in capfd.readouterr().err


def test_jpegs_turbojpeg_cannot_read_go_to_opencv(monkeypatch):
  """A layout TurboJPEG's API refuses (an unusual chroma subsampling) is decoded by OpenCV, as
  before; a truncated file is still refused (Pillow's check)."""
  def refuse(*args, **kwargs):
    raise ValueError("tjDecompressHeader3(): Could not determine subsampling level of JPEG image")
  monkeypatch.setattr(simplejpeg, "decode_jpeg", refuse)
  data = _jpeg(_photo())
  expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
  assert np.array_equal(io.decode_image(data), expected)
  with pytest.raises(InputError, match="truncated"):
    io.decode_image(data[:len(data) * 2 // 3], "cut.jpg")


@pytest.mark.parametrize("params", [{}, {"progressive": 1}, {"progressive": 1, "optimize": 1}])
def test_every_cut_of_a_jpeg_is_refused(params):
  """Wherever a baseline or progressive JPEG is cut (a progressive one still decodes to a blurred
  picture from its first scans), it is an error naming the file."""
  data = _jpeg(_photo(7, 60, 80), **params)
  for keep in range(3, len(data) - 2, 7):
    with pytest.raises(InputError) as e:
      io.decode_image(data[:keep], "cut.jpg")
    assert str(e.value).startswith("cut.jpg: ") and "JPEG" in str(e.value), (keep, e.value)


def test_corrupt_jpeg_detection_with_threads():
  good = _jpeg(_photo(5, 300, 400))
  bad = _zeroed(_jpeg(_photo(6, 300, 400), quality=95), 0.4, count=4000)
  results, errors = {}, []

  def work(k):
    try:
      for i in range(6):
        data = good if (k + i) % 2 else bad
        try:
          io.decode_image(data, f"t{k}-{i}")
          results[(k, i)] = data is good
        except InputError:
          results[(k, i)] = data is bad
    except Exception as e:  # pragma: no cover - reported below
      errors.append(e)

  threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(results) == 24 and all(results.values()), results


# ---------------------------------------------------------------------------------------------
# EXIF orientation: read as stored (as published) with a warning, or applied on request.


def _tiff(orientation, order=">"):
  magic = b"MM\x00*" if order == ">" else b"II*\x00"
  return (magic + struct.pack(order + "I", 8) + struct.pack(order + "H", 2)
          + struct.pack(order + "HHIHH", 0x010F, 3, 1, 0, 0)  # another tag first
          + struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0)
          + struct.pack(order + "I", 0))


def _with_exif(jpeg, orientation, order=">"):
  app1 = b"Exif\x00\x00" + _tiff(orientation, order)
  return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def _png_with_exif(png, orientation):
  body = _tiff(orientation, "<")
  chunk = (struct.pack(">I", len(body)) + b"eXIf" + body
           + struct.pack(">I", zlib.crc32(b"eXIf" + body) & 0xFFFFFFFF))
  ihdr_end = 8 + 25
  return png[:ihdr_end] + chunk + png[ihdr_end:]


def _marked():
  """A picture whose every orientation differs: a bright corner, a bar, an off-centre block."""
  img = np.zeros((48, 80, 3), np.uint8)
  img[:16, :16] = 255
  img[32:, 64:] = (0, 255, 0)
  img[:, 32:40] = (0, 0, 255)
  return img


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
  base = _jpeg(_marked(), quality=100)
  stored = io.decode_image(base)
  for order in (">", "<"):
    data = _with_exif(base, orientation, order)
    assert io.exif_orientation(data) == orientation
    path = str(tmp_path / "photo.jpg")
    with open(path, "wb") as f:
      f.write(data)
    # Default: pixels as stored, as the published code reads them, with one line when turned.
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      assert np.array_equal(io.read_image(path), stored)
      assert io.read_mask(path).shape == stored.shape[:2]
    lines = [str(w.message) for w in caught if w.category is InputWarning]
    if orientation == 1:
      assert not lines
    else:
      assert len(lines) == 2 and all(s.startswith(path + ": ") for s in lines)
      assert all(f"EXIF orientation {orientation}" in s and "\n" not in s for s in lines)
    # On request: as viewers show it, which is what OpenCV's IMREAD_COLOR gives.
    with warnings.catch_warnings():
      warnings.simplefilter("error", InputWarning)
      warnings.simplefilter("ignore", io.MaskWarning)  # a colour picture read as a mask
      turned = io.read_image(path, orientation="exif")
      mask = io.read_mask(path, orientation="exif")
    viewer = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert np.array_equal(turned, viewer), orientation
    assert mask.shape == viewer.shape[:2]


def test_exif_orientation_in_png_and_bad_tags():
  img = _marked()
  png = _png_with_exif(outputs.encode_image(img), 6)
  assert io.exif_orientation(png) == 6
  assert io.decode_image(png, orientation="exif").shape == (80, 48, 3)
  with pytest.warns(InputWarning, match="EXIF orientation 6"):
    assert io.decode_image(png).shape == (48, 80, 3)
  jpeg = _jpeg(img)
  for bad in (0, 9, 65535):  # not an orientation: ignored, as viewers do
    assert io.exif_orientation(_with_exif(jpeg, bad)) == 1
  assert io.exif_orientation(jpeg) == 1 and io.exif_orientation(b"") == 1
  truncated = _with_exif(jpeg, 6)[:40]
  assert io.exif_orientation(truncated) in (1, 6)  # never an exception
  with pytest.raises(ValueError, match="orientation"):
    io.decode_image(jpeg, orientation="viewer")
