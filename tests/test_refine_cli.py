"""``crm-refine`` with wrong inputs (issue 13, points 2-5, 7-9): mask encodings,
scales, truncated files, unusable or overwriting outputs, leftovers and the bundled-model note;
``--min-side`` and the small-image warning. TINY model, one small image."""

import json
import os
import shutil

import cv2
import jax
import numpy as np
import pytest

from crm_jax import refine
from crm_jax.cli import refine as refine_cli
from crm_jax.checkpoint import CheckpointError, load_model, save_model
from crm_jax.data.synthesis import lowres_segmenter_mask
from crm_jax.data.synthetic import make_synthetic_pair
from crm_jax.io import read_grey
from crm_jax.models.crm import CRM, TINY, init_variables

H, W = 80, 100


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("refine_cli")
  rng = np.random.default_rng(3)
  image, gt = make_synthetic_pair(H, W, rng)
  seg = np.where(lowres_segmenter_mask(gt, rng) > 128, 255, 0).astype(np.uint8)
  paths = {"root": root, "image": str(root / "im.jpg"), "mask": str(root / "seg.png"),
           "mask01": str(root / "seg01.png")}
  assert cv2.imwrite(paths["image"], image[:, :, ::-1])
  assert cv2.imwrite(paths["mask"], seg)
  assert cv2.imwrite(paths["mask01"], seg // 255)
  return paths


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return save_model(str(tmp_path_factory.mktemp("ckpt") / "tiny"),
                    init_variables(CRM(TINY), jax.random.key(0)), TINY)


def _run(capsys, argv):
  code = refine_cli.main(argv)
  captured = capsys.readouterr()
  assert "Traceback" not in captured.err
  return code, captured.out, captured.err


@pytest.mark.slow  # compiles and runs the TINY model: about half a minute
def test_a_01_mask_refines_as_its_0_255_version_and_leftovers_go(files, ckpt, capsys, tmp_path):
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  dead = out_dir / ".tmp-999999999-abc.png"  # a killed run's leftover (no such process)
  dead.write_bytes(b"half")
  results = []
  for mask in (files["mask"], files["mask01"]):
    out = str(out_dir / f"{os.path.basename(mask)}")
    code, stdout, err = _run(capsys, ["--image", files["image"], "--mask", mask, "--output",
                                      out, "--checkpoint", ckpt])
    assert code == 0 and f"wrote {out}" in stdout, err
    assert "note:" not in err  # a checkpoint was given
    results.append(read_grey(out))
  assert results[0].shape == (H, W) and (results[0] > 128).mean() > 0.01
  np.testing.assert_array_equal(results[0], results[1])
  assert not dead.exists()


def test_bad_arguments_fail_in_one_line_before_the_checkpoint_loads(files, capsys, tmp_path):
  cut = tmp_path / "cut.jpg"
  whole = open(files["image"], "rb").read()
  cut.write_bytes(whole[:len(whole) // 2])
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  mask_bytes = open(files["mask"], "rb").read()
  good = ["--image", files["image"], "--mask", files["mask"]]
  out = str(tmp_path / "r.png")
  missing = ["--checkpoint", str(tmp_path / "no_ckpt")]
  cases = [
      (good + ["--output", out, "--scales", "0", "1"], "every scale must be"),
      (good + ["--output", out, "--scales", "-0.5", "1"], "every scale must be"),
      (good + ["--output", out, "--scales", "nan"], "finite"),
      (good + ["--output", out, "--scales", "1", "0.5"], "increasing"),
      (good + ["--output", out, "--scales", "0.001", "1"], "too small"),
      (good + ["--output", out, "--min-side", "-1"], "min side -1"),
      (good + ["--output", files["mask"]], "is the input"),
      (good + ["--output", str(tmp_path)], "is a folder"),
      (good + ["--output", str(tmp_path / "refined")], "not an image file name"),
      (good + ["--output", str(a_file / "r.png")], "is a file, not a folder"),
      (["--image", str(cut), "--mask", files["mask"], "--output", out], "truncated"),
      (["--image", files["image"], "--mask", str(tmp_path / "nope.png"), "--output", out],
       "no such file"),
  ]
  for argv, words in cases:
    code, _, err = _run(capsys, argv + missing)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("error: ") and words in line, (argv, err)
    assert "no_ckpt" not in err, (argv, err)
  assert open(files["mask"], "rb").read() == mask_bytes
  assert not os.path.exists(out)
  # With a good output, the missing checkpoint is what is reported.
  code, _, err = _run(capsys, good + ["--output", out] + missing)
  assert code == 2 and "no_ckpt" in err.strip().splitlines()[-1]


def test_note_on_the_bundled_checkpoint(files, capsys, tmp_path, monkeypatch):
  """Point 9 (the CLI part): without --checkpoint, one line says which model is used, and the
  min_side it recommends (which reaches the Refiner)."""
  from crm_jax.checkpoint import recommended_min_side
  used = []

  def stop(path, **kwargs):
    used.append(path)
    assert kwargs["min_side"] == recommended_min_side(path) > 0
    raise CheckpointError("stopped by the test")

  monkeypatch.setattr(refine.Refiner, "from_checkpoint", staticmethod(stop))
  code, _, err = _run(capsys, ["--image", files["image"], "--mask", files["mask"], "--output",
                               str(tmp_path / "r.png")])
  assert code == 2
  from crm_jax.bundled import default_checkpoint
  assert used == [default_checkpoint()]
  notes = [l for l in err.splitlines() if l.startswith("note:")]
  assert len(notes) == 1
  assert all(w in notes[0] for w in ("bundled small checkpoint", "real photographs", "published weights",
                                     default_checkpoint(), "recommends min_side"))
  assert not [l for l in err.splitlines() if l.startswith("warning:")]  # min_side: no warning


def test_small_image_warning_line_unless_min_side(files, ckpt, capsys, tmp_path, monkeypatch):
  """A small image with the default scales: one warning line naming the file, before the model
  loads; none with --min-side (which reaches the Refiner), with one scale or with a checkpoint
  that recommends a min_side (said in one note line; --min-side 0 overrides it)."""
  from crm_jax.scales import SMALL_SIDE
  _, variables = load_model(ckpt)
  advised = save_model(str(tmp_path / "advised"), variables, TINY,
                       meta={"refine": {"min_side": 24}})
  loaded = []

  def stop(path, **kwargs):
    loaded.append(kwargs)
    raise CheckpointError("stopped by the test")

  monkeypatch.setattr(refine.Refiner, "from_checkpoint", staticmethod(stop))
  pair = ["--image", files["image"], "--mask", files["mask"], "--output",
          str(tmp_path / "r.png")]
  base = pair + ["--checkpoint", ckpt]
  for extra, warned, min_side, noted in (
      ([], True, 0, False), (["--min-side", "16"], False, 16, False),
      (["--scales", "1.0"], False, 0, False), (["--checkpoint", advised], False, 24, True),
      (["--checkpoint", advised, "--min-side", "0"], True, 0, False)):
    code, _, err = _run(capsys, (pair if "--checkpoint" in extra else base) + extra)
    assert code == 2 and "stopped by the test" in err.splitlines()[-1]
    lines = [l for l in err.splitlines() if l.startswith("warning:")]
    assert len(lines) == int(warned), (extra, err)
    notes = [l for l in err.splitlines() if l.startswith("note:")]
    assert notes == ([f"note: {advised} recommends min_side 24: the leading scales at which an "
                      "image's shorter side is below 24 px are left out (small images only; "
                      "--min-side 0 runs the published loop)"] if noted else []), err
    assert loaded[-1]["min_side"] == min_side and loaded[-1]["warn_small"] is False
  code, _, err = _run(capsys, base)
  line = [l for l in err.splitlines() if l.startswith("warning:")][0]
  assert line.startswith(f"warning: {files['image']} is {W}x{H}: the coarsest scale 0.125 shows "
                         f"it at {round(W / 8)}x{round(H / 8)} pixels")
  assert f"--min-side {SMALL_SIDE}" in line


@pytest.mark.slow  # three folder-mode runs of the TINY model
def test_folder_mode_min_side(files, ckpt, capsys, tmp_path):
  """Folder mode: one summary line for the small images of the default loop, none with
  --min-side; the manifest records min_side, and --min-side 48 on an 80-pixel image (scales 0.5
  1.0) gives the bytes of --scales 1.0."""
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  for k in range(2):
    shutil.copy(files["image"], images / f"p{k}.jpg")
    shutil.copy(files["mask"], masks / f"p{k}.png")
  outputs = {}
  for label, extra in (("default", []), ("min_side", ["--min-side", "48"]),
                       ("last", ["--scales", "1.0"])):
    out = tmp_path / label
    code, stdout, err = _run(capsys, ["--images", str(images), "--masks", str(masks), "--output",
                                      str(out), "--checkpoint", ckpt, "--no-progress",
                                      "--devices", "1", "--scales", "0.5", "1.0"] + extra)
    assert code == 0, err
    small = [l for l in stdout.splitlines() if "small images" in l]
    assert len(small) == int(label == "default"), (label, stdout)
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["min_side"] == (48 if label == "min_side" else 0)
    outputs[label] = {f: open(out / f, "rb").read() for f in ("p0.png", "p1.png")}
  assert outputs["min_side"] == outputs["last"]
  assert outputs["default"] != outputs["last"]


@pytest.mark.slow  # two TINY-model runs
def test_orientation_flag_reads_photos_as_viewers_show_them(files, ckpt, capsys, tmp_path):
  """A phone photo stored sideways with EXIF orientation 6 and a mask drawn on it as viewers show
  it: refused by default (as published: read as stored, with the warning line); with
  ``--orientation exif`` refined in the viewer's orientation, in one-image and folder mode, and
  the same refinement as of the turned pixels saved without a tag; the folder's manifest keeps
  the orientation, so a rerun with the other one is refused."""
  from crm_jax import io
  from crm_jax import outputs
  from tests.test_io_faults import _with_exif
  image = io.read_image(files["image"])  # H x W, as viewers show the photo
  mask = io.read_mask(files["mask"])
  stored = np.ascontiguousarray(np.rot90(image, 1))  # what the camera stored (turned back)
  photos, masks = tmp_path / "photos", tmp_path / "masks"
  photos.mkdir()
  masks.mkdir()
  ok, jpg = cv2.imencode(".jpg", stored[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])
  assert ok
  (photos / "phone.jpg").write_bytes(_with_exif(jpg.tobytes(), 6))
  assert cv2.imwrite(str(masks / "phone.png"), mask)
  viewer = io.read_image(str(photos / "phone.jpg"), orientation="exif")
  assert viewer.shape[:2] == mask.shape
  (tmp_path / "plain.png").write_bytes(outputs.encode_image(viewer))

  one = ["--image", str(photos / "phone.jpg"), "--mask", str(masks / "phone.png"),
         "--checkpoint", ckpt, "--scales", "0.5", "1.0"]
  code, _, err = _run(capsys, one + ["--output", str(tmp_path / "stored.png")])
  assert code == 2 and f"mask is {W}x{H} but" in err.splitlines()[-1], err  # (and a warning)
  code, _, err = _run(capsys, one + ["--output", str(tmp_path / "exif.png"),
                                     "--orientation", "exif"])
  assert code == 0, err
  code, _, _ = _run(capsys, ["--image", str(tmp_path / "plain.png"), "--mask",
                             str(masks / "phone.png"), "--checkpoint", ckpt, "--scales", "0.5",
                             "1.0", "--output", str(tmp_path / "plain_out.png")])
  assert code == 0
  refined = read_grey(str(tmp_path / "exif.png"))
  assert refined.shape == mask.shape
  assert np.array_equal(refined, read_grey(str(tmp_path / "plain_out.png")))

  folder = ["--images", str(photos), "--masks", str(masks), "--checkpoint", ckpt, "--scales",
            "0.5", "1.0", "--output", str(tmp_path / "out"), "--no-progress"]
  code, _, err = _run(capsys, folder + ["--orientation", "exif"])
  assert code == 0, err
  assert np.array_equal(read_grey(str(tmp_path / "out" / "phone.png")), refined)
  manifest = json.load(open(tmp_path / "out" / "manifest.json"))
  assert manifest["orientation"] == "exif"
  code, _, err = _run(capsys, folder)
  assert code == 2 and "orientation exif instead of stored" in err, err
