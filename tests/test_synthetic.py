"""Tests of the synthetic (image, mask) source."""

import numpy as np
import pytest

from crm_jax.data.synthetic import SyntheticSource, make_synthetic_pair


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (7, 1), (2, 2), (3, 3), (5, 7), (31, 17),
                                  (224, 224), (300, 500), (640, 480)])
def test_shapes_dtypes_and_binary_mask(size):
  h, w = size
  for seed in range(3):
    image, mask = make_synthetic_pair(h, w, np.random.default_rng(seed))
    assert image.shape == (h, w, 3) and image.dtype == np.uint8
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    assert np.isin(mask, (0, 255)).all()
    if h * w >= 2:
      assert mask.any() and not mask.all()


def test_mask_never_empty_nor_full_for_typical_sizes():
  fractions = []
  for seed in range(60):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(16, 320, 2)
    _, mask = make_synthetic_pair(int(h), int(w), rng)
    fraction = np.count_nonzero(mask) / mask.size
    assert 0.0 < fraction < 1.0
    fractions.append(fraction)
  # Measured over 200 pairs at 224x224: covered fraction 0.01-0.53, mean 0.26.
  assert 0.1 < np.mean(fractions) < 0.5


def test_determinism():
  a = make_synthetic_pair(120, 90, np.random.default_rng(5))
  b = make_synthetic_pair(120, 90, np.random.default_rng(5))
  c = make_synthetic_pair(120, 90, np.random.default_rng(6))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_object_distinct_but_not_trivially():
  source = SyntheticSource(40, 160, 200, seed=3)
  distances, accuracies = [], []
  for i in range(len(source)):
    example = source[i]
    image = example["image"].astype(np.float32)
    fg = example["mask"] > 0
    mean_fg, mean_bg = image[fg].mean(0), image[~fg].mean(0)
    distances.append(np.linalg.norm(mean_fg - mean_bg))
    nearer_fg = (np.linalg.norm(image - mean_fg, axis=-1)
                 < np.linalg.norm(image - mean_bg, axis=-1))
    accuracies.append(np.mean(nearer_fg == fg))
  # Measured over 100 pairs: mean-colour distance 29-87 (median 56); a nearest-mean colour
  # classifier gets 0.74-1.00 pixel accuracy (median 0.92): informative colour, not a trivial cue.
  assert np.median(distances) > 20
  assert 0.8 < np.median(accuracies) < 0.98
  assert min(accuracies) < 0.9


def test_large_pair():
  """A BIG-sized pair (2048x1536) is made whole: shapes, a mask neither empty nor full."""
  image, mask = make_synthetic_pair(2048, 1536, np.random.default_rng(0))
  assert image.shape == (2048, 1536, 3) and mask.shape == (2048, 1536)
  assert 0 < np.count_nonzero(mask) < mask.size


def test_source():
  source = SyntheticSource(num_examples=5, height=48, width=64, seed=7)
  assert len(source) == 5
  example = source[2]
  assert set(example) == {"image", "mask"}
  assert example["image"].shape == (48, 64, 3) and example["mask"].shape == (48, 64)
  # Random access: the same record from a fresh source, in any order.
  again = SyntheticSource(5, 48, 64, seed=7)
  for i in (4, 2, 0):
    np.testing.assert_array_equal(again[i]["image"], source[i]["image"])
    np.testing.assert_array_equal(again[i]["mask"], source[i]["mask"])
  np.testing.assert_array_equal(source[-1]["image"], source[4]["image"])
  assert not np.array_equal(source[0]["image"], source[1]["image"])
  assert not np.array_equal(SyntheticSource(5, 48, 64, seed=8)[2]["image"], example["image"])
  with pytest.raises(IndexError):
    source[5]
  with pytest.raises(IndexError):
    source[-6]
  assert len(SyntheticSource(0, 8, 8)) == 0
