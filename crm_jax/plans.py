"""Execution plans of the multi-scale loop: ``plain``, ``banded``, ``fused`` (docs/refinement.md),
and their compiled programs as ``Program``s (``fused_program``, ``banded_programs``)."""

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax import checkpoint as ckpt
from crm_jax.constants import EMPTY_SEG_SUM
from crm_jax.geometry import (NUM_LEVELS, ScaleGeometry, bands, batch_size_rung, bucket_shape,
                              scale_geometry, scaled_size)
from crm_jax.models.crm import CRM, ModelConfig
from crm_jax.models.encoder import LEVEL_INPUT, LEVEL_X1, LEVEL_X2, LEVEL_X3, Bottleneck, Encoder
from crm_jax.models.fusion import Fusion
from crm_jax.models.implicit_decoder import ImplicitDecoder
from crm_jax.ops import mask_valid, resize_bilinear_align_corners, resize_cols, resize_rows
from crm_jax.preprocess import prob_to_seg

PLANS = ("plain", "banded", "fused")
BATCH_LADDER = (1, 2, 4, 8)  # Batch sizes the fused plan compiles for; a group is padded up.
QUERIES_PER_CHUNK = {"cpu": 1 << 13, "default": 1 << 20}  # Per decoder chunk (CPU: its caches).
BAND_ELEMENTS = 1 << 25  # Elements of the widest tensor of one band (banded plan).


def queries_per_chunk(platform: str) -> int:
  return QUERIES_PER_CHUNK.get(platform, QUERIES_PER_CHUNK["default"])


def rows_per_chunk(shape: Tuple[int, int], queries: int) -> int:
  """Whole rows of a ``(rows, cols)`` query grid per chunk of about ``queries``."""
  return max(1, min(shape[0], queries // shape[1]))


def compilations_per_bucket(config: ModelConfig, num_scales: int, plan: str = "banded") -> int:
  """The most compilations one bucket costs (per batch rung for ``fused``; docs/refinement.md)."""
  if plan not in ("banded", "fused"):
    raise ValueError(f"plan {plan!r} has no buckets")
  kinds = {spec.kind() for spec in config.encoder_blocks()}
  return num_scales if plan == "fused" else num_scales * (1 + len(kinds) + 2 + 1) + 1


def sub_variables(variables, key: str):
  """``{'params': ..., 'batch_stats': ...}`` of the submodule ``key``."""
  return {c: variables[c][key] for c in ("params", "batch_stats")
          if variables.get(c) is not None and variables[c].get(key) is not None}


def _valid(row0, size):
  """``ops.mask_valid``'s int32 ``(row0, h, w)`` for a band from ``row0`` of true ``size``."""
  return jnp.stack([jnp.asarray(v, jnp.int32) for v in (row0, size[0], size[1])])


def _network_input(image, seg, geo, dtype):
  """Image ``[Hb, Wb, 3]``, seg ``[Hb, Wb]`` -> (x ``[1, hs, ws, 4]`` in ``dtype``, 0 outside the
  true size; seg empty; every level's ``_valid`` region)."""
  sizes, input_tables = geo["sizes"], geo["input_tables"]
  x = jnp.concatenate([image, seg[:, :, None]], axis=-1)[None]
  x = mask_valid(resize_cols(resize_rows(x, input_tables[0]), input_tables[1]),
                 _valid(0, sizes[LEVEL_INPUT]))
  inside = ((jnp.arange(x.shape[1]) < sizes[LEVEL_INPUT][0])[:, None]
            & (jnp.arange(x.shape[2]) < sizes[LEVEL_INPUT][1])[None, :])
  empty = jnp.sum(jnp.where(inside, x[0, :, :, 3] + 1, 0)) < EMPTY_SEG_SUM
  return x.astype(dtype), empty, {level: _valid(0, sizes[level])
                                  for level in range(LEVEL_INPUT, NUM_LEVELS)}


def _query_rows(config: ModelConfig, dec_vars, projected, geo, rows_per_chunk: int):
  """prob ``[Hb, Wb]`` float32 from F ``[h, w, D]`` and ``query_arrays()``, valid rows."""
  qy, iy, rel_y = geo["y_axis"]
  big_hb, big_wb, num_rows = qy.shape[0], geo["x_axis"][0].shape[0], geo["sizes"][0][0]
  decoder = ImplicitDecoder(config.feature_dim, tuple(config.decoder_hidden))
  out = jnp.zeros((-(-big_hb // rows_per_chunk) * rows_per_chunk, big_wb), jnp.float32)
  def body(i, out):
    rows = jnp.minimum(i * rows_per_chunk + jnp.arange(rows_per_chunk, dtype=jnp.int32),
                       num_rows - 1)
    logits = decoder.apply(dec_vars, projected, (qy[rows], iy[:, rows], rel_y[:, rows]),
                           geo["x_axis"], (geo["rel_cell"][0], geo["rel_cell"][1]),
                           method=ImplicitDecoder.decode_axes)
    return jax.lax.dynamic_update_slice(out, jax.nn.sigmoid(logits), (i * rows_per_chunk, 0))
  n_chunks = (num_rows + rows_per_chunk - 1) // rows_per_chunk
  return jax.lax.fori_loop(0, n_chunks, body, out)[:big_hb]


@functools.partial(jax.jit, static_argnames=("model", "size"))
def _plain_features(model: CRM, variables, image, seg, size):
  """(F ``[h, w, D]``, seg empty) of image ``[H, W, 3]``, seg ``[H, W]`` at ``size``."""
  img = resize_bilinear_align_corners(image[None], size)
  s = resize_bilinear_align_corners(seg[None, :, :, None], size)
  feature_map = model.apply(variables, jnp.concatenate([img, s], axis=-1), method=CRM.features)
  projected = model.apply(variables, feature_map, method=CRM.project)
  return projected[0], jnp.sum(s + 1) < EMPTY_SEG_SUM


@functools.partial(jax.jit, static_argnames=("model", "target_size", "rows_per_chunk"))
def _plain_queries(model: CRM, variables, projected, target_size, rows_per_chunk):
  """Probabilities ``[H, W]`` float32 at every pixel centre of ``target_size``."""
  big_h, big_w = target_size
  n_chunks = -(-big_h // rows_per_chunk)
  rows = jnp.minimum(jnp.arange(n_chunks * rows_per_chunk, dtype=jnp.int32),
                     big_h - 1).reshape(n_chunks, rows_per_chunk)
  decode = lambda r: model.apply(variables, projected, r, target_size, method=CRM.decode_grid)
  logits = jax.lax.map(decode, rows).reshape(-1, big_w)[:big_h]
  return jax.nn.sigmoid(logits.astype(jnp.float32))


def refine_plain(config: ModelConfig, variables, image_p: np.ndarray, seg_p: np.ndarray,
                 scales: Sequence[float], queries: int) -> Dict[float, np.ndarray]:
  """The plain loop on one padded, normalised pair ``[H, W, 3]``/``[H, W]``: ``{s: prob}``."""
  model, image, seg = CRM(config), jnp.asarray(image_p), jnp.asarray(seg_p)
  target, probs = image_p.shape[:2], {}
  for s in scales:
    projected, empty = _plain_features(model, variables, image, seg, scaled_size(target, s))
    prob = (jnp.zeros(target, jnp.float32) if bool(empty)
            else _plain_queries(model, variables, projected, target,
                                rows_per_chunk(target, queries)))
    probs[s], seg = prob, prob_to_seg(prob)
  return {s: np.asarray(p) for s, p in probs.items()}


@functools.partial(jax.jit, static_argnames=("config",))
def _banded_stem(config: ModelConfig, stem_vars, image, seg, geo):
  """Input resize, conv1/bn1/ReLU and the max-pool: ``(x1, pooled, empty)``."""
  x, empty, valid = _network_input(image, seg, geo, stem_vars["params"]["conv1"]["kernel"].dtype)
  encoder = Encoder(config.stem_width, config.encoder_blocks())
  x1, pooled = encoder.apply(stem_vars, x, valid=valid, method=Encoder.stem)
  return x1, pooled, empty


@functools.partial(jax.jit, static_argnames=("kind", "slab", "band"), donate_argnames=("out",))
def _block_band(kind, block_vars, out, x, start, r0, size, slab, band):
  """``out`` with rows ``[r0, r0 + band)`` of block ``kind`` on ``x``'s slab at ``start``."""
  y = Bottleneck(*kind).apply(block_vars, jax.lax.dynamic_slice_in_dim(x, start, slab, axis=1),
                              valid=_valid(start, size))
  y = jax.lax.dynamic_slice_in_dim(y, r0 - start, band, axis=1)
  return jax.lax.dynamic_update_slice_in_dim(out, y, r0, axis=1)


@functools.partial(jax.jit, static_argnames=("kind",))
def _block_whole(kind, block_vars, x, size):
  """A (stride-2) bottleneck on the whole map, input true size ``size``."""
  return Bottleneck(*kind).apply(block_vars, x, valid=_valid(0, size))


@functools.partial(jax.jit, static_argnames=("config", "key"))
def _branch(config: ModelConfig, key: str, fusion_vars, x):
  """A fusion branch (pointwise) on the whole map."""
  return Fusion(tuple(config.fusion_widths), config.feature_dim).apply(
      fusion_vars, key, x, method=Fusion.branch)


@functools.partial(jax.jit, static_argnames=("config", "slab", "band"), donate_argnames=("out",))
def _head_band(config: ModelConfig, fusion_vars, dec_vars, out, x1, b, c, tables, start, r0,
               x1_size, slab, band):
  """Rows ``[r0, r0 + band)`` of ``project(F)`` into ``out``, fused on x1's slab from ``start``."""
  fusion = Fusion(tuple(config.fusion_widths), config.feature_dim)
  a = fusion.apply(fusion_vars, "x1", jax.lax.dynamic_slice_in_dim(x1, start, slab, axis=1),
                   method=Fusion.branch)
  cut = lambda t: jax.lax.dynamic_slice_in_dim(jnp.asarray(t), start, slab)
  slab_tables = tuple((tuple(cut(t) for t in rows), cols) for rows, cols in tables)
  f = fusion.apply(fusion_vars, [a, b, c], tables=slab_tables, valid=_valid(start, x1_size),
                   method=Fusion.fuse)
  f = jax.lax.dynamic_slice_in_dim(f, r0 - start, band, axis=1)
  decoder = ImplicitDecoder(config.feature_dim, tuple(config.decoder_hidden))
  y = decoder.apply(dec_vars, f, method=ImplicitDecoder.project)
  return jax.lax.dynamic_update_slice(out, y, (0, r0, 0, 0))


@functools.partial(jax.jit, static_argnames=("config", "rows_per_chunk"))
def _banded_queries(config: ModelConfig, dec_vars, projected, geo, rows_per_chunk):
  """``(prob [Hb, Wb], next seg [Hb, Wb])`` from the projected F buffer ``[1, hq, wq, D]``."""
  prob = _query_rows(config, dec_vars, projected[0], geo, rows_per_chunk)
  return prob, prob_to_seg(prob)


class _Runner:
  """Runs ``_banded_scale``'s pieces, or (``record``) records them as ``Program``s."""

  def __init__(self, profile: Optional[Dict[str, float]] = None, record: bool = False):
    self.profile, self.start = profile, time.perf_counter()
    self.programs: Optional[Dict[tuple, Program]] = {} if record else None

  def call(self, fn, *args, **kwargs):
    if self.programs is None:
      return fn(*args, **kwargs)
    args = _abstract(args)
    key = (fn.__name__, repr(args), repr(sorted(kwargs.items())))
    if key not in self.programs:
      statics = [str(a) for a in args if isinstance(a, str) or (
          isinstance(a, tuple) and all(isinstance(v, (bool, int)) for v in a))]
      name = " ".join(["banded", fn.__name__.lstrip("_")] + statics)
      self.programs[key] = Program(name, fn, args, dict(kwargs), calls=0)
    self.programs[key] = dataclasses.replace(self.programs[key], calls=self.programs[key].calls + 1)
    return fn.eval_shape(*args, **kwargs)

  def zeros(self, shape, dtype):  # Eager: device_put, no compilation.
    return (jax.device_put(np.zeros(shape, dtype)) if self.programs is None
            else jax.ShapeDtypeStruct(tuple(shape), dtype))

  def time(self, stage: str, value):
    if self.profile is not None:
      value, now = jax.block_until_ready(value), time.perf_counter()
      self.profile[stage] = self.profile.get(stage, 0.0) + now - self.start
      self.start = now
    return value


def _banded_scale(config: ModelConfig, variables, image, seg, g: ScaleGeometry,
                  band_elements: int, queries: int, run: _Runner):
  """Image ``[Hb, Wb, 3]``, seg ``[Hb, Wb]`` -> (prob, next seg) ``[Hb, Wb]`` at one scale."""
  geo, sizes = g.arrays(), g.sizes
  enc, fusion_vars = sub_variables(variables, "encoder"), sub_variables(variables, "fusion")
  stem_vars = {c: {k: enc[c][k] for k in ("conv1", "bn1") if k in enc[c]} for c in enc}
  x1, y, empty = run.time("stem", run.call(_banded_stem, config, stem_vars, image, seg, geo))
  def in_bands(fn, lead, out, data, size, halo, width):  # fn(*lead, out, *data, start, r0, size)
    slab, band, spans = bands(data[0].shape[1], int(size[0]), halo,
                              max(1, band_elements // (data[0].shape[2] * width)))
    for start, r0 in spans:
      out = run.call(fn, *lead, out, *data, np.int32(start), np.int32(r0), size, slab=slab,
                     band=band)
    return out
  b = None
  for spec in config.encoder_blocks():
    block_vars, size = sub_variables(enc, spec.name), sizes[spec.in_level]
    if spec.stride != 1:
      y = jax.block_until_ready(run.call(_block_whole, spec.kind(), block_vars, y, size))
    else:  # Wait before the next block allocates (else every stage's maps at once).
      width = spec.width * spec.expansion
      y = jax.block_until_ready(in_bands(_block_band, (spec.kind(), block_vars), run.zeros(
          (1, *y.shape[1:3], width), x1.dtype), (y,), size, spec.dilation, width))
    run.time(f"layer{spec.stage}", y)
    if spec.stage == 1 and spec.last_of_stage:
      b = run.call(_branch, config, "x2", fusion_vars, y)
  c = run.time("branches", run.call(_branch, config, "x3", fusion_vars, y))
  del y
  dec_vars = sub_variables(variables, "implicit_decoder")
  projected = run.time("fusion head", in_bands(
      _head_band, (config, fusion_vars, dec_vars),
      run.zeros((1, *g.query_shape, config.decoder_hidden[0]), x1.dtype),
      (x1, b, c, geo["fusion_tables"]), sizes[LEVEL_X1], 1, config.feature_dim))
  del x1, b, c  # Before the queries allocate.
  if run.programs is None and bool(empty):
    prob = np.zeros(g.bucket, np.float32)
    return prob, jax.device_put(prob_to_seg(prob))
  return run.call(_banded_queries, config, dec_vars, projected, g.query_arrays(),
                  rows_per_chunk(g.bucket, queries))


def refine_banded(config: ModelConfig, variables, image_p: np.ndarray, seg_p: np.ndarray,
                  scales: Sequence[float], queries: int, bucket_steps: int,
                  band_elements: int = BAND_ELEMENTS,
                  profile: Optional[Dict[str, float]] = None) -> Dict[float, np.ndarray]:
  """Padded pair ``[H, W, 3]``/``[H, W]`` -> ``{s: prob [H, W]}``; stage seconds to ``profile``."""
  run = _Runner(profile)
  target = image_p.shape[:2]
  bucket = bucket_shape(target, bucket_steps)
  image, seg = _bucketed(image_p, seg_p, bucket)
  out = {}
  for s in scales:
    g = scale_geometry(target, s, max(scales), bucket=bucket)
    prob, seg = _banded_scale(config, variables, image, seg, g, band_elements, queries, run)
    prob = run.time("queries", jax.block_until_ready(prob))
    out[s] = np.array(np.asarray(prob)[:target[0], :target[1]])
  return out


def _bucketed(image_p: np.ndarray, seg_p: np.ndarray, bucket) -> Tuple[np.ndarray, np.ndarray]:
  """The padded pair at the top-left of zero bucket-shaped arrays."""
  h, w = image_p.shape[:2]
  image, seg = np.zeros((*bucket, 3), np.float32), np.zeros(bucket, np.float32)
  image[:h, :w], seg[:h, :w] = image_p, seg_p
  return image, seg


@functools.partial(jax.jit, static_argnames=("config", "rows_per_chunk"),
                   donate_argnames=("seg",))
def _fused_scale(variables, image, seg, geo, *, config: ModelConfig, rows_per_chunk: int):
  """Batch ``[N, Hb, Wb, 3]``/``[N, Hb, Wb]`` at one scale -> (prob, next seg) ``[N, Hb, Wb]``."""
  model, dtype = CRM(config), variables["params"]["encoder"]["conv1"]["kernel"].dtype
  def one(image, seg, geo):
    x, empty, valid = _network_input(image, seg, geo, dtype)
    f = model.apply(variables, x, valid=valid, tables=geo["fusion_tables"], method=CRM.features)
    projected = model.apply(variables, f, method=CRM.project)[0]
    prob = _query_rows(config, sub_variables(variables, "implicit_decoder"), projected, geo,
                       rows_per_chunk)
    prob = jnp.where(empty, jnp.zeros_like(prob), prob)
    return prob, prob_to_seg(prob)
  return jax.vmap(one)(image, seg, geo)


def refine_fused(config: ModelConfig, variables, images_p: Sequence[np.ndarray],
                 segs_p: Sequence[np.ndarray], scales: Sequence[float], queries: int,
                 bucket_steps: int, batch_ladder: Sequence[int] = BATCH_LADDER,
                 program: Optional[Callable] = None) -> List[Dict[float, np.ndarray]]:
  """Padded pairs of ONE bucket -> ``[{s: prob [H, W]}]``; ``program``: like ``fused_program``."""
  program = program or fused_program
  targets = [im.shape[:2] for im in images_p]
  bucket = bucket_shape(targets[0], bucket_steps)
  if any(bucket_shape(t, bucket_steps) != bucket for t in targets):
    raise ValueError("refine_fused takes pairs of one bucket")
  results: List[Dict[float, np.ndarray]] = []
  step = max(batch_ladder)
  for first in range(0, len(images_p), step):
    idx = list(range(first, min(first + step, len(images_p))))
    n = batch_size_rung(len(idx), batch_ladder)
    idx_padded = idx + [idx[0]] * (n - len(idx))
    pairs = [_bucketed(images_p[i], segs_p[i], bucket) for i in idx_padded]
    image, seg = (jax.device_put(np.stack(arrays)) for arrays in zip(*pairs))
    probs = {}
    for s in scales:
      geo = jax.tree_util.tree_map(lambda *a: np.stack(a), *[
          scale_geometry(targets[i], s, max(scales), bucket=bucket).arrays() for i in idx_padded])
      run = program(config, bucket, s, max(scales), n, queries, variables=variables)
      probs[s], seg = run(variables, image, seg, geo)
    host = {s: np.asarray(p) for s, p in probs.items()}
    results += [{s: np.array(host[s][k, :targets[i][0], :targets[i][1]]) for s in scales}
                for k, i in enumerate(idx)]
  return results


@dataclasses.dataclass(frozen=True)
class Program:
  """A plan's jitted ``fn`` with abstract ``args``, static ``kwargs``, ``calls`` per image."""

  name: str
  fn: Any
  args: tuple
  kwargs: Dict[str, Any]
  calls: int = 1

  def __call__(self, *args):
    return self.fn(*args, **self.kwargs)

  def lower(self, platforms: Optional[Sequence[str]] = None):  # None: the default backend
    return self.fn.trace(*self.args, **self.kwargs).lower(
        lowering_platforms=None if platforms is None else tuple(platforms))

  def export(self, platforms: Sequence[str]):
    return jax.export.export(self.fn, platforms=tuple(platforms))(*self.args, **self.kwargs)


def _abstract(tree):
  """Arrays (NumPy, JAX, abstract) as ``jax.ShapeDtypeStruct``; other leaves kept."""
  arrays = (np.ndarray, np.generic, jax.Array, jax.ShapeDtypeStruct)
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype) if isinstance(a, arrays) else a, tree)


_abstract_float32_variables = functools.lru_cache(maxsize=16)(ckpt.abstract_variables)


def abstract_variables(config: ModelConfig, dtype="float32"):
  """Shapes of ``CRM(config)``'s variables, every leaf in ``dtype``, without computing."""
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype)),
                                _abstract_float32_variables(config))


def _abstract_inputs(config: ModelConfig, bucket, dtype, variables):
  """``(bucket, abstract variables, their dtype's name)`` of a plan's programs."""
  variables = _abstract(abstract_variables(config, dtype) if variables is None else variables)
  dtype_name = jnp.dtype(variables["params"]["encoder"]["conv1"]["kernel"].dtype).name
  return tuple(bucket), variables, dtype_name


def fused_program(config: ModelConfig, bucket: Tuple[int, int], scale: float, max_scale: float,
                  batch: int, queries: int, dtype="float32", variables=None) -> Program:
  """The fused ``Program`` ``(variables, image [N, Hb, Wb, 3], seg [N, Hb, Wb], geo)``."""
  bucket, variables, dtype_name = _abstract_inputs(config, bucket, dtype, variables)
  geo = scale_geometry(bucket, scale, max_scale, bucket=bucket).arrays()
  batched = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct((batch, *shape), dtype)
  args = (variables, batched((*bucket, 3)), batched(bucket),
          jax.tree_util.tree_map(lambda a: batched(np.shape(a), a.dtype), geo))
  return Program(f"fused {bucket[1]}x{bucket[0]} scale {scale} batch {batch} {dtype_name}",
                 _fused_scale, args,
                 {"config": config, "rows_per_chunk": rows_per_chunk(bucket, queries)})


def banded_programs(config: ModelConfig, bucket: Tuple[int, int], scale: float,
                    max_scale: float, queries: int, dtype="float32", variables=None,
                    band_elements: int = BAND_ELEMENTS,
                    target: Optional[Tuple[int, int]] = None) -> List[Program]:
  """The banded plan's programs at one scale, recorded; ``target`` fixes ``calls``."""
  bucket, variables, dtype_name = _abstract_inputs(config, bucket, dtype, variables)
  g = scale_geometry(tuple(target or bucket), scale, max_scale, bucket=bucket)
  image, seg = (jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((*bucket, 3), bucket))
  recorder = _Runner(record=True)
  _banded_scale(config, variables, image, seg, g, band_elements, queries, recorder)
  suffix = f" {bucket[1]}x{bucket[0]} scale {scale} {dtype_name}"
  return [dataclasses.replace(p, name=p.name + suffix) for p in recorder.programs.values()]


def fused_peak_bytes(config: ModelConfig, bucket: Tuple[int, int], max_scale: float,
                     batch: int, dtype_bytes: int, queries: int) -> int:
  """A conservative estimate of one fused batch's peak device bytes (docs/benchmarks.md)."""
  h_in, w_in = scaled_size(bucket, max_scale)
  a1 = -(-h_in // 2) * -(-w_in // 2)
  a2, a3 = -(-a1 // 4), -(-a1 // 16)
  width = lambda level: max(s.width * s.expansion for s in config.encoder_blocks()
                            if s.out_level == level)
  x1_channels = (config.stem_width + 2 * sum(config.fusion_widths) + config.feature_dim
                 + config.decoder_hidden[0])
  network = (a1 * x1_channels + a2 * (3 * width(LEVEL_X2) + config.fusion_widths[1])
             + a3 * (3 * width(LEVEL_X3) + config.fusion_widths[2])) * dtype_bytes
  query_chunk = rows_per_chunk(bucket, queries) * bucket[1] * 4 * max(config.decoder_hidden) * 4 * 2
  io = bucket[0] * bucket[1] * (3 + 1 + 2 * 4) * 4
  return batch * (network + query_chunk + io)


def choose_plan(plan: str, config: ModelConfig, bucket: Tuple[int, int], max_scale: float,
                dtype_bytes: int, queries: int, memory_budget: Optional[int] = None,
                batch: int = 1, platform: Optional[str] = None, device=None) -> str:
  """``plan``; ``auto``: ``fused`` off the CPU if the memory holds it, else ``banded``."""
  if plan != "auto":
    return plan
  if (platform or (device.platform if device is not None else jax.default_backend())) == "cpu":
    return "banded"
  if memory_budget is None:  # The device's free memory, if JAX can tell.
    try:
      stats = (device or jax.devices()[0]).memory_stats() or {}
    except Exception:  # Backends without memory statistics.
      stats = {}
    if "bytes_limit" not in stats:
      return "fused"
    memory_budget = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  peak = fused_peak_bytes(config, bucket, max_scale, batch, dtype_bytes, queries)
  return "fused" if peak <= memory_budget else "banded"
