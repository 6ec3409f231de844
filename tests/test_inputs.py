"""The input rules of crm_jax.io and crm_jax.scales: mask encodings, truncated files, scales,
output checks and leftovers of killed writes (issue 13, points 2, 3, 4, 5, 7 and 8). No JAX."""

import os
import signal
import struct
import subprocess
import sys
import warnings
import zlib

import cv2
import numpy as np
import pytest

from crm_jax import io
from crm_jax import outputs
from crm_jax.data import folders, tfds_builders
from crm_jax.io import InputError, MaskWarning
from crm_jax.scales import MIN_SCALED_SIDE, check_scales

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 40, 50


def _shape():
  """A bool [H, W] foreground with a hole and a soft edge nowhere (a plain binary object)."""
  m = np.zeros((H, W), bool)
  m[8:32, 10:42] = True
  m[15:20, 20:30] = False
  return m


FG = _shape()
MASK_255 = FG.astype(np.uint8) * 255


def _png_chunk(kind: bytes, body: bytes) -> bytes:
  return (struct.pack(">I", len(body)) + kind + body
          + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def _png(rows: np.ndarray, colour_type: int, depth: int = 8, palette: bytes = b"") -> bytes:
  """A PNG written by hand (OpenCV cannot write palette or grey+alpha PNGs)."""
  h, w = rows.shape[:2]
  raw = b"".join(b"\x00" + rows[i].astype(">u2" if depth == 16 else np.uint8).tobytes()
                 for i in range(h))
  out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth,
                                                                colour_type, 0, 0, 0))
  if palette:
    out += _png_chunk(b"PLTE", palette)
  return out + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def _encode(img: np.ndarray, ext: str = ".png") -> bytes:
  ok, buf = cv2.imencode(ext, img)
  assert ok
  return buf.tobytes()


def _decode_quietly(data: bytes, name: str = "m.png"):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mask = io.decode_mask(data, name)
  return mask, [str(w.message) for w in caught if issubclass(w.category, MaskWarning)]


# ---------------------------------------------------------------------------------------------
# Point 2: every common mask encoding.


VOC_PALETTE = bytes([0, 0, 0, 128, 0, 0, 0, 128, 0]) + bytes(3 * 252) + bytes([224, 224, 192])

ENCODINGS = {
    # name: (encoded bytes, guessed?)
    "grey 0/255": (_encode(MASK_255), False),
    "grey 0/1": (_encode(FG.astype(np.uint8)), False),
    "16-bit 0/65535": (_encode(FG.astype(np.uint16) * 65535), False),
    "16-bit 0/1": (_encode(FG.astype(np.uint16)), False),
    "16-bit 0/255": (_encode(FG.astype(np.uint16) * 255), True),
    "colour grey 0/255": (_encode(np.dstack([MASK_255] * 3)), False),
    "colour red": (_encode(np.dstack([0 * MASK_255, 0 * MASK_255, MASK_255])), True),
    "palette VOC one label": (_png(FG.astype(np.uint8), 3, palette=VOC_PALETTE), False),
    "grey+alpha, black": (_png(np.dstack([np.zeros((H, W), np.uint8), MASK_255]), 4), False),
    "RGBA, white on transparent": (_encode(np.dstack([MASK_255] * 4)), False),
    "RGBA, image in colour": (_encode(np.dstack([
        np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8), MASK_255])), True),
    "RGBA opaque, grey": (_encode(np.dstack([MASK_255] * 3 + [np.full((H, W), 255, np.uint8)])),
                          False),
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_every_mask_encoding_reads_as_the_same_binary_mask(encoding):
  data, guessed = ENCODINGS[encoding]
  mask, caught = _decode_quietly(data, f"{encoding}.png")
  assert mask.dtype == np.uint8 and mask.shape == (H, W)
  assert np.array_equal(mask > 128, FG), encoding
  assert set(np.unique(mask)) <= {0, 255}
  assert bool(caught) == guessed, caught
  assert all(c.startswith(f"{encoding}.png: ") for c in caught)


def test_soft_masks_keep_their_values():
  soft = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
  assert np.array_equal(io.decode_mask(_encode(soft)), soft)
  assert np.array_equal(io.decode_mask(_encode(soft.astype(np.uint16) * 257)), soft)
  # A grey palette is read as grey, not as a label map.
  grey_palette = bytes(np.repeat(np.arange(256, dtype=np.uint8), 3))
  assert np.array_equal(io.decode_mask(_png(soft, 3, palette=grey_palette)), soft)


def test_palette_with_several_labels_warns_and_keeps_all_as_foreground():
  labels = FG.astype(np.uint8)
  labels[8:12] *= 2
  labels[0, 0] = 255  # VOC's void border counts as foreground too
  mask, caught = _decode_quietly(_png(labels, 3, palette=VOC_PALETTE))
  assert np.array_equal(mask > 128, labels > 0)
  assert len(caught) == 1 and "3 labels" in caught[0]


def test_warned_once_per_file(tmp_path):
  path = str(tmp_path / "red.png")
  with open(path, "wb") as f:
    f.write(ENCODINGS["colour red"][0])
  other = str(tmp_path / "red2.png")
  with open(other, "wb") as f:
    f.write(ENCODINGS["colour red"][0])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    for _ in range(3):
      io.read_mask(path)
    io.read_mask(other)
  texts = [str(w.message) for w in caught]
  assert len(texts) == 2 and texts[0].startswith(path) and texts[1].startswith(other)


@pytest.mark.parametrize("array, expected", [
    (FG, MASK_255),
    (FG.astype(np.float32), MASK_255),
    (FG.astype(np.float64) * 255, MASK_255),
    (FG.astype(np.int64), MASK_255),
    (FG.astype(np.uint8)[:, :, None], MASK_255),
    (np.full((2, 2), 0.5, np.float32), np.full((2, 2), 128, np.uint8)),
])
def test_as_mask_arrays(array, expected):
  assert np.array_equal(io.as_mask(array), expected)


@pytest.mark.parametrize("array, words", [
    (np.full((4, 4), np.nan, np.float32), "NaN"),
    (np.full((4, 4), -1.0, np.float32), "[0, 1]"),
    (np.full((4, 4), 300.0), "[0, 255]"),
    (np.full((4, 4), -1, np.int32), "negative"),
    (np.full((4, 4), 300, np.int32), "0-255"),
    (np.zeros((4, 4, 5), np.uint8), "shape"),
    (np.zeros((4, 4), np.complex64), "unsupported"),
])
def test_as_mask_refuses(array, words):
  with pytest.raises(InputError, match="mask") as e:
    io.as_mask(array, "mask")
  assert words in str(e.value)


def test_tfds_decode_mask_follows_the_same_rules():
  for encoding, (data, _) in ENCODINGS.items():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      assert np.array_equal(tfds_builders.decode_mask(data, encoding), io.decode_mask(data)), \
          encoding


def test_exif_orientation_is_ignored_for_images_and_masks(tmp_path):
  """One rule for every reader: pixels as stored (an EXIF 'rotate 90' tag changes nothing but a
  warning)."""
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, :20] = 255
  data = _encode(img, ".jpg")
  # An APP1 Exif segment with Orientation = 6 (rotate 90 CW), inserted after SOI.
  tiff = b"MM\x00*\x00\x00\x00\x08" + struct.pack(">H", 1) + struct.pack(
      ">HHIHH", 0x0112, 3, 1, 6, 0) + b"\x00\x00\x00\x00"
  app1 = b"Exif\x00\x00" + tiff
  data = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
  assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (40, 20)
  # Read as stored, with one line saying so (tests/test_io_faults.py: every orientation).
  with pytest.warns(io.InputWarning, match="EXIF orientation 6"):
    assert io.decode_image(data).shape[:2] == (20, 40)
  with pytest.warns(io.InputWarning, match="EXIF orientation 6"):
    assert io.decode_mask(data).shape == (20, 40)
  with pytest.warns(io.InputWarning, match="EXIF orientation 6"):
    assert tfds_builders.decode_mask(data).shape == (20, 40)


# ---------------------------------------------------------------------------------------------
# Point 4: truncated or corrupt files are errors naming the file.


def _photo() -> np.ndarray:
  rng = np.random.default_rng(1)
  return cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), (9, 9), 3)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.98])
def test_truncated_files_are_errors(tmp_path, ext, keep):
  data = _encode(_photo(), ext)
  path = str(tmp_path / f"cut{ext}")
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * keep)])
  # What this guards against: OpenCV's imread decodes a truncated JPEG without an error.
  with pytest.raises(InputError, match="truncated") as e:
    io.read_image(path)
  assert path in str(e.value)
  with pytest.raises(InputError, match="truncated"):
    io.read_mask(path)
  assert not folders.is_readable(path)


def test_complete_files_pass_the_checks(tmp_path):
  jpg = _encode(_photo(), ".jpg")
  assert io.decode_image(jpg).shape == (120, 160, 3)
  # Data after the end-of-image marker (motion photos, camera trailers) is allowed.
  assert io.decode_image(jpg + b"trailer\x00\xff\xd8 data").shape == (120, 160, 3)
  progressive = cv2.imencode(".jpg", _photo(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
  assert io.decode_image(progressive).shape == (120, 160, 3)
  restarts = cv2.imencode(".jpg", _photo(), [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])[1].tobytes()
  assert io.decode_image(restarts).shape == (120, 160, 3)


def test_corrupt_png_checksum_is_an_error():
  data = bytearray(_encode(_photo(), ".png"))
  data[60] ^= 0xFF  # inside the first IDAT chunk
  with pytest.raises(InputError, match="bad checksum"):
    io.decode_image(bytes(data), "x.png")


@pytest.mark.parametrize("content, words", [
    (b"", "empty"), (b"not an image at all", "unreadable"),
    (b"\xff\xd8\xff this is not a JPEG", "corrupt JPEG")])
def test_unreadable_files(tmp_path, content, words):
  path = tmp_path / "bad.jpg"
  path.write_bytes(content)
  with pytest.raises(InputError, match=words):
    io.read_image(str(path))
  with pytest.raises(InputError, match="is a folder"):
    io.read_image(str(tmp_path))
  with pytest.raises(InputError, match="no such file"):
    io.read_mask(str(tmp_path / "nope.png"))


# ---------------------------------------------------------------------------------------------
# Point 3: one rule for scales.


def test_check_scales():
  assert check_scales([0.5, 1]) == (0.5, 1.0)
  assert check_scales((0.125, 0.25, 0.5, 1.0), size=(128, 128)) == (0.125, 0.25, 0.5, 1.0)
  for bad, words in (([], "no scales"), ([0.0, 1.0], "(0, 1]"), ([-1.0], "(0, 1]"),
                     ([1.5], "(0, 1]"), ([float("nan")], "finite"), ([float("inf")], "finite"),
                     ([0.5, 0.5], "increasing"), ([1.0, 0.5], "increasing"),
                     (["a"], "numbers")):
    with pytest.raises(InputError) as e:
      check_scales(bad)
    assert words in str(e.value), (bad, e.value)
  # Too small for the image: the padded input would be under MIN_SCALED_SIDE pixels.
  with pytest.raises(InputError, match="too small"):
    check_scales([0.01, 1.0], size=(100, 100))
  side = 100 + 64
  assert check_scales([MIN_SCALED_SIDE / side, 1.0], size=(100, 100))


# ---------------------------------------------------------------------------------------------
# Points 5 and 7: outputs checked before the work; inputs never overwritten.


def test_check_output_file(tmp_path):
  image = tmp_path / "in.png"
  image.write_bytes(_encode(MASK_255))
  out = tmp_path / "sub" / "out.png"
  assert outputs.check_output_file(str(out), [str(image)]) == str(out)
  assert out.parent.is_dir() and not os.listdir(out.parent)  # the probe leaves nothing
  for path, words in ((str(tmp_path), "is a folder"), (str(tmp_path / "x") + "/", "is a folder"),
                      (str(tmp_path / "refined"), "not an image file name"),
                      (str(tmp_path / "refined.txt"), "not an image file name"),
                      (str(image), "is the input"),
                      (str(image.parent / "." / "in.png"), "is the input"),
                      (str(image / "out.png"), "is a file, not a folder")):
    with pytest.raises(InputError) as e:
      outputs.check_output_file(path, [str(image)])
    assert words in str(e.value) and str(e.value).startswith(path), (path, e.value)
  link = tmp_path / "link.png"
  link.symlink_to(image)
  with pytest.raises(InputError, match="is the input"):
    outputs.check_output_file(str(link), [str(image)])


def test_check_output_dir(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  assert outputs.check_output_dir(str(tmp_path / "out"), [str(data)])
  assert (tmp_path / "out").is_dir()
  for path in (data, data / "inside", data / "inside" / "deeper", tmp_path / "." / "data"):
    with pytest.raises(InputError, match="input folder"):
      outputs.check_output_dir(str(path), [str(data)])
  f = tmp_path / "file"
  f.write_text("x")
  for path in (f, f / "sub"):
    with pytest.raises(InputError, match="is a file, not a folder|cannot write"):
      outputs.check_output_dir(str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    with pytest.raises(InputError, match="cannot write"):
      outputs.check_output_dir(str(ro))
    with pytest.raises(InputError, match="cannot write"):
      outputs.check_output_file(str(ro / "x.png"))
  finally:
    ro.chmod(0o755)


def test_write_errors_name_the_output_not_the_temporary_file(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  target = str(f / "out.png")
  with pytest.raises(OSError) as e:
    outputs.write_image(target, MASK_255)
  assert str(e.value).startswith(target) and ".tmp-" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Point 8: leftovers of a killed write are removed by the next run in the same place.

_KILLED_WRITER = """
import os, signal, sys
from crm_jax import outputs
def write(tmp):
  with open(tmp, "w") as f:
    f.write("half")
  os.kill(os.getpid(), signal.SIGKILL)  # killed inside the write, before the rename
outputs.atomic_write(sys.argv[1], write)
"""


def test_leftovers_of_a_killed_write_are_removed(tmp_path):
  target = tmp_path / "out.png"
  proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == -signal.SIGKILL
  left = [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
  assert len(left) == 1 and not target.exists()
  # A temporary file of a live process (this one) is kept; the dead one's is removed.
  fd = os.open(str(tmp_path / f"{outputs.tmp_prefix()}live.png"), os.O_CREAT | os.O_WRONLY)
  os.close(fd)
  assert outputs.remove_leftovers(str(tmp_path)) == left
  assert os.listdir(tmp_path) == [f"{outputs.tmp_prefix()}live.png"]
  assert outputs.remove_leftovers(str(tmp_path / "missing")) == []
