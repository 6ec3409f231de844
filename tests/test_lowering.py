"""Every program a user runs on an accelerator lowers for ``cuda`` and ``tpu``, from the CPU.

No GPU or TPU is needed: ``jax.export`` lowers for platforms without their hardware. Each program
is obtained from the library itself (``plans.fused_program``, ``plans.banded_programs``,
``training.step.build(config).p_step``), never rewritten here, lowered for both platforms in
float32 and bfloat16, and its StableHLO read by ``crm_jax.export.portability_problems``: a host
callback or CPU-only custom call, a float64 value or a dynamic shape fails the test with the
program's name (``test_planted_constructs_fail_with_the_program_name`` shows that each does).

Covered: the fused plan (every scale, one small bucket, batch rungs 1 and 2) and what
``Refiner.refine_batch`` runs through it; the banded plan's pieces (``auto`` picks them on an
accelerator whose memory cannot hold the fused plan); the pmapped train step in float32 and
with ``compute_dtype='bfloat16'``. Validation during training refines through ``Refiner``
(``crm_jax.evaluation.evaluate``), so the refinement programs above cover it; it compiles
nothing of its own. Deliberately not lowered: the ``plain`` plan, the exactness reference on the
CPU (float32 only, compiled per image size with no buckets, never chosen by ``auto``).

The last test checks ``plans.fused_peak_bytes`` against XLA's own memory figure for compiled
fused programs (see its docstring).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crm_jax import plans
from crm_jax.constants import SCALES
from crm_jax.export import PortabilityError, export_program, portability_problems
from crm_jax.geometry import bucket_shape
from crm_jax.models import RESNET50, SMALL, TINY
from crm_jax.refine import Refiner

PLATFORMS = ("cuda", "tpu")
DTYPES = ("float32", "bfloat16")
BUCKET = (96, 80)  # (Hb, Wb): a rung of the bucket ladder
QUERIES = plans.queries_per_chunk("gpu")  # what an accelerator's Refiner uses


def _lowers(program: plans.Program) -> None:
  exported = export_program(program, PLATFORMS)  # PortabilityError names the program
  assert exported.platforms == PLATFORMS
  assert portability_problems(exported.mlir_module()) == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_programs_lower(dtype):
  names = set()
  for scale in SCALES:
    for batch in (1, 2):
      program = plans.fused_program(TINY, BUCKET, scale, max(SCALES), batch, QUERIES, dtype)
      assert program.fn is plans._fused_scale  # the function refine_fused calls
      _lowers(program)
      names.add(program.name)
  assert len(names) == 2 * len(SCALES)


@pytest.mark.parametrize("dtype", DTYPES)
def test_refine_batch_programs_lower(dtype, monkeypatch):
  """The programs that ``Refiner.refine_batch`` asks the fused plan for lower.

  ``plans.fused_program`` is wrapped to record each program and stand in for it (zeros of its
  output shapes), so the Refiner's whole path runs without compiling for the CPU.
  """
  seen = {}

  def recording(*args, **kwargs):
    program = fused_program(*args, **kwargs)
    seen[program.name] = program
    out = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                 program.fn.eval_shape(*program.args, **program.kwargs))
    return lambda variables, image, seg, geo: out

  fused_program = plans.fused_program
  monkeypatch.setattr(plans, "fused_program", recording)
  variables = jax.tree_util.tree_map(lambda a: np.full(a.shape, 0.01, a.dtype),
                                     plans.abstract_variables(TINY))
  refiner = Refiner(TINY, variables, plan="fused", dtype=dtype, batch_ladder=(1, 2),
                    query_chunk=QUERIES, compilation_cache=False)  # an accelerator's chunk
  rng = np.random.default_rng(0)
  sizes = [(40, 34), (38, 36), (41, 35)]  # one bucket: a batch of 2, then of 1
  assert len({refiner.bucket_of(s) for s in sizes}) == 1
  images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
  masks = [np.full(s, 255, np.uint8) for s in sizes]
  out = refiner.refine_batch(images, masks, (0.5, 1.0))
  assert [o.shape for o in out] == sizes
  assert sorted((p.args[1].shape[0], p.kwargs["rows_per_chunk"]) for p in seen.values()) == [
      (1, 112), (1, 112), (2, 112), (2, 112)]  # batches of 2 and 1, the whole bucket per chunk
  for program in seen.values():
    assert program.fn is plans._fused_scale and dtype in program.name
    _lowers(program)


@pytest.mark.parametrize("dtype", DTYPES)
def test_banded_programs_lower(dtype):
  seen = set()
  for scale in SCALES:
    for program in plans.banded_programs(TINY, BUCKET, scale, max(SCALES), QUERIES, dtype):
      _lowers(program)
      seen.add(program.fn.__name__)
  assert seen == {"_banded_stem", "_block_band", "_block_whole", "_branch", "_head_band",
                  "_banded_queries"}


def _replicated(tree, n: int):
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((n, *np.shape(a)), a.dtype), tree)


@pytest.mark.parametrize("compute_dtype", DTYPES)
def test_train_step_lowers(compute_dtype):
  """The pmapped, guarded train step of ``training.step.build`` (two devices) lowers."""
  from crm_jax.training import step as step_lib
  from tests.train_config import small_test_config

  n = 2
  assert jax.local_device_count() >= n  # tests/conftest.py gives four CPU devices
  config = small_test_config(compute_dtype=compute_dtype)
  trainer = step_lib.build(config)
  state = step_lib.create_train_state(config, jax.random.PRNGKey(0))
  b, s = config.batch_size // n, config.crop_size
  f32 = jnp.float32
  batch = {"image": jax.ShapeDtypeStruct((n, b, s, s, 3), f32),
           "seg": jax.ShapeDtypeStruct((n, b, s, s, 1), f32),
           "gt": jax.ShapeDtypeStruct((n, b, s, s, 1), f32)}
  rng = jax.random.PRNGKey(1)
  program = plans.Program(f"train step (pmap over {n} devices, compute {compute_dtype})",
                          jax.jit(trainer.p_step),
                          (_replicated(state, n), _replicated(step_lib.Guard.clear(), n), batch,
                           jax.ShapeDtypeStruct(rng.shape, rng.dtype)), {})
  _lowers(program)


# ---------------------------------------------------------------------------------------------
# The checker itself: each construct fails with the program's name.


def _toy(name, fn, *args):
  return plans.Program(name, jax.jit(fn), args, {})


def test_planted_constructs_fail_with_the_program_name():
  x = jax.ShapeDtypeStruct((8,), jnp.float32)

  def callback(v):
    jax.debug.callback(lambda a: None, v)
    return v + 1

  def float64(v):
    return v * jnp.asarray(0.5, jnp.float64)

  def host_round_trip(v):
    return jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct(v.shape, v.dtype), v)

  _lowers(_toy("toy clean program", lambda v: v * 2, x))
  for name, fn in [("toy with jax.debug.callback", callback),
                   ("toy with jax.pure_callback", host_round_trip),
                   ("toy with a float64 constant", float64)]:
    with pytest.raises(PortabilityError, match=f"^{name}: "):
      _lowers(_toy(name, fn, x))
  with jax.enable_x64(True):  # float64 that JAX does not truncate
    with pytest.raises(PortabilityError, match="^toy in float64: .*float64"):
      _lowers(_toy("toy in float64", lambda v: v * 2, jax.ShapeDtypeStruct((8,), jnp.float64)))
  n = jax.export.symbolic_shape("n")
  with pytest.raises(PortabilityError, match="^toy with a dynamic shape: .*dynamic shapes"):
    _lowers(_toy("toy with a dynamic shape", lambda v: v * 2,
                 jax.ShapeDtypeStruct(n, jnp.float32)))
  assert portability_problems('stablehlo.custom_call @lapack_sgetrf_ffi(%0)') == [
      "platform-specific custom call lapack_sgetrf_ffi"]


# ---------------------------------------------------------------------------------------------
# The fused plan's memory estimate against XLA's figure.

# plans.fused_peak_bytes may exceed XLA's figure by at most this factor (and never fall below).
PEAK_MARGIN = 2.5


def _xla_bytes(config, bucket, scale, batch, dtype, queries) -> int:
  """XLA's memory figure of one compiled fused program: temporaries, arguments, outputs."""
  program = plans.fused_program(config, bucket, scale, 1.0, batch, queries, dtype)
  m = program.lower().compile().memory_analysis()
  return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def _check_peak(config, bucket, batch, dtype, scales=SCALES, queries=QUERIES):
  xla = max(_xla_bytes(config, bucket, s, batch, dtype, queries) for s in scales)
  est = plans.fused_peak_bytes(config, bucket, max(scales), batch, jnp.dtype(dtype).itemsize,
                               queries)
  assert xla <= est <= PEAK_MARGIN * xla, (config, bucket, batch, dtype, est / xla)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_peak_bytes_holds_xla_memory_small(dtype):
  """``fused_peak_bytes`` >= XLA's memory figure (max over the scales) and within
  ``PEAK_MARGIN`` of it: SMALL network, one 2048x1536-sized bucket at its two extreme scales.

  XLA's figure here is the CPU compiler's (``Compiled.memory_analysis``: temporaries, arguments
  and outputs); a GPU's compiler fuses and lays out differently and adds convolution
  workspace, so the figure on a GPU may differ: benchmarks/device_check.py prints both.
  """
  _check_peak(SMALL, bucket_shape((1536 + 64, 2048 + 64)), 1, dtype, scales=(0.125, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("size", [(1536, 2048), (2160, 3840), (4000, 6000)],
                         ids=["2048x1536", "3840x2160", "6000x4000"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_peak_bytes_holds_xla_memory_resnet50(size, dtype):
  """As above for the published network at every scale (compiles, 8 programs a case; slow)."""
  bucket = bucket_shape((size[0] + 64, size[1] + 64))
  _check_peak(RESNET50, bucket, 1, dtype)
  if size == (1536, 2048):
    _check_peak(RESNET50, bucket, 2, dtype, scales=(1.0,))


@pytest.mark.slow
def test_roofline_and_device_check_run_without_training_packages(tmp_path):
  """benchmarks/roofline.py writes its JSON and benchmarks/device_check.py reads it, with the
  training-only packages made unimportable (a bare accelerator image lacks them)."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  table = str(tmp_path / "roofline.json")
  code = f"""
import runpy, sys
for m in ("grain", "tensorflow_datasets", "ml_collections", "tensorboardX", "tensorflow", "torch"):
  sys.modules[m] = None
roofline = ["--config", "tiny", "--sizes", "96x80", "--plans", "fused", "--dtypes", "float32",
            "--scales", "0.5", "1.0", "--measure-sizes", "--json", {table!r}]
check = [{table!r}, "--peak", "H100 SXM", "--repeats", "1"]
for script, args in [("roofline.py", roofline), ("device_check.py", check)]:
  sys.argv = [script] + args
  try:
    runpy.run_path("benchmarks/" + script, run_name="__main__")
  except SystemExit as e:
    assert not e.code, (script, e.code)
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                        timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| fused | 96x80 | float32 |" in proc.stdout
  rows = [l for l in proc.stdout.splitlines() if l.startswith("| fused 160x160 scale")]
  assert len(rows) == 2 and all(l.count("x |") >= 1 for l in rows), proc.stdout[-2000:]
  assert "Refiner.refine, plan fused:" in proc.stdout
