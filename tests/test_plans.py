"""The execution plans (``crm_jax.plans``): equal results, batches, compilation bounds, ``auto``."""

import functools
import os

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from crm_jax import geometry
from crm_jax.constants import SCALES
from crm_jax.io import InputError
from crm_jax.models import CRM, RESNET50, TINY, init_variables
from crm_jax.models.crm import ModelConfig
from crm_jax.models.implicit_decoder import align_axis
from crm_jax.ops import make_coord_axis
from crm_jax.plans import PLANS, choose_plan, compilations_per_bucket, fused_peak_bytes
from crm_jax.refine import BatchInputError, Refiner, enable_compilation_cache

SIZES = [(90, 70), (117, 131), (150, 101)]  # (H, W), odd on purpose
# Not the published layout: two blocks in layer1, one in layer2 (no later
# blocks there), three in layer3; other widths; a shorter, wider decoder.
OTHER = ModelConfig(stem_width=12, stage_sizes=(2, 1, 3), stage_widths=(8, 12, 20),
                    expansion=2, fusion_widths=(6, 10, 14), feature_dim=24,
                    decoder_hidden=(20, 12))


def _variables(config, seed=0):
  """Random variables with non-trivial BatchNorm statistics and a sharp decoder."""
  variables = init_variables(CRM(config), jax.random.PRNGKey(seed))
  rng = np.random.default_rng(7)
  stats = jax.tree_util.tree_map(
      lambda a: np.asarray(rng.uniform(0.5, 1.5, a.shape), np.float32), variables["batch_stats"])
  params = dict(variables["params"])
  params["implicit_decoder"] = jax.tree_util.tree_map(lambda a: a * 3.0,
                                                      params["implicit_decoder"])
  return {"params": params, "batch_stats": stats}


@pytest.fixture(scope="module")
def tiny_vars():
  return _variables(TINY)


def _example(h, w, seed):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  mask = np.zeros((h, w), np.uint8)
  mask[h // 4: 3 * h // 4, w // 5: 4 * w // 5] = 255
  mask[: h // 6, : w // 6] = 128
  return image, mask


def _refiner(config, variables, plan, **kwargs):
  return Refiner(config, variables, plan=plan, compilation_cache=False, **kwargs)


def _assert_equal_maps(out, ref, shape, atol=1e-5):
  assert list(out) == list(ref)
  for s in ref:
    assert out[s].shape == shape and out[s].dtype == np.float32
    np.testing.assert_allclose(out[s], ref[s], rtol=0, atol=atol, err_msg=str(s))


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _plain_axis(n, m):
  """The plain path's alignment of a target axis of n cells to m features."""
  q = make_coord_axis(n)
  out = [align_axis(q, v, m) for v in (-1, 1)]
  return q, jnp.stack([o[0] for o in out]), jnp.stack([o[1] for o in out])


@pytest.mark.parametrize("n", [154, 134, 181, 195, 214, 165, 2112, 1600, 4064, 6064])
def test_query_tables_match_plain_path(n):
  for s in SCALES:
    m = geometry.down(geometry.scaled_size((n, n), s)[0])
    q0, i0, r0 = (np.asarray(a) for a in _plain_axis(n, m))
    q1, i1, r1 = geometry.query_axis(n, m, n + 37)  # padded, as in a bucket
    np.testing.assert_array_equal(i1[:, :n], i0)  # nearest indices: bit for bit
    np.testing.assert_allclose(q1[:n], q0, rtol=0, atol=2.4e-7)
    np.testing.assert_allclose(r1[:, :n], r0, rtol=0, atol=2.5e-7 * m)
    assert i1.min() >= 0 and i1.max() <= m - 1  # padded entries stay in range


def test_encoder_layout_is_one_function():
  blocks = OTHER.encoder_blocks()
  assert [b.name for b in blocks] == ["layer1_0", "layer1_1", "layer2_0", "layer3_0",
                                      "layer3_1", "layer3_2"]
  assert [b.stride for b in blocks] == [1, 1, 2, 1, 1, 1]
  assert [b.dilation for b in blocks] == [1, 1, 1, 1, 2, 2]
  # The Flax encoder builds exactly these blocks.
  params = init_variables(CRM(OTHER), jax.random.PRNGKey(0))["params"]["encoder"]
  assert sorted(k for k in params if k.startswith("layer")) == sorted(b.name for b in blocks)
  # Block kinds: stage 1 first + later, stage 2 first, stage 3 first + later.
  assert compilations_per_bucket(OTHER, 1, "banded") == 1 + 5 + 2 + 1 + 1


@pytest.mark.parametrize("config", [TINY, OTHER], ids=["tiny", "other-architecture"])
def test_plans_agree(config):
  variables = tiny = _variables(config)
  plain = _refiner(config, variables, "plain")
  others = {"banded": _refiner(config, variables, "banded"),
            "fused": _refiner(config, variables, "fused"),
            "banded-small-bands": _refiner(config, tiny, "banded", band_elements=4000)}
  for k, (h, w) in enumerate(SIZES if config is TINY else SIZES[:2]):
    assert geometry.bucket_shape((h + 64, w + 64)) != (h + 64, w + 64)  # really padded
    image, mask = _example(h, w, k)
    ref = plain.refine_all_scales(image, mask)
    assert min(np.std(p) for p in ref.values()) > 0.005  # non-trivial maps
    for name, refiner in others.items():
      if name == "banded-small-bands" and k > 0:
        continue
      _assert_equal_maps(refiner.refine_all_scales(image, mask), ref, (h, w))


@pytest.mark.slow
def test_plans_agree_resnet50():
  variables = _variables(RESNET50)
  image, mask = _example(75, 90, 3)
  scales = (0.5, 1.0)
  ref = _refiner(RESNET50, variables, "plain").refine_all_scales(image, mask, scales)
  assert min(np.std(p) for p in ref.values()) > 0.005
  for plan in ("banded", "fused"):
    out = _refiner(RESNET50, variables, plan).refine_all_scales(image, mask, scales)
    _assert_equal_maps(out, ref, (75, 90))


@pytest.mark.parametrize("plan", PLANS)
def test_empty_mask_gives_zeros(tiny_vars, plan):
  image, _ = _example(70, 90, 3)
  out = _refiner(TINY, tiny_vars, plan).refine_all_scales(image, np.zeros((70, 90), np.uint8),
                                                          (0.5, 1.0))
  assert all(not p.any() and p.shape == (70, 90) for p in out.values())


@pytest.mark.parametrize("plan", ["fused", "banded"])
def test_refine_batch_equals_one_by_one(tiny_vars, plan):
  refiner = _refiner(TINY, tiny_vars, plan, batch_ladder=(1, 2, 4))
  sizes = [(90, 70), (95, 75), (150, 101), (93, 66), (88, 72), (91, 69)]
  assert len({geometry.bucket_shape((h + 64, w + 64)) for h, w in sizes}) == 2
  pairs = [_example(h, w, k) for k, (h, w) in enumerate(sizes)]
  # A batch of one bucket with an empty mask in it, padded from 5 to 4 + 1.
  pairs[3] = (pairs[3][0], np.zeros_like(pairs[3][1]))
  batch = refiner.refine_batch_all_scales([p[0] for p in pairs], [p[1] for p in pairs])
  assert len(batch) == len(pairs)
  for (image, mask), got in zip(pairs, batch):
    _assert_equal_maps(got, refiner.refine_all_scales(image, mask), mask.shape, atol=0)
  assert not batch[3][1.0].any()
  last = refiner.refine_batch([p[0] for p in pairs[:2]], [p[1] for p in pairs[:2]], (0.5, 1.0))
  np.testing.assert_array_equal(last[1], refiner.refine(*pairs[1], (0.5, 1.0)))


def test_refine_batch_bad_pairs(tiny_vars):
  refiner = _refiner(TINY, tiny_vars, "fused")
  good = [_example(90, 70, 0), _example(95, 75, 1)]
  images = [good[0][0], good[1][0], good[1][0]]
  masks = [good[0][1], good[1][1][:, :-1], good[1][1]]
  with pytest.raises(BatchInputError, match=r"pair 1: image is 75x95 but mask is 74x95") as e:
    refiner.refine_batch(images, masks, (1.0,))
  assert list(e.value.bad) == [1] and e.value.results[1] is None
  np.testing.assert_array_equal(e.value.results[0], refiner.refine(*good[0], (1.0,)))
  np.testing.assert_array_equal(e.value.results[2], refiner.refine(*good[1], (1.0,)))
  with pytest.raises(InputError, match="no pairs"):
    refiner.refine_batch([], [])
  with pytest.raises(InputError, match="2 images but 1 masks"):
    refiner.refine_batch(images[:2], masks[:1])


def test_bfloat16_on_fused_as_on_banded(tiny_vars):
  image, mask = _example(90, 70, 0)
  f32 = _refiner(TINY, tiny_vars, "banded").refine_all_scales(image, mask)
  banded = _refiner(TINY, tiny_vars, "banded", dtype="bfloat16").refine_all_scales(image, mask)
  fused = _refiner(TINY, tiny_vars, "fused", dtype="bfloat16").refine_all_scales(image, mask)
  for s in SCALES:
    assert np.abs(banded[s] - f32[s]).max() > 0  # really computed in bfloat16
    assert np.abs(fused[s] - f32[s]).mean() < 0.02
    np.testing.assert_allclose(fused[s], banded[s], atol=0.05)
  with pytest.raises(ValueError, match="bucketed plan"):
    _refiner(TINY, tiny_vars, "plain", dtype="bfloat16")


def test_auto_plan():
  bucket, queries = (1728, 2448), 1 << 20
  peak = fused_peak_bytes(RESNET50, bucket, 1.0, 1, 4, queries)
  assert peak > 0
  assert fused_peak_bytes(RESNET50, bucket, 1.0, 4, 4, queries) == 4 * peak
  choose = functools.partial(choose_plan, "auto", RESNET50, bucket, 1.0, 4, queries)
  assert choose(memory_budget=peak // 2, platform="gpu") == "banded"
  assert choose(memory_budget=peak * 2, platform="gpu") == "fused"
  assert choose(memory_budget=peak * 2, batch=4, platform="gpu") == "banded"
  assert choose(platform="cpu") == "banded"
  assert choose_plan("fused", RESNET50, bucket, 1.0, 4, queries, platform="cpu") == "fused"
  refiner = Refiner(TINY, _variables(TINY), compilation_cache=False)
  assert refiner.plan == "auto" and refiner.plan_for((90, 70)) == "banded"  # on the CPU
  with pytest.raises(ValueError, match="plan must be one of"):
    Refiner(TINY, _variables(TINY), plan="fast", compilation_cache=False)


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


@pytest.mark.parametrize("plan", ["banded", "fused"])
def test_compilations_are_bounded(tiny_vars, counter, plan):
  enable_compilation_cache("")  # no persistent cache: every compilation is real
  jax.clear_caches()
  scales = (0.5, 1.0)
  bound = compilations_per_bucket(TINY, len(scales), plan)
  refiner = _refiner(TINY, tiny_vars, plan)
  # Three sizes in one bucket: the first compiles, the other two cost nothing.
  same_bucket = [(90, 70), (95, 75), (93, 66)]
  assert len({geometry.bucket_shape((h + 64, w + 64)) for h, w in same_bucket}) == 1
  counts = [_count(counter, lambda: refiner.refine_all_scales(*_example(h, w, 0), scales))
            for h, w in same_bucket]
  assert 0 < counts[0] <= bound
  assert counts[1:] == [0, 0]
  # Three sizes in three buckets: at most one bucket's bound each.
  jax.clear_caches()
  buckets = {geometry.bucket_shape((h + 64, w + 64)) for h, w in SIZES}
  total = _count(counter, lambda: [refiner.refine_all_scales(*_example(h, w, 1), scales)
                                   for h, w in SIZES])
  assert 0 < total <= len(buckets) * bound
  if plan == "fused":  # A batch of another rung costs one bound more, and only once.
    pairs = [_example(h, w, 2) for h, w in same_bucket[:2]]
    batch = lambda: refiner.refine_batch([p[0] for p in pairs], [p[1] for p in pairs], scales)
    assert 0 < _count(counter, batch) <= bound
    assert _count(counter, batch) == 0


def test_plain_compiles_per_size(tiny_vars, counter):
  enable_compilation_cache("")
  jax.clear_caches()
  plain = _refiner(TINY, tiny_vars, "plain")
  counts = [_count(counter, lambda: plain.refine_all_scales(*_example(h, w, 0), (1.0,)))
            for h, w in [(90, 70), (95, 75)]]
  assert all(c >= 2 for c in counts)


@pytest.mark.parametrize("rows,valid,halo,band", [(80, 77, 1, 3), (40, 40, 2, 7), (9, 5, 1, 20)])
def test_bands_cover_valid_rows_with_halo(rows, valid, halo, band):
  slab, band_used, spans = geometry.bands(rows, valid, halo, band)
  covered = set()
  for start, r0 in spans:
    assert 0 <= start and start + slab <= rows  # the slab lies inside the map
    assert r0 - start >= min(halo, r0) and start + slab - (r0 + band_used) >= min(
        halo, rows - r0 - band_used)  # a full halo, except at the map's edges
    covered.update(range(r0, r0 + band_used))
  assert set(range(valid)) <= covered
  if band + 2 * halo < rows:
    assert len(spans) > 1


def test_bucket_ladder():
  rungs = sorted({geometry.bucket_side(n) for n in range(1, 7000)})
  assert rungs[0] == 64 and all(r % 16 == 0 for r in rungs)
  for n in (65, 1000, 2113, 6064):
    side = geometry.bucket_side(n)
    assert n <= side <= 1.19 * n + 16


def test_refinement_runs_without_the_training_packages():
  """Accelerator images lack grain, TFDS, ml_collections and tensorboardX: the refinement path
  (Refiner, plans, evaluation, the multi-device runner, the folder mode) must not need them."""
  import subprocess
  import sys
  code = """
import sys
for m in ("grain", "tensorflow_datasets", "ml_collections", "tensorboardX", "tensorflow"):
  sys.modules[m] = None  # importing any of them now fails
import jax, numpy as np
import crm_jax.cli.refine, crm_jax.cli.evaluate, crm_jax.evaluation, crm_jax.folder_refine
import crm_jax.dataset_run, crm_jax.parallel
from crm_jax.models import CRM, TINY, init_variables
from crm_jax.refine import Refiner
variables = init_variables(CRM(TINY), jax.random.PRNGKey(0))
image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
mask = np.zeros((40, 48), np.uint8); mask[10:30, 12:36] = 255
for plan in ("banded", "fused"):
  assert Refiner(TINY, variables, plan=plan).refine(image, mask, (0.5, 1.0)).shape == (40, 48)
print("refined")
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0 and "refined" in proc.stdout, proc.stderr[-2000:]
