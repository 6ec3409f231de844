"""The bundled demo set and checkpoint are what their committed commands make."""

import json
import os

import cv2
import numpy as np
import pytest

from crm_jax import bundled
from crm_jax.data import make_demo_set
from crm_jax.data.synthesis import lowres_segmenter_mask
from crm_jax.data.synthetic import make_synthetic_pair
from crm_jax.evaluation import list_objects


def test_demo_set_is_complete():
  objects, problems = list_objects(bundled.DEMO_DATA)
  assert problems == []
  assert [o.name for o in objects] == [f"synthetic_{i:02d}"
                                       for i in range(len(make_demo_set.DEFAULT_SIZES))]
  for obj, (h, w) in zip(objects, make_demo_set.DEFAULT_SIZES):
    for path in (obj.image, obj.seg, obj.gt):
      assert cv2.imread(path).shape[:2] == (h, w), path


def test_generation_command_reproduces_the_last_object():
  """``python -m crm_jax.data.make_demo_set`` makes the committed files (checked on the
  smallest object: gt and seg bit for bit, the JPEG up to re-encoding)."""
  i = len(make_demo_set.DEFAULT_SIZES) - 1
  h, w = make_demo_set.DEFAULT_SIZES[i]
  image, gt = make_synthetic_pair(h, w, np.random.default_rng([make_demo_set.DEFAULT_SEED, i]))
  seg = lowres_segmenter_mask(gt)
  stem = os.path.join(bundled.DEMO_DATA, f"synthetic_{i:02d}")
  np.testing.assert_array_equal(cv2.imread(stem + "_gt.png", cv2.IMREAD_GRAYSCALE), gt)
  np.testing.assert_array_equal(cv2.imread(stem + "_seg.png", cv2.IMREAD_GRAYSCALE), seg)
  ok, buf = cv2.imencode(".jpg", image[:, :, ::-1],
                         [cv2.IMWRITE_JPEG_QUALITY, make_demo_set.JPEG_QUALITY])
  assert ok
  again = cv2.imdecode(buf, cv2.IMREAD_COLOR)
  committed = cv2.imread(stem + "_im.jpg", cv2.IMREAD_COLOR)
  assert np.abs(again.astype(int) - committed.astype(int)).mean() < 0.5
  # The coarse mask is a low-resolution segmenter's, not a copy of gt.
  assert 0.7 < ((seg > 128) & (gt > 128)).sum() / ((seg > 128) | (gt > 128)).sum() < 0.99


def test_bundled_checkpoint_improves_mba_on_a_bundled_image():
  """The bundled checkpoint loads, and the full multi-scale loop (the demo's) refines the
  smallest bundled object into a mask with a higher mBA than the coarse one (docs/metrics.md)."""
  from crm_jax import metrics
  from crm_jax.constants import SCALES
  from crm_jax.io import read_image, read_mask
  from crm_jax.preprocess import prob_to_uint8
  from crm_jax.refine import Refiner

  refiner = Refiner.from_checkpoint(bundled.DEMO_CHECKPOINT)
  i = len(make_demo_set.DEFAULT_SIZES) - 1
  stem = os.path.join(bundled.DEMO_DATA, f"synthetic_{i:02d}")
  image = read_image(stem + "_im.jpg")
  seg, gt = read_mask(stem + "_seg.png"), read_mask(stem + "_gt.png")
  refined = prob_to_uint8(refiner.refine(image, seg, SCALES))
  scores = metrics.per_image(gt, seg, refined)
  assert not scores.small_seg
  assert scores.new_mba > scores.old_mba + 0.01, (scores.old_mba, scores.new_mba)


def _size_rows(*args):
  """The table rows of ``benchmarks/bundled_sizes.py ARGS``: {(long side, min_side): (coarse
  IoU, refined IoU, coarse mBA, refined mBA)}."""
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "bundled_sizes.py"),
                         *args], cwd=repo, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {}
  for line in proc.stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 7 and cells[0].isdigit():
      rows[int(cells[0]), int(cells[1])] = tuple(float(c) for c in cells[2:6])
  return rows


def test_bundled_checkpoint_on_the_bundled_set_downscaled_to_512_px():
  """The bundled checkpoint (trained with scale augmentation) on the bundled images at 512 px,
  where the multi-scale loop shows the encoder 48-64 px at scale 0.125: the published loop no
  longer falls apart (the checkpoint trained without it: IoU 0.45 from a coarse 0.96), and with
  the checkpoint's recommended min_side the refined masks beat the coarse ones in mBA without
  losing IoU."""
  from crm_jax.checkpoint import recommended_min_side
  advised = recommended_min_side(bundled.DEMO_CHECKPOINT)
  rows = _size_rows("--sizes", "512", "--min-sides", "0", str(advised))
  coarse_iou, iou, _, _ = rows[512, 0]
  assert iou > coarse_iou - 0.15, rows
  coarse_iou, iou, coarse_mba, mba = rows[512, advised]
  assert iou > coarse_iou - 0.01 and mba > coarse_mba + 0.01, rows


@pytest.mark.parametrize("long_side,coarse_factor", [(128, None), (256, None), (128, 8)])
def test_the_cli_with_its_defaults_refines_small_images(long_side, coarse_factor, tmp_path,
                                                        capsys):
  """``crm-refine`` with no --checkpoint and no --min-side on the bundled images
  resized to 128 and 256 px: the bundled checkpoint's recommended min_side (said in the one note
  line) keeps the refined masks close to the bundled coarse ones, already as sharp as 128 px
  allow (the published loop there: IoU 0.49 and 0.63 from a coarse 0.97 and 0.96), and refines
  coarse masks made at 1/8 of 128 px (docs/refining.md, "Small images")."""
  import sys
  from crm_jax.cli import refine as refine_cli
  from crm_jax.io import read_grey, read_mask
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "benchmarks"))
  from bundled_sizes import resized_copy
  data = tmp_path / "data"
  resized_copy(bundled.DEMO_DATA, str(data), long_side, coarse_factor)
  images, masks = tmp_path / "images", tmp_path / "masks"
  images.mkdir()
  masks.mkdir()
  names = [o.name for o in list_objects(str(data))[0]]
  for name in names:
    os.rename(data / f"{name}_im.png", images / f"{name}.png")
    os.rename(data / f"{name}_seg.png", masks / f"{name}.png")
  code = refine_cli.main(["--images", str(images), "--masks", str(masks), "--output",
                          str(tmp_path / "out"), "--no-progress", "--devices", "1"])
  err = capsys.readouterr().err
  assert code == 0, err
  notes = [l for l in err.splitlines() if l.startswith("note:")]
  assert len(notes) == 1 and "bundled small checkpoint" in notes[0], err
  assert "recommends min_side" in notes[0] and "warning:" not in err
  from crm_jax import metrics
  scores = [metrics.per_image(read_mask(str(data / f"{name}_gt.png")),
                              read_mask(str(masks / f"{name}.png")),
                              read_grey(str(tmp_path / "out" / f"{name}.png"))) for name in names]
  iou = sum(x.new_intersection for x in scores) / sum(x.new_union for x in scores)
  coarse_iou = sum(x.old_intersection for x in scores) / sum(x.old_union for x in scores)
  mba, coarse_mba = (np.mean([x.new_mba for x in scores]), np.mean([x.old_mba for x in scores]))
  if coarse_factor is None:
    assert iou > 0.85 and iou > coarse_iou - 0.08, (iou, coarse_iou)
  else:  # something to refine: both scores rise
    assert iou > coarse_iou + 0.05 and mba > coarse_mba + 0.05, (iou, coarse_iou, mba, coarse_mba)


def test_the_demo_refuses_an_output_of_other_settings_in_one_line(tmp_path, capsys):
  """``python -m crm_jax.cli.demo`` into a folder whose masks another model or setting made (e.g. an
  older version's demo) stops before refining with one error line that names the way out
  (--overwrite), not a traceback."""
  from crm_jax.cli import demo
  out = tmp_path / "demo_output"
  out.mkdir()
  (out / "manifest.json").write_text(json.dumps({
      "format": "crm-jax-output", "fingerprint": "sha256:" + "0" * 64,
      "scales": ["0.125", "0.25", "0.5", "1.0"], "dtype": "float32", "plan": "banded",
      "min_side": 0, "checkpoint": None}))
  (out / "1.0_synthetic_00_mask.png").write_bytes(b"old")
  code = demo.main(["--output", str(out)])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
  assert "--overwrite" in err[0] and str(out) in err[0], err
  assert (out / "1.0_synthetic_00_mask.png").read_bytes() == b"old"
