"""Label maps (docs/labels.md): ``Refiner.refine_labels``, the merge rule, the PNG encodings and
``crm-refine --labels`` (one image and folder mode). A random TINY model: the mechanism, not the
accuracy (benchmarks/labels.py measures that on real photographs with the bundled model)."""

import os
import signal
import subprocess
import sys
from io import BytesIO

import cv2
import jax
import numpy as np
import pytest
from PIL import Image

from crm_jax import labels as labels_lib
from crm_jax.io import InputError
from crm_jax.labels import LabelMap

SCALES = (0.5, 1.0)
PALETTE = bytes([0, 0, 0, 220, 20, 60, 0, 130, 200, 250, 190, 30])


def scene(h=72, w=96, seed=0):
  """An RGB image with three coloured shapes and its coarse label map (class ids 0-3, the
  shapes' outlines moved as a low-resolution segmenter would)."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
  gt = np.zeros((h, w), np.uint8)
  cv2.circle(gt, (w // 4, h // 2), h // 3, 1, -1)
  cv2.rectangle(gt, (w // 2, h // 6), (w - 8, h // 2), 2, -1)
  cv2.ellipse(gt, (2 * w // 3, 3 * h // 4), (w // 6, h // 8), 20, 0, 360, 3, -1)
  for c, colour in enumerate([(30, 30, 30), (200, 60, 60), (60, 200, 90), (60, 90, 220)]):
    image[gt == c] = np.clip(image[gt == c].astype(int) + colour, 0, 255)
  small = cv2.resize(gt, (w // 6, h // 6), interpolation=cv2.INTER_NEAREST)
  return image, cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  from crm_jax.checkpoint import save_model
  from crm_jax.models.crm import CRM, TINY, init_variables
  return save_model(str(tmp_path_factory.mktemp('labels') / 'ckpt'),
                    init_variables(CRM(TINY), jax.random.key(1)), TINY)


@pytest.fixture(scope='module')
def refiner(tiny):
  from crm_jax.refine import Refiner
  return Refiner.from_checkpoint(tiny, min_side=0, warn_small=False)


def test_refine_labels_equals_separate_refine_calls_merged(refiner):
  image, coarse = scene()
  coarse[:6, :6] = 255  # ignore pixels
  out = refiner.refine_labels(image, coarse, scales=SCALES)
  probs = {c: refiner.refine(image, np.where(coarse == c, 255, 0).astype(np.uint8), SCALES)
           for c in (0, 1, 2, 3)}
  assert out.dtype == coarse.dtype and out.shape == coarse.shape
  np.testing.assert_array_equal(out, labels_lib.merge(coarse, probs))
  np.testing.assert_array_equal(out[:6, :6], 255)  # ignore pixels unchanged ...
  assert not np.any(out[coarse != 255] == 255)  # ... and no other pixel becomes one
  assert np.any(out != coarse)  # the random model moves some boundary


@pytest.mark.parametrize('c', [0, 1])
def test_one_class_of_two_is_the_binary_refinement_thresholded(refiner, c):
  image, coarse = scene(seed=2)
  two = (coarse > 0).astype(np.uint8)
  out = refiner.refine_labels(image, two, classes=[c], scales=SCALES)
  binary = refiner.refine(image, np.where(two == c, 255, 0).astype(np.uint8), SCALES) > 0.5
  np.testing.assert_array_equal(out == c, binary)


def test_merge_rule():
  coarse = np.array([[0, 0, 1, 1, 2]], np.uint8)
  probs = {0: np.array([[.9, .2, .1, .0, .0]], np.float32),
           1: np.array([[.6, .3, .9, .4, .0]], np.float32)}
  # pixel 0: both claim, 0 is surer; 1: dropped by its class 0, nearest other label 1;
  # 3: dropped by 1, nearest other label 2 (distance 1) before 0 (distance 3); 4: unrefined.
  np.testing.assert_array_equal(labels_lib.merge(coarse, probs), [[0, 1, 1, 2, 2]])


def test_sixteen_bit_maps_keep_their_ids(refiner, tmp_path):
  image, coarse = scene(seed=3)
  wide = (coarse.astype(np.uint16) * 1000)  # ids 0..3000: a 16-bit map
  out = refiner.refine_labels(image, wide, scales=SCALES)
  assert out.dtype == np.uint16 and set(np.unique(out)) <= {0, 1000, 2000, 3000}
  narrow = refiner.refine_labels(image, coarse, scales=SCALES)
  np.testing.assert_array_equal(out, narrow.astype(np.uint16) * 1000)
  path = str(tmp_path / 'wide.png')
  labels_lib.write_labels(path, LabelMap(out))
  back = labels_lib.read_labels(path)
  assert back.labels.dtype == np.uint16 and back.palette is None
  np.testing.assert_array_equal(back.labels, out)


def test_palette_is_kept_and_grey_maps_stay_grey(tmp_path):
  ids = np.array([[0, 1], [2, 3]], np.uint8)
  palette_png = LabelMap(ids, PALETTE)
  data = labels_lib.encode_labels(palette_png)
  back = labels_lib.decode_labels(data, 'p.png')
  np.testing.assert_array_equal(back.labels, ids)
  assert back.palette[:len(PALETTE)] == PALETTE
  with Image.open(BytesIO(labels_lib.encode_labels(back))) as img:
    assert img.mode == 'P' and bytes(img.getpalette()[:len(PALETTE)]) == PALETTE
  grey = labels_lib.decode_labels(labels_lib.encode_labels(LabelMap(ids)), 'g.png')
  assert grey.palette is None and grey.labels.dtype == np.uint8
  np.testing.assert_array_equal(grey.labels, ids)


def test_colour_maps_and_other_formats_are_refused_in_one_line():
  colour = BytesIO()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(colour, 'PNG')
  with pytest.raises(InputError, match=r'^c\.png: a colour \(RGB\) PNG; give classes as a grey '
                                       r'PNG of class ids'):
    labels_lib.decode_labels(colour.getvalue(), 'c.png')
  jpeg = cv2.imencode('.jpg', np.zeros((4, 4), np.uint8))[1].tobytes()
  with pytest.raises(InputError, match=r'^j\.jpg: not a PNG'):
    labels_lib.decode_labels(jpeg, 'j.jpg')
  with pytest.raises(InputError, match='holds no class to refine'):
    labels_lib.classes_to_refine(np.full((4, 4), 255, np.uint8), None, 255, 'x.png')
  with pytest.raises(InputError, match=r'none of the classes \[7\] is present'):
    labels_lib.classes_to_refine(np.zeros((4, 4), np.uint8), [7], 255, 'x.png')


def _write_pair(folder, name, image, label_map):
  os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
  os.makedirs(os.path.join(folder, 'labels'), exist_ok=True)
  assert cv2.imwrite(os.path.join(folder, 'images', f'{name}.png'), image[:, :, ::-1])
  labels_lib.write_labels(os.path.join(folder, 'labels', f'{name}.png'), label_map)


def _cli(*args):
  from crm_jax.cli import refine as refine_cli
  return refine_cli.main([*args, '--no-progress', '--scales', *map(str, SCALES), '--min-side',
                          '0'])


def test_refine_one_label_map_from_the_command_line(tiny, refiner, tmp_path, capsys):
  image, coarse = scene(seed=4)
  _write_pair(str(tmp_path), 'a', image, LabelMap(coarse, PALETTE))
  out = str(tmp_path / 'out.png')
  assert _cli('--image', str(tmp_path / 'images/a.png'), '--labels',
              str(tmp_path / 'labels/a.png'), '--output', out, '--checkpoint', tiny) == 0
  written = labels_lib.read_labels(out)
  assert written.palette[:len(PALETTE)] == PALETTE
  np.testing.assert_array_equal(written.labels, refiner.refine_labels(image, coarse,
                                                                     scales=SCALES))
  capsys.readouterr()
  # An RGB colour map, a map of another size, a map of ignore pixels only: one error line each.
  bad = {'rgb.png': np.zeros(coarse.shape + (3,), np.uint8),
         'size.png': coarse[:-4], 'empty.png': np.full_like(coarse, 255)}
  for name, pixels in bad.items():
    path = str(tmp_path / name)
    Image.fromarray(pixels).save(path)
    assert _cli('--image', str(tmp_path / 'images/a.png'), '--labels', path, '--output',
                str(tmp_path / f'o_{name}'), '--checkpoint', tiny) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f'error: {path}: ') and 'Traceback' not in ''.join(err), err
    assert not os.path.exists(tmp_path / f'o_{name}')


_KILLED = """
import os, signal, sys
from crm_jax.cli import refine
real_replace, calls = os.replace, [0]
def replace(src, dst):
  calls[0] += 1
  if calls[0] == 3:  # the manifest, one label map written, the next one killed before its rename
    os.kill(os.getpid(), signal.SIGKILL)
  return real_replace(src, dst)
os.replace = replace
sys.exit(refine.main(sys.argv[1:]))
"""


def test_folder_mode_resumes_after_a_kill_with_identical_bytes(tiny, tmp_path):
  for k in range(3):
    image, coarse = scene(64 + 8 * k, 88, seed=10 + k)
    _write_pair(str(tmp_path), f'p{k}', image, LabelMap(coarse, PALETTE if k else None))
  args = ['--images', str(tmp_path / 'images'), '--labels', str(tmp_path / 'labels'),
          '--checkpoint', tiny, '--no-progress', '--scales', *map(str, SCALES), '--min-side', '0']
  whole, out = tmp_path / 'whole', tmp_path / 'out'
  assert _cli('--images', str(tmp_path / 'images'), '--labels', str(tmp_path / 'labels'),
              '--output', str(whole), '--checkpoint', tiny) == 0
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', _KILLED, *args, '--output', str(out)], cwd=root,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=root),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  pngs = lambda d: {f: open(os.path.join(d, f), 'rb').read()  # noqa: E731
                    for f in sorted(os.listdir(d)) if f.endswith('.png')}
  assert 0 < len(pngs(out)) < 3
  assert _cli('--images', str(tmp_path / 'images'), '--labels', str(tmp_path / 'labels'),
              '--output', str(out), '--checkpoint', tiny) == 0
  assert pngs(out) == pngs(whole) and len(pngs(whole)) == 3
  with Image.open(out / 'p1.png') as img:
    assert img.mode == 'P'
  # Binary masks into a folder of label maps are refused (the manifest says what made them).
  masks = tmp_path / 'masks'
  masks.mkdir()
  for k in range(3):
    cv2.imwrite(str(masks / f'p{k}.png'), np.full((64 + 8 * k, 88), 255, np.uint8))
  assert _cli('--images', str(tmp_path / 'images'), '--masks', str(masks), '--output', str(out),
              '--checkpoint', tiny) == 2


def test_label_scores_by_hand():
  from crm_jax import metrics
  gt = np.zeros((40, 40), np.uint8)
  gt[10:30, 10:30] = 1
  gt[0, :] = 255  # ignore: counts for no class
  coarse = gt.copy()
  coarse[10:30, 10:20] = 0  # half of class 1 lost
  coarse[0, :] = 1  # predictions on ignore pixels do not count
  record = metrics.score_labels(gt, coarse, gt)
  assert record['1'][:4] == [200, 400, 400, 400] and record['0'][:4] == [1160, 1360, 1160, 1160]
  assert record['1'][5] == 1.0 and record['1'][4] < 1.0
  result = metrics.summarize_labels([record, metrics.score_labels(gt, gt, gt)])
  assert result['classes']['1']['coarse_iou'] == 600 / 800 and result['refined']['miou'] == 1.0
  assert result['coarse']['miou'] == pytest.approx((600 / 800 + 2320 / 2520) / 2)
  assert result['classes']['1']['images'] == 2


def test_crm_evaluate_labels_scores_writes_and_resumes(tiny, refiner, tmp_path, capsys):
  import json
  from crm_jax import metrics
  from crm_jax.cli import evaluate as evaluate_cli
  data = tmp_path / 'data'
  data.mkdir()
  expected = []
  for k in range(2):
    image, coarse = scene(64, 80 + 8 * k, seed=20 + k)
    gt = scene(64, 80 + 8 * k, seed=20 + k)[1] * 0 + coarse  # a gt: coarse with a shape moved
    gt = np.roll(gt, 2, axis=1)
    assert cv2.imwrite(str(data / f'o{k}_im.png'), image[:, :, ::-1])
    labels_lib.write_labels(str(data / f'o{k}_seg.png'), LabelMap(coarse, PALETTE))
    labels_lib.write_labels(str(data / f'o{k}_gt.png'), LabelMap(gt))
    expected.append(metrics.score_labels(gt, coarse, refiner.refine_labels(image, coarse,
                                                                            scales=SCALES)))
  args = ['--data', str(data), '--labels', '--checkpoint', tiny, '--output',
          str(tmp_path / 'out'), '--no-progress', '--scales', *map(str, SCALES), '--min-side',
          '0']
  assert evaluate_cli.main(args) == 0
  first = json.load(open(tmp_path / 'out' / 'metrics.json'))
  want = json.loads(json.dumps(metrics.summarize_labels(expected)))
  assert {k: first[k] for k in want} == want and first['refined_objects'] == 2
  assert 'mIoU' in capsys.readouterr().out
  with Image.open(tmp_path / 'out' / 'o1_labels.png') as img:
    assert img.mode == 'P'
  assert evaluate_cli.main(args) == 0  # resumed: scored from the files
  again = json.load(open(tmp_path / 'out' / 'metrics.json'))
  assert {k: again[k] for k in want} == want and again['already_complete'] == 2


def test_label_far_flip_share_by_hand():
  from crm_jax.data.real_photos import label_far_flip_share
  coarse = np.zeros((100, 100), np.uint8)
  coarse[:, 50:] = 1  # columns 49 and 50 are the boundary; fraction 0.1: farther than 14.1 px
  refined = coarse.copy()
  refined[:, 40:50] = 1  # near: not counted
  assert label_far_flip_share(coarse, refined, 0.1) == 0.0
  refined[:10, :10] = 2  # 100 of the 70 x 100 far pixels (columns 0-34 and 65-99)
  assert label_far_flip_share(coarse, refined, 0.1) == pytest.approx(100 / 7000)
  flat = np.full((20, 20), 3, np.uint8)  # no label change: every pixel is far
  assert label_far_flip_share(flat, np.where(np.arange(20) < 5, 4, 3)[None].repeat(20, 0)) == 0.25
  assert np.isnan(label_far_flip_share(coarse[:4, 48:52], coarse[:4, 48:52], 0.5))  # none far


@pytest.mark.skipif(__import__('importlib.util').util.find_spec('skimage') is None,
                    reason='scikit-image (requirements.txt) ships the photographs')
def test_heldout_label_composites_are_multi_class_and_deterministic():
  from crm_jax.data.real_photos import heldout_label_composites
  pairs = heldout_label_composites(256, count=3)
  for k, p in enumerate(pairs):  # 2, 3, 4 objects
    assert p.image.shape == (256, 256, 3) and p.image.dtype == np.uint8 and p.image.std() > 5
    assert p.coarse.shape == p.gt.shape == (256, 256)
    assert p.coarse.dtype == p.gt.dtype == np.uint8
    assert np.unique(p.gt).tolist() == list(range(3 + k))
    assert set(np.unique(p.coarse).tolist()) <= set(range(3 + k))
    assert 0.9 < np.mean(p.coarse == p.gt) < 1.0  # a low-resolution segmenter's map
  for p, q in zip(pairs, heldout_label_composites(256, count=3)):
    for a, b in zip(p, q):
      np.testing.assert_array_equal(a, b)
  for p, q in zip(pairs, heldout_label_composites(128, count=3)):  # the same scenes
    assert p.name == q.name
    down = lambda x: cv2.resize(x, (128, 128), interpolation=cv2.INTER_NEAREST)  # noqa: E731
    assert np.mean(down(p.gt) == q.gt) > 0.97 and np.mean(down(p.coarse) == q.coarse) > 0.97
    image = cv2.resize(p.image, (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(image.astype(int) - q.image).mean() < 8


@pytest.mark.skipif(__import__('importlib.util').util.find_spec('skimage') is None,
                    reason='scikit-image (requirements.txt) ships the photographs')
def test_labels_benchmark_runs_at_a_tiny_size(tmp_path):
  picture = tmp_path / 'labels.png'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', 'labels.py'), '--sizes',
                         '192', '--count', '1', '--synthetic', '96', '--picture', str(picture)],
                        cwd=root, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  for line in ('held-out composites, 192 px', 'synthetic scenes, 96 px', '  coarse  mIoU',
               '  refined mIoU', '  far flips: max', '  seconds per image (median): refine_labels',
               '  identical label maps: yes', 'picture: '):
    assert line in out, out
  with Image.open(picture) as img:
    assert img.size == (1280, 640)


def test_synthetic_scene_and_the_low_resolution_segmenters_label_map():
  from crm_jax.data import synthesis, synthetic
  image, gt = synthetic.make_synthetic_scene(96, 128, np.random.default_rng(0), 4)
  assert image.shape == (96, 128, 3) and image.dtype == gt.dtype == np.uint8
  assert gt.shape == (96, 128) and set(np.unique(gt).tolist()) == {0, 1, 2, 3}
  again = synthetic.make_synthetic_scene(96, 128, np.random.default_rng(0), 4)
  np.testing.assert_array_equal(image, again[0])
  np.testing.assert_array_equal(gt, again[1])
  coarse = synthesis.lowres_segmenter_labels(gt, np.random.default_rng(1), 4, (256, 192))
  assert coarse.shape == (192, 256) and coarse.dtype == np.uint8
  up = cv2.resize(gt, (256, 192), interpolation=cv2.INTER_NEAREST)
  assert set(np.unique(coarse).tolist()) <= {0, 1, 2, 3} and 0.8 < np.mean(coarse == up) < 1
  mask = np.where(gt == 2, 255, 0).astype(np.uint8)  # two classes: the binary segmenter's mask
  np.testing.assert_array_equal(synthesis.lowres_segmenter_labels(gt == 2, None, 8) * 255,
                                synthesis.lowres_segmenter_mask(mask, None, 8))
