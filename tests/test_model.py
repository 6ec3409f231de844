"""Model tests that need no PyTorch: shapes, equivalent decoder orders, errors."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from crm_jax import checkpoint as ckpt
from crm_jax.io import InputError
from crm_jax.models import CRM, TINY, init_variables
from crm_jax.ops import make_coord, resize_bilinear_align_corners
from crm_jax.geometry import scaled_size
from crm_jax.refine import Refiner


@pytest.fixture(scope="module")
def tiny():
  model = CRM(TINY)
  return model, init_variables(model, jax.random.PRNGKey(0))


@pytest.mark.parametrize("h,w", [(61, 47), (32, 33), (9, 8)])
def test_feature_map_size_follows_pytorch_rule(tiny, h, w):
  model, variables = tiny
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, h, w, 4)), jnp.float32)
  feats = model.apply(variables, x, method=lambda m, x: m.encoder(x))
  down = lambda n: (n - 1) // 2 + 1
  assert feats["x1"].shape[1:3] == (down(h), down(w))
  assert feats["x2"].shape[1:3] == (down(down(h)), down(down(w)))
  assert feats["x3"].shape[1:3] == (down(down(down(h))), down(down(down(w))))
  f = model.apply(variables, x, method=CRM.features)
  assert f.shape == (1, down(h), down(w), TINY.feature_dim)


def test_decode_grid_equals_generic_query(tiny):
  model, variables = tiny
  rng = np.random.default_rng(1)
  feature_map = jnp.asarray(rng.normal(size=(1, 7, 9, TINY.feature_dim)), jnp.float32)
  big_h, big_w = 23, 40
  coord = make_coord((big_h, big_w)).reshape(1, -1, 2)
  cell = jnp.broadcast_to(jnp.asarray([2 / big_h, 2 / big_w], jnp.float32), coord.shape)
  generic = model.apply(variables, feature_map, coord, cell,
                        method=lambda m, *a: m.implicit_decoder(*a))
  projected = model.apply(variables, feature_map, method=CRM.project)[0]
  fused = model.apply(variables, projected, jnp.arange(big_h), (big_h, big_w),
                      method=CRM.decode_grid)
  np.testing.assert_allclose(np.asarray(generic).reshape(big_h, big_w), fused, atol=1e-5)


def test_resize_align_corners_keeps_corners():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 7, 2)), jnp.float32)
  y = resize_bilinear_align_corners(x, (9, 4))
  for (i, j), (k, l) in {(0, 0): (0, 0), (0, 6): (0, 3), (4, 0): (8, 0), (4, 6): (8, 3)}.items():
    np.testing.assert_allclose(y[0, k, l], x[0, i, j], atol=1e-6)


def test_scaled_size_rounds_half_to_even():
  assert scaled_size((660, 100), 0.125) == (82, 12)  # 82.5 -> 82, 12.5 -> 12
  assert scaled_size((100, 100), 1.0) == (100, 100)


def test_checkpoint_round_trip_and_errors(tiny, tmp_path):
  model, variables = tiny
  path = ckpt.save_model(str(tmp_path / "m"), variables, TINY)
  config, loaded = ckpt.load_model(path)
  assert config == TINY
  for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileExistsError):
    ckpt.save_model(path, variables, TINY)
  with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
    ckpt.load_model(str(tmp_path / "missing"))
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "config.json").write_text("{not json")
  with pytest.raises(ckpt.CheckpointError, match="config.json"):
    ckpt.load_model(str(tmp_path / "junk"))


def test_refiner_input_errors(tiny):
  model, variables = tiny
  refiner = Refiner(TINY, variables)
  image = np.zeros((40, 50, 3), np.uint8)
  with pytest.raises(InputError, match="mask is"):
    refiner.refine(image, np.zeros((41, 50), np.uint8))
  with pytest.raises(InputError, match="exceed"):
    refiner.refine(np.zeros((20, 50, 3), np.uint8), np.zeros((20, 50), np.uint8))
  with pytest.raises(InputError, match="uint8"):
    refiner.refine(image.astype(np.float32), np.zeros((40, 50), np.uint8))


def test_refiner_grey_rgba_and_empty_mask(tiny):
  model, variables = tiny
  refiner = Refiner(TINY, variables)
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (40, 45, 3), dtype=np.uint8)
  mask = np.zeros((40, 45), np.uint8)
  mask[10:30, 12:33] = 255
  scales = (0.5, 1.0)
  # Grey is replicated to RGB; RGBA loses its alpha channel (documented).
  grey = rgb[:, :, 0]
  np.testing.assert_array_equal(
      refiner.refine(grey, mask, scales),
      refiner.refine(np.repeat(grey[:, :, None], 3, 2), mask, scales))
  rgba = np.concatenate([rgb, rng.integers(0, 256, (40, 45, 1), dtype=np.uint8)], 2)
  np.testing.assert_array_equal(refiner.refine(rgba, mask, scales),
                                refiner.refine(rgb, mask, scales))
  # An empty mask gives an all-zero prediction, as the published loop does.
  out = refiner.refine(rgb, np.zeros_like(mask), scales)
  assert out.shape == mask.shape and out.dtype == np.float32 and not out.any()


def test_dropout_rate_option(tiny):
  """ModelConfig.dropout_rate: 0 makes training-mode outputs independent of the dropout key;
  the published 0.5 does not. The rate does not change the parameters' tree."""
  import dataclasses
  model, variables = tiny
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 24, 24, 4))
  coord = make_coord((24, 24)).reshape(1, -1, 2).repeat(2, 0)
  cell = jnp.full_like(coord, 2.0 / 24)

  def run(m, key):
    out, _ = m.apply(variables, x, coord, cell, train=True, rngs={"dropout": key},
                     mutable=["batch_stats"])
    return np.asarray(out)

  assert TINY.dropout_rate == 0.5
  assert not np.allclose(run(model, jax.random.PRNGKey(2)), run(model, jax.random.PRNGKey(3)))
  no_drop = CRM(dataclasses.replace(TINY, dropout_rate=0.0))
  a, b = run(no_drop, jax.random.PRNGKey(2)), run(no_drop, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(a, b)
  shapes = jax.tree_util.tree_map(jnp.shape, init_variables(no_drop, jax.random.PRNGKey(0)))
  assert shapes == jax.tree_util.tree_map(jnp.shape, variables)
  # architecture(): the fields that fix parameters and outputs, without the dropout rate.
  assert "dropout_rate" not in TINY.architecture()
  assert no_drop.config.architecture() == TINY.architecture()
  assert no_drop.config.to_dict() != TINY.to_dict()
