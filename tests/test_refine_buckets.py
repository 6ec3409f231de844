"""The bucketed, banded refinement loop equals the plain per-shape loop, and
bounds the number of compilations (``crm_jax.refine``)."""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from crm_jax.models import CRM, TINY, init_variables
from crm_jax.models.implicit_decoder import align_axis
from crm_jax.ops import make_coord_axis
from crm_jax.refine import (Refiner, _axis_tables, _down, bucket_shape,
                            compilations_per_bucket, enable_compilation_cache,
                            scaled_size)
from crm_jax.constants import SCALES

SIZES = [(90, 70), (117, 131), (150, 101)]  # (H, W), odd on purpose


@pytest.fixture(scope="module")
def tiny_vars():
  model = CRM(TINY)
  variables = init_variables(model, jax.random.PRNGKey(0))
  # Non-trivial BatchNorm statistics, so that every stage shifts and scales.
  rng = np.random.default_rng(7)
  stats = jax.tree_util.tree_map(
      lambda a: np.asarray(rng.uniform(0.5, 1.5, a.shape) if a.ndim else a, np.float32),
      variables["batch_stats"])
  # A sharper decoder, so that the probability map is far from constant.
  params = dict(variables["params"])
  params["implicit_decoder"] = jax.tree_util.tree_map(lambda a: a * 3.0,
                                                      params["implicit_decoder"])
  return {"params": params, "batch_stats": stats}


def _example(h, w, seed):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  mask = np.zeros((h, w), np.uint8)
  mask[h // 4: 3 * h // 4, w // 5: 4 * w // 5] = 255
  mask[: h // 6, : w // 6] = 128
  return image, mask


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _plain_axis(n, m):
  """The plain path's alignment of a target axis of n cells to m features."""
  q = make_coord_axis(n)
  out = [align_axis(q, v, m) for v in (-1, 1)]
  return q, jnp.stack([o[0] for o in out]), jnp.stack([o[1] for o in out])


@pytest.mark.parametrize("n", [154, 134, 181, 195, 214, 165, 2112, 1600, 4064, 6064])
def test_query_tables_match_plain_path(n):
  for s in SCALES:
    m = _down(scaled_size((n, n), s)[0])
    q0, i0, r0 = (np.asarray(a) for a in _plain_axis(n, m))
    q1, i1, r1 = _axis_tables(n, m, n + 37)  # padded, as in a bucket
    np.testing.assert_array_equal(i1[:, :n], i0)  # nearest indices: bit for bit
    np.testing.assert_allclose(q1[:n], q0, rtol=0, atol=2.4e-7)
    np.testing.assert_allclose(r1[:, :n], r0, rtol=0, atol=2.5e-7 * m)
    assert i1.min() >= 0 and i1.max() <= m - 1  # padded entries stay in range


def test_bucketed_equals_plain_loop(tiny_vars):
  plain = Refiner(TINY, tiny_vars, buckets=False, compilation_cache=False)
  bucketed = Refiner(TINY, tiny_vars, compilation_cache=False)
  banded = Refiner(TINY, tiny_vars, band_elements=4000, compilation_cache=False)
  for k, (h, w) in enumerate(SIZES):
    assert bucket_shape((h + 64, w + 64)) != (h + 64, w + 64)  # really padded
    image, mask = _example(h, w, k)
    ref = plain.refine_all_scales(image, mask)
    assert min(np.std(p) for p in ref.values()) > 0.02  # non-trivial maps
    for other in (bucketed, banded) if k == 0 else (bucketed,):
      out = other.refine_all_scales(image, mask)
      assert list(out) == list(SCALES)
      for s in SCALES:
        assert out[s].shape == (h, w) and out[s].dtype == np.float32
        np.testing.assert_allclose(out[s], ref[s], rtol=0, atol=1e-5)


def test_bucketed_empty_mask_gives_zeros(tiny_vars):
  refiner = Refiner(TINY, tiny_vars, compilation_cache=False)
  image, _ = _example(70, 90, 3)
  out = refiner.refine_all_scales(image, np.zeros((70, 90), np.uint8), (0.5, 1.0))
  assert all(not p.any() and p.shape == (70, 90) for p in out.values())


class _CompileCounter:
  """Counts XLA backend compilations (JAX's monitoring event for each one)."""

  def __init__(self):
    self.count = 0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kwargs):
    if self.active and event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


@pytest.fixture(scope="module")
def counter():
  return _CompileCounter()


def _count(counter, fn):
  counter.count, counter.active = 0, True
  try:
    fn()
  finally:
    counter.active = False
  return counter.count


def test_compilations_are_bounded(tiny_vars, counter):
  enable_compilation_cache("")  # no persistent cache: every compilation is real
  jax.clear_caches()
  scales = (1.0,)
  bound = compilations_per_bucket(TINY, len(scales))
  refiner = Refiner(TINY, tiny_vars, compilation_cache=False)
  # Three sizes in one bucket: the first compiles, the other two cost nothing.
  same_bucket = [(90, 70), (95, 75), (93, 66)]
  assert len({bucket_shape((h + 64, w + 64)) for h, w in same_bucket}) == 1
  counts = [_count(counter, lambda: refiner.refine_all_scales(*_example(h, w, 0), scales))
            for h, w in same_bucket]
  assert 0 < counts[0] <= bound
  assert counts[1:] == [0, 0]
  # Three sizes in three buckets: at most one bucket's bound each.
  jax.clear_caches()
  buckets = {bucket_shape((h + 64, w + 64)) for h, w in SIZES}
  total = _count(counter, lambda: [refiner.refine_all_scales(*_example(h, w, 1), scales)
                                   for h, w in SIZES])
  assert 0 < total <= len(buckets) * bound
  # The plain loop compiles again for every new size (2 per scale).
  jax.clear_caches()
  plain = Refiner(TINY, tiny_vars, buckets=False, compilation_cache=False)
  plain_counts = [_count(counter, lambda: plain.refine_all_scales(*_example(h, w, 0), scales))
                  for h, w in same_bucket]
  assert all(c >= 2 * len(scales) for c in plain_counts)


@pytest.mark.parametrize("rows,valid,halo,band", [(80, 77, 1, 3), (40, 40, 2, 7), (9, 5, 1, 20)])
def test_bands_cover_valid_rows_with_halo(rows, valid, halo, band):
  from crm_jax.refine import _bands
  slab, band_used, spans = _bands(rows, valid, halo, band)
  covered = set()
  for start, r0 in spans:
    assert 0 <= start and start + slab <= rows  # the slab lies inside the map
    assert r0 - start >= min(halo, r0) and start + slab - (r0 + band_used) >= min(
        halo, rows - r0 - band_used)  # a full halo, except at the map's edges
    covered.update(range(r0, r0 + band_used))
  assert set(range(valid)) <= covered
  if band + 2 * halo < rows:
    assert len(spans) > 1
