"""Tests of the real-photograph training source (crm_jax/data/real_photos.py)."""

import math

import ml_collections
import numpy as np
import pytest

from crm_jax.data import pipeline
from crm_jax.data import real_photos as rp

pytestmark = pytest.mark.skipif(
    __import__('importlib.util').util.find_spec('skimage') is None,
    reason='scikit-image (requirements.txt) ships the photographs')

SIZE = 96


def _config(**overrides):
  config = {'dataset': 'real_photos', 'real_photos_num_examples': 40, 'real_photos_size': SIZE,
            'real_photos_synthetic_fraction': 0.25, 'synthetic_size': 64, 'seed': 3,
            'batch_size': 4, 'crop_size': 48}
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def test_photos_are_read_from_the_package():
  for name in rp.PHOTOS:
    photo = rp.load_photo(name)
    assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
    assert min(photo.shape[:2]) >= 256
  horse = rp.load_horse()
  assert set(np.unique(horse)) == {0, 255}
  assert 0.1 < np.count_nonzero(horse) / horse.size < 0.6  # the horse, not its background
  assert set(rp.HELD_OUT) <= set(rp.PHOTOS)
  assert not set(rp.HELD_OUT) & set(rp.TRAIN_PHOTOS)


def test_source_items_are_well_formed():
  source = rp.RealPhotoSource(30, SIZE, seed=0)
  for i in range(len(source)):
    item = source[i]
    image, mask = item['image'], item['mask']
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}  # binary, never empty nor full
    assert image.std() > 5  # a photograph, not a flat canvas
  with pytest.raises(IndexError):
    source[30]


@pytest.mark.parametrize('kind', list(rp.SHAPES))
def test_silhouettes(kind):
  for seed in range(4):
    mask = rp.silhouette(kind, 128, np.random.default_rng(seed))
    assert mask.shape == (128, 128) and set(np.unique(mask)) == {0, 255}
    fraction = np.count_nonzero(mask) / mask.size
    assert 0.01 < fraction < 0.8


def test_source_is_deterministic_per_seed():
  a, b, c = (rp.RealPhotoSource(10, SIZE, seed=s) for s in (1, 1, 2))
  for i in (0, 7, 3):
    for key in ('image', 'mask'):
      np.testing.assert_array_equal(a[i][key], b[i][key])
  assert any(not np.array_equal(a[i]['image'], c[i]['image']) for i in range(5))
  assert not np.array_equal(a[0]['image'], a[1]['image'])


def test_pipeline_examples_well_formed_and_deterministic():
  config = _config()
  source = pipeline.make_source(config)
  assert len(source) == 40
  assert source.lengths == [30, 10]  # a quarter synthetic
  batch = pipeline.host_batch(config, 2, source=source)
  again = pipeline.host_batch(config, 2, source=pipeline.make_source(config))
  assert batch['image'].shape == (4, 48, 48, 3) and batch['seg'].shape == (4, 48, 48, 1)
  assert batch['gt'].shape == (4, 48, 48, 1)
  assert np.all(np.isfinite(batch['image']))
  assert batch['seg'].min() >= -1 and batch['seg'].max() <= 1
  assert batch['gt'].min() >= 0 and batch['gt'].max() <= 1
  for key in batch:
    np.testing.assert_array_equal(batch[key], again[key])
  other = pipeline.host_batch(_config(seed=4), 2)
  assert not np.array_equal(batch['image'], other['image'])


def test_pipeline_rejects_bad_fields():
  with pytest.raises(pipeline.DatasetError, match='real_photos'):
    pipeline.make_source(_config(real_photos_size=0))
  with pytest.raises(pipeline.DatasetError, match='real_photos'):
    pipeline.make_source(_config(real_photos_synthetic_fraction=1.0))


def test_held_out_photographs_never_in_training_examples(monkeypatch):
  used = []
  region = rp.photo_region

  def spy(name, *args, **kwargs):
    used.append(name)
    return region(name, *args, **kwargs)

  monkeypatch.setattr(rp, 'photo_region', spy)
  source = rp.RealPhotoSource(60, 64, seed=5)
  for i in range(len(source)):
    source[i]
  assert len(used) == 2 * 60  # a foreground and a background per composite
  assert not set(used) & set(rp.HELD_OUT)
  assert len(set(used)) > len(rp.TRAIN_PHOTOS) // 2  # the draws do spread over the photos

  # The held-out sets, the other way round, are made of the held-out photographs only.
  used.clear()
  pairs = rp.heldout_composites(256, count=2)
  assert set(used) <= set(rp.HELD_OUT) and used
  for pair in pairs:
    assert pair.image.shape == (256, 256, 3) and pair.gt.shape == pair.coarse.shape == (256, 256)


def test_held_out_sets_are_the_same_scenes_at_every_size():
  small, large = rp.heldout_composites(256, count=2), rp.heldout_composites(512, count=2)
  for a, b in zip(small, large):
    assert a.name == b.name
    down = (b.gt.reshape(256, 2, 256, 2).mean(axis=(1, 3)) > 127)
    assert np.mean(down == (a.gt > 127)) > 0.99
  photos = rp.heldout_photographs(300)
  assert len(photos) == sum(len(rp.OUTLINES[n]) for n in rp.HELD_OUT)
  for pair in photos:
    assert max(pair.image.shape[:2]) == 300 and pair.gt is None
    assert pair.coarse.shape == pair.image.shape[:2]
    assert 0.2 < np.count_nonzero(pair.coarse) / pair.coarse.size < 0.95


def test_far_flip_share_on_a_constructed_case():
  h, w = 100, 200
  diag = math.hypot(h, w)  # about 223.6; 3 % of it is about 6.7 px
  coarse = np.zeros((h, w), np.uint8)
  coarse[20:80, 40:160] = 255  # a 60 x 120 box
  far = rp.distance_to_boundary(coarse) > 0.03 * diag
  assert far[50, 100] and far[2, 2] and not far[20, 100] and not far[50, 35]
  # Unchanged: nothing flips.
  assert rp.far_flip_share(coarse, coarse).share == 0.0
  # Flipping only pixels near the boundary (a 3 px ring) counts nothing.
  ring = coarse.copy()
  ring[20:23, 40:160] = 0
  ring[17:20, 40:160] = 255
  flips = rp.far_flip_share(coarse, ring)
  assert flips.share == 0.0 and flips.inside == 0.0 and flips.outside == 0.0
  # Erasing a block deep inside: exactly its pixels count, inside only.
  hole = coarse.copy()
  hole[40:60, 80:120] = 0  # 800 pixels, all farther than 6.7 px from the box's edge
  flips = rp.far_flip_share(coarse, hole)
  n_in = int(np.count_nonzero(far & (coarse > 0)))
  n_all = int(np.count_nonzero(far))
  assert flips.num_far == n_all
  assert flips.inside == pytest.approx(800 / n_in)
  assert flips.share == pytest.approx(800 / n_all)
  assert flips.outside == 0.0
  # A probability map: a far background blob turned foreground counts outside.
  prob = (coarse / 255.0).astype(np.float32)
  prob[0:5, 0:10] = 0.9
  flips = rp.far_flip_share(coarse, prob)
  assert flips.outside == pytest.approx(50 / (n_all - n_in)) and flips.inside == 0.0
  # An empty coarse mask has no boundary: every pixel is far.
  empty = rp.far_flip_share(np.zeros((h, w), np.uint8), coarse)
  assert empty.num_far == h * w
  assert empty.share == pytest.approx(np.count_nonzero(coarse) / (h * w))


def test_distractors_change_the_picture_never_the_gt():
  plain = rp.RealPhotoSource(12, SIZE, seed=4)
  none = rp.RealPhotoSource(12, SIZE, seed=4, distractor_prob=0.0)
  every = rp.RealPhotoSource(12, SIZE, seed=4, distractor_prob=1.0)
  changed = 0
  for i in range(len(plain)):
    for key in ('image', 'mask'):  # probability 0 draws nothing: the composites of before
      np.testing.assert_array_equal(plain[i][key], none[i][key])
    np.testing.assert_array_equal(plain[i]['mask'], every[i]['mask'])
    changed += not np.array_equal(plain[i]['image'], every[i]['image'])
  assert changed >= 10
  with pytest.raises(ValueError, match='distractor_prob'):
    rp.RealPhotoSource(4, SIZE, distractor_prob=1.5)


def test_outer_distractors_stay_away_from_the_silhouette():
  rng = np.random.default_rng(0)
  layer = np.zeros((SIZE, SIZE, 3), np.float32)
  centres = np.zeros((SIZE, SIZE), bool)
  centres[70:, 70:] = True
  out = rp.paste_distractors(layer, centres, rng, rp.TRAIN_PHOTOS)
  touched = np.abs(out).sum(-1) > 0
  assert touched.any()
  side = int(rp.DISTRACTOR_SIDE[1] * SIZE)
  assert not touched[:70 - side // 2 - 1].any() and not touched[:, :70 - side // 2 - 1].any()
  nowhere = np.zeros_like(centres)
  np.testing.assert_array_equal(rp.paste_distractors(layer, nowhere, rng, rp.TRAIN_PHOTOS), layer)
