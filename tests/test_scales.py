"""``min_side`` (crm_jax.scales.scales_to_run, ``Refiner(min_side=...)``): the leading scales at
which a small image is too small are left out; 0 is the published loop. TINY model, random
weights, images of 80-96 pixels."""

import warnings

import jax
import numpy as np
import pytest

from crm_jax.constants import SCALES
from crm_jax.io import InputError
from crm_jax.models.crm import CRM, TINY, init_variables
from crm_jax.preprocess import mask_to_prob
from crm_jax.refine import Refiner
from crm_jax.scales import (SMALL_SIDE, SmallImageWarning, check_min_side, scales_to_run,
                            small_image_advice, small_image_note, small_images_line)


def test_scales_to_run_drops_the_leading_scales_below_min_side():
  # 256x192: the shorter side is 24, 48, 96 and 192 pixels at the four scales.
  size = (192, 256)
  assert scales_to_run(SCALES, size, 0) == SCALES
  assert scales_to_run(SCALES, size, 24) == SCALES
  assert scales_to_run(SCALES, size, 25) == (0.25, 0.5, 1.0)
  assert scales_to_run(SCALES, size, 48) == (0.25, 0.5, 1.0)
  assert scales_to_run(SCALES, size, 64) == (0.5, 1.0)
  assert scales_to_run(SCALES, size, 128) == (1.0,)
  assert scales_to_run(SCALES, size, 10_000) == (1.0,)  # the last scale always stays
  assert scales_to_run(SCALES, (256, 192), 64) == (0.5, 1.0)  # the shorter side, either way
  assert scales_to_run([0.5, 1], size, 64) == (0.5, 1.0)  # checked scales, as floats


def test_scales_to_run_is_the_rule_on_any_size():
  rng = np.random.default_rng(0)
  for _ in range(200):
    h, w = (int(x) for x in rng.integers(40, 3000, 2))
    m = int(rng.integers(0, 400))
    kept = scales_to_run(SCALES, (h, w), m)
    assert kept == SCALES[len(SCALES) - len(kept):] and kept[-1] == 1.0  # a suffix
    for s in SCALES[:-1]:
      assert (s in kept) == (min(h, w) * s >= m), (h, w, m, s)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3", None])
def test_bad_min_side_is_a_clear_value_error(bad):
  with pytest.raises(ValueError, match="min side .*whole number of pixels") as e:
    check_min_side(bad)
  assert isinstance(e.value, InputError) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="min side"):
    scales_to_run(SCALES, (100, 100), bad)
  with pytest.raises(ValueError, match="min side"):
    Refiner(TINY, None, min_side=bad)
  assert check_min_side(np.int64(7)) == 7


def test_small_image_note_and_lines():
  assert small_image_note(SCALES, (192, 256)) == (
      "256x192: the coarsest scale 0.125 shows it at 32x24 pixels")
  assert small_image_advice(SCALES, (192, 256)) == (
      f"small images refine better with --min-side {SMALL_SIDE} (or --scales "
      + " ".join(str(s) for s in scales_to_run(SCALES, (192, 256), SMALL_SIDE)) + ")")
  big = int(np.ceil(SMALL_SIDE / SCALES[0]))
  assert small_image_note(SCALES, (big, big)) is None
  assert small_image_note(SCALES, (big - 1, 4000)) is not None
  assert small_image_note((1.0,), (40, 40)) is None  # min_side could change nothing
  line = small_images_line([("big", (big, big)), ("a", (100, 120)), ("unknown", None),
                            ("b", (90, 90))], SCALES)
  assert line.startswith("warning: 2 of 4 object(s) are small images, e.g. a is 120x100: ")
  assert f"--min-side {SMALL_SIDE}" in line and "\n" not in line
  assert small_images_line([("big", (big, big)), ("unknown", None)], SCALES) is None


# ---------------------------------------------------------------------------------------------
# The Refiner.

MIN_SIDE = 12  # 80 * 0.125 = 10 < 12 <= 96 * 0.125: the 80-pixel image loses scale 0.125 only


@pytest.fixture(scope="module")
def tiny_vars():
  return init_variables(CRM(TINY), jax.random.key(0))


def _pair(h, w, seed):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  mask = np.zeros((h, w), np.uint8)
  mask[h // 4: 3 * h // 4, w // 5: 4 * w // 5] = 255
  mask[: h // 6, : w // 6] = 100  # a soft value
  return image, mask


def _assert_maps_equal(got, want):
  assert list(got) == list(want)
  for s in want:
    assert got[s].dtype == np.float32 and got[s].shape == want[s].shape, s
    np.testing.assert_array_equal(got[s], want[s], err_msg=str(s))


@pytest.mark.slow  # compiles the TINY model at a few scales
def test_refiner_min_side_runs_the_kept_scales_and_fills_the_others(tiny_vars):
  image, mask = _pair(80, 100, 0)
  kept = scales_to_run(SCALES, mask.shape, MIN_SIDE)
  assert kept == SCALES[1:]
  with warnings.catch_warnings():
    warnings.simplefilter("error", SmallImageWarning)  # min_side given: no warning
    got = Refiner(TINY, tiny_vars, min_side=MIN_SIDE).refine_all_scales(image, mask)
  with pytest.warns(SmallImageWarning, match=r"100x80: .*min_side=64"):
    reference = Refiner(TINY, tiny_vars).refine_all_scales(image, mask, kept)
  assert list(got) == list(SCALES)
  _assert_maps_equal({s: got[s] for s in kept}, reference)
  expected = mask.astype(np.float32) / np.float32(255)
  np.testing.assert_array_equal(got[0.125], expected)
  assert got[0.125].dtype == np.float32 and not np.array_equal(got[0.125], got[0.25])
  # min_side=0 is the published loop: the refiner with no min_side, every scale refined.
  published = Refiner(TINY, tiny_vars, min_side=0, warn_small=False)
  default = Refiner(TINY, tiny_vars, warn_small=False)
  _assert_maps_equal(published.refine_all_scales(image, mask),
                     default.refine_all_scales(image, mask))


@pytest.mark.slow
def test_the_small_image_warning_is_given_once_per_refiner(tiny_vars):
  image, mask = _pair(80, 100, 1)
  refiner = Refiner(TINY, tiny_vars)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
      refiner.refine(image, mask, (0.5, 1.0))
    refiner.refine_batch([image], [mask], (0.5, 1.0))
  small = [w for w in caught if issubclass(w.category, SmallImageWarning)]
  assert len(small) == 1 and "this warning is given once per Refiner" in str(small[0].message)
  assert small[0].filename == __file__  # it points at the caller
  with warnings.catch_warnings():
    warnings.simplefilter("error", SmallImageWarning)
    Refiner(TINY, tiny_vars, warn_small=False).refine(image, mask, (0.5, 1.0))
    Refiner(TINY, tiny_vars).refine(image, mask, (1.0,))  # one scale: nothing to leave out


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["fused", "banded"])
def test_refine_batch_with_two_ladders_equals_one_by_one(tiny_vars, plan):
  refiner = Refiner(TINY, tiny_vars, plan=plan, min_side=MIN_SIDE)
  pairs = [_pair(80, 100, 2), _pair(96, 100, 3)]
  # One bucket, two ladders: the fused plan would batch them but must run them apart.
  assert refiner.bucket_of((80, 100)) == refiner.bucket_of((96, 100))
  assert scales_to_run(SCALES, (80, 100), MIN_SIDE) != scales_to_run(SCALES, (96, 100), MIN_SIDE)
  batch = refiner.refine_batch_all_scales([p[0] for p in pairs], [p[1] for p in pairs])
  for (image, mask), got in zip(pairs, batch):
    _assert_maps_equal(got, refiner.refine_all_scales(image, mask))
  np.testing.assert_array_equal(batch[0][0.125], mask_to_prob(pairs[0][1]))
  assert not np.array_equal(batch[1][0.125], mask_to_prob(pairs[1][1]))  # refined
  last = refiner.refine_batch([p[0] for p in pairs], [p[1] for p in pairs])
  for got, (image, mask) in zip(last, pairs):
    np.testing.assert_array_equal(got, refiner.refine(image, mask))


def test_a_checkpoint_recommends_its_min_side(tiny_vars, tmp_path):
  """``meta.refine.min_side`` is the default of ``Refiner.from_checkpoint`` (an explicit value,
  0 included, wins); a checkpoint without one gives the published loop; a bad one is a
  CheckpointError naming the file."""
  from crm_jax.checkpoint import (CheckpointError, recommended_min_side, resolve_min_side,
                                  save_model)
  plain = save_model(str(tmp_path / "plain"), tiny_vars, TINY)
  advised = save_model(str(tmp_path / "advised"), tiny_vars, TINY,
                       meta={"refine": {"min_side": 96}})
  assert recommended_min_side(plain) == 0 and recommended_min_side(advised) == 96
  assert Refiner.from_checkpoint(plain).min_side == 0
  assert Refiner.from_checkpoint(advised).min_side == 96
  assert Refiner.from_checkpoint(advised, min_side=None).min_side == 96
  assert Refiner.from_checkpoint(advised, min_side=0).min_side == 0
  assert Refiner.from_checkpoint(advised, min_side=32).min_side == 32
  assert resolve_min_side(None, plain) == (0, None)
  assert resolve_min_side(5, advised) == (5, None)
  value, note = resolve_min_side(None, advised)
  assert value == 96 and advised in note and "min_side 96" in note and "--min-side 0" in note
  bad = save_model(str(tmp_path / "bad"), tiny_vars, TINY, meta={"refine": {"min_side": -2}})
  with pytest.raises(CheckpointError, match=r"bad/config.json: bad refine.min_side"):
    Refiner.from_checkpoint(bad)


def test_the_bundled_checkpoint_recommends_the_small_side():
  """The bundled checkpoint (trained with configs/real_photos_small.py) carries that config's
  refine_min_side; the published recipe's is 0."""
  from configs import crm_resnet50, real_photos_small
  from crm_jax.bundled import default_checkpoint
  from crm_jax.checkpoint import read_config, recommended_min_side
  want = real_photos_small.get_config().refine_min_side
  assert want > 0 and crm_resnet50.get_config().refine_min_side == 0
  assert recommended_min_side(default_checkpoint()) == want
  assert read_config(default_checkpoint())[1]["train_config"]["refine_min_side"] == want
