"""Execution plans of the multi-scale loop: ``plain``, ``banded``, ``fused`` (docs/refinement.md).

The same modules and host-made tables, cut differently into compiled programs; ``fused_program``
and ``banded_programs`` give a plan's programs as ``Program``s."""

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
# Batch sizes the fused plan compiles for; a group is padded to the next rung.
BATCH_LADDER = (1, 2, 4, 8)
# Queries per decoder chunk: the CPU's fit its caches, an accelerator's fill it.
QUERIES_PER_CHUNK = {"cpu": 1 << 13, "default": 1 << 20}
# Elements of the widest tensor of one band (banded plan: bottlenecks, fusion head).
BAND_ELEMENTS = 1 << 25


def queries_per_chunk(platform: str) -> int:
  return QUERIES_PER_CHUNK.get(platform, QUERIES_PER_CHUNK["default"])


def rows_per_chunk(shape: Tuple[int, int], queries: int) -> int:
  """Whole rows of a ``(rows, cols)`` query grid per chunk of about ``queries``."""
  return max(1, min(shape[0], queries // shape[1]))


def compilations_per_bucket(config: ModelConfig, num_scales: int, plan: str = "banded") -> int:
  """The most compilations one bucket costs (per batch rung for ``fused``; docs/refinement.md)."""
  if plan == "fused":
    return num_scales
  if plan != "banded":
    raise ValueError(f"plan {plan!r} has no buckets")
  kinds = {spec.kind() for spec in config.encoder_blocks()}
  return num_scales * (1 + len(kinds) + 2 + 1) + 1


def sub_variables(variables, *path):
  """``{'params': ..., 'batch_stats': ...}`` of one submodule."""
  out = {}
  for collection in ("params", "batch_stats"):
    node = variables.get(collection)
    for key in path:
      node = None if node is None else node.get(key)
    if node is not None:
      out[collection] = node
  return out


def _valid(row0, size):
  """``ops.mask_valid``'s ``(row0, h, w)`` for a band starting at ``row0``."""
  return jnp.stack([jnp.asarray(row0, jnp.int32), jnp.asarray(size[0], jnp.int32),
                    jnp.asarray(size[1], jnp.int32)])


def _level_valid(sizes) -> Dict[int, jax.Array]:
  """Valid regions of every level from the int32 ``[NUM_LEVELS, 2]`` sizes."""
  return {level: _valid(0, sizes[level]) for level in range(LEVEL_INPUT, NUM_LEVELS)}


def _network_input(image, seg, sizes, input_tables, dtype):
  """``image`` ``[Hb, Wb, 3]``, ``seg`` ``[Hb, Wb]`` -> ``([1, hb_s, wb_s, 4] in dtype, empty)``,
  zeroed outside ``sizes[LEVEL_INPUT]``; empty: the published ``sum(seg + 1) < 2``."""
  x = jnp.concatenate([image, seg[:, :, None]], axis=-1)[None]
  x = resize_cols(resize_rows(x, input_tables[0]), input_tables[1])
  x = mask_valid(x, _valid(0, sizes[LEVEL_INPUT]))
  inside = ((jnp.arange(x.shape[1]) < sizes[LEVEL_INPUT][0])[:, None]
            & (jnp.arange(x.shape[2]) < sizes[LEVEL_INPUT][1])[None, :])
  empty = jnp.sum(jnp.where(inside, x[0, :, :, 3] + 1, 0)) < EMPTY_SEG_SUM
  return x.astype(dtype), empty


def _query_rows(config: ModelConfig, dec_vars, projected, geo, rows_per_chunk: int):
  """prob ``[Hb, Wb]`` float32 from ``projected`` ``[h, w, D]`` and ``query_arrays()``, by
  ``rows_per_chunk`` rows (rows past the true height stay 0, columns past it are meaningless)."""
  qy, iy, rel_y = geo["y_axis"]
  big_hb, big_wb = qy.shape[0], geo["x_axis"][0].shape[0]
  num_rows = geo["sizes"][0][0]
  decoder = ImplicitDecoder(config.feature_dim, tuple(config.decoder_hidden))
  n_static = -(-big_hb // rows_per_chunk)
  out = jnp.zeros((n_static * rows_per_chunk, big_wb), jnp.float32)

  def body(i, out):
    rows = jnp.minimum(i * rows_per_chunk + jnp.arange(rows_per_chunk, dtype=jnp.int32),
                       num_rows - 1)
    logits = decoder.apply(dec_vars, projected, (qy[rows], iy[:, rows], rel_y[:, rows]),
                           geo["x_axis"], (geo["rel_cell"][0], geo["rel_cell"][1]),
                           method=ImplicitDecoder.decode_axes)
    return jax.lax.dynamic_update_slice(out, jax.nn.sigmoid(logits), (i * rows_per_chunk, 0))

  n_chunks = (num_rows + rows_per_chunk - 1) // rows_per_chunk
  return jax.lax.fori_loop(0, n_chunks, body, out)[:big_hb]


# plain: the per-shape loop on true shapes.

@functools.partial(jax.jit, static_argnames=("model", "size"))
def _plain_features(model: CRM, variables, image, seg, size):
  """Projected F ``[h, w, D]`` of one scale and whether the resized seg is empty."""
  img = resize_bilinear_align_corners(image[None], size)
  s = resize_bilinear_align_corners(seg[None, :, :, None], size)
  x = jnp.concatenate([img, s], axis=-1)
  feature_map = model.apply(variables, x, method=CRM.features)
  projected = model.apply(variables, feature_map, method=CRM.project)
  return projected[0], jnp.sum(s + 1) < EMPTY_SEG_SUM


@functools.partial(jax.jit, static_argnames=("model", "target_size", "rows_per_chunk"))
def _plain_queries(model: CRM, variables, projected, target_size, rows_per_chunk):
  """Probabilities at every pixel centre of ``target_size``: ``[H, W]``."""
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
  model = CRM(config)
  seg = jnp.asarray(seg_p)
  image = jnp.asarray(image_p)
  target = image_p.shape[:2]
  chunk_rows = rows_per_chunk(target, queries)
  probs = {}
  for s in scales:
    projected, empty = _plain_features(model, variables, image, seg, scaled_size(target, s))
    prob = (jnp.zeros(target, jnp.float32) if bool(empty)
            else _plain_queries(model, variables, projected, target, chunk_rows))
    probs[s], seg = prob, prob_to_seg(prob)
  return {s: np.asarray(p) for s, p in probs.items()}


# banded: bucketed pieces driven from Python, bands of rows.

@functools.partial(jax.jit, static_argnames=("config",))
def _banded_stem(config: ModelConfig, stem_vars, image, seg, geo):
  """Input resize, conv1/bn1/ReLU and the max-pool: ``(x1, pooled, empty)``."""
  dtype = stem_vars["params"]["conv1"]["kernel"].dtype
  x, empty = _network_input(image, seg, geo["sizes"], geo["input_tables"], dtype)
  encoder = Encoder(config.stem_width, config.encoder_blocks())
  x1, pooled = encoder.apply(stem_vars, x, valid=_level_valid(geo["sizes"]), method=Encoder.stem)
  return x1, pooled, empty


@functools.partial(jax.jit, static_argnames=("kind", "slab", "band"), donate_argnames=("out",))
def _block_band(kind, block_vars, out, x, start, r0, size, slab, band):
  """One band of rows of the stride-1 bottleneck ``kind`` on ``x`` (true size ``size``)."""
  module = Bottleneck(*kind)
  y = module.apply(block_vars, jax.lax.dynamic_slice_in_dim(x, start, slab, axis=1),
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


@functools.partial(jax.jit, static_argnames=("config", "slab", "band"),
                   donate_argnames=("out",))
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


class _Timer:
  """Seconds per stage of the banded plan (``profile``); waits for each piece."""

  def __init__(self, profile: Optional[Dict[str, float]]):
    self.profile = profile
    self.start = time.perf_counter()

  def __call__(self, stage: str, value):
    if self.profile is None:
      return value
    value = jax.block_until_ready(value)
    now = time.perf_counter()
    self.profile[stage] = self.profile.get(stage, 0.0) + now - self.start
    self.start = now
    return value


class _Eager:
  """How ``_banded_projected`` runs its pieces: call them, allocate, wait (the plan itself)."""

  @staticmethod
  def call(fn, *args, **kwargs):
    return fn(*args, **kwargs)

  @staticmethod
  def zeros(shape, dtype):  # No compilation.
    return jax.device_put(np.zeros(shape, dtype))

  @staticmethod
  def wait(value):
    return jax.block_until_ready(value)


def _banded_projected(config: ModelConfig, variables, image, seg, g: ScaleGeometry,
                      band_elements: int, timer: _Timer, run=_Eager):
  """Projected F buffer ``[1, hq, wq, D]`` of one scale and whether the seg is empty; ``run``:
  ``_Eager``, or ``banded_programs``'s recorder (abstract values, nothing runs)."""
  geo, sizes = g.arrays(), g.sizes
  enc, fusion_vars = sub_variables(variables, "encoder"), sub_variables(variables, "fusion")
  stem_vars = {c: {k: enc[c][k] for k in ("conv1", "bn1") if k in enc[c]} for c in enc}
  x1, y, empty = timer("stem", run.call(_banded_stem, config, stem_vars, image, seg, geo))
  dtype = x1.dtype
  b = None
  for spec in config.encoder_blocks():
    block_vars = sub_variables(enc, spec.name)
    size = sizes[spec.in_level]
    if spec.stride != 1:
      y = run.wait(run.call(_block_whole, spec.kind(), block_vars, y, size))
    else:
      rows, cols = y.shape[1:3]
      out_dim = spec.width * spec.expansion
      slab, band, spans = bands(rows, int(size[0]), spec.dilation,
                                max(1, band_elements // (cols * out_dim)))
      out = run.zeros((1, rows, cols, out_dim), dtype)
      for start, r0 in spans:
        out = run.call(_block_band, spec.kind(), block_vars, out, y, np.int32(start),
                       np.int32(r0), size, slab=slab, band=band)
      # Wait before the next block allocates (else every stage's maps at once).
      y = run.wait(out)
      del out
    timer(f"layer{spec.stage}", y)
    if spec.stage == 1 and spec.last_of_stage:
      b = run.call(_branch, config, "x2", fusion_vars, y)
  c = timer("branches", run.call(_branch, config, "x3", fusion_vars, y))
  del y
  rows, cols = x1.shape[1:3]
  slab, band, spans = bands(rows, int(sizes[LEVEL_X1][0]), 1,
                            max(1, band_elements // (cols * config.feature_dim)))
  dec_vars = sub_variables(variables, "implicit_decoder")
  projected = run.zeros((1, *g.query_shape, config.decoder_hidden[0]), dtype)
  for start, r0 in spans:
    projected = run.call(_head_band, config, fusion_vars, dec_vars, projected, x1, b, c,
                         geo["fusion_tables"], np.int32(start), np.int32(r0),
                         sizes[LEVEL_X1], slab=slab, band=band)
  return timer("fusion head", projected), empty


def refine_banded(config: ModelConfig, variables, image_p: np.ndarray, seg_p: np.ndarray,
                  scales: Sequence[float], queries: int, bucket_steps: int,
                  band_elements: int = BAND_ELEMENTS,
                  profile: Optional[Dict[str, float]] = None) -> Dict[float, np.ndarray]:
  """The banded plan on one padded pair: ``{s: prob [H, W]}``; ``profile``: a dict that
  receives each stage's seconds, waiting for every piece (slower)."""
  timer = _Timer(profile)
  target = image_p.shape[:2]
  bucket = bucket_shape(target, bucket_steps)
  image, seg = _bucketed(image_p, seg_p, bucket)
  chunk_rows = rows_per_chunk(bucket, queries)
  dec_vars = sub_variables(variables, "implicit_decoder")
  out = {}
  for s in scales:
    g = scale_geometry(target, s, max(scales), bucket=bucket)
    projected, empty = _banded_projected(config, variables, image, seg, g, band_elements, timer)
    if bool(empty):
      prob = np.zeros(bucket, np.float32)
      seg = jax.device_put(prob_to_seg(prob))
    else:
      prob, seg = _banded_queries(config, dec_vars, projected, g.query_arrays(), chunk_rows)
    del projected
    prob = timer("queries", jax.block_until_ready(prob))
    out[s] = np.array(np.asarray(prob)[:target[0], :target[1]])
  return out


def _bucketed(image_p: np.ndarray, seg_p: np.ndarray, bucket) -> Tuple[np.ndarray, np.ndarray]:
  """The padded pair at the top-left of zero bucket-shaped arrays."""
  h, w = image_p.shape[:2]
  image, seg = np.zeros((*bucket, 3), np.float32), np.zeros(bucket, np.float32)
  image[:h, :w], seg[:h, :w] = image_p, seg_p
  return image, seg


# fused: one program per bucket and scale, batched.

def _fused_one(config: ModelConfig, variables, image, seg, geo, rows_per_chunk: int):
  """``(prob, next seg)`` of ``image`` ``[Hb, Wb, 3]``, ``seg`` ``[Hb, Wb]``; empty seg: prob 0."""
  dtype = variables["params"]["encoder"]["conv1"]["kernel"].dtype
  x, empty = _network_input(image, seg, geo["sizes"], geo["input_tables"], dtype)
  model = CRM(config)
  f = model.apply(variables, x, valid=_level_valid(geo["sizes"]), tables=geo["fusion_tables"],
                  method=CRM.features)
  projected = model.apply(variables, f, method=CRM.project)[0]
  prob = _query_rows(config, sub_variables(variables, "implicit_decoder"), projected, geo,
                     rows_per_chunk)
  prob = jnp.where(empty, jnp.zeros_like(prob), prob)
  return prob, prob_to_seg(prob)


@functools.partial(jax.jit, static_argnames=("config", "rows_per_chunk"),
                   donate_argnames=("seg",))
def _fused_scale(variables, image, seg, geo, *, config: ModelConfig, rows_per_chunk: int):
  """A batch ``[N, Hb, Wb, 3]``/``[N, Hb, Wb]`` at one scale: ``(prob, next seg)``."""
  one = functools.partial(_fused_one, config, variables, rows_per_chunk=rows_per_chunk)
  return jax.vmap(one)(image, seg, geo)


def refine_fused(config: ModelConfig, variables, images_p: Sequence[np.ndarray],
                 segs_p: Sequence[np.ndarray], scales: Sequence[float], queries: int,
                 bucket_steps: int, batch_ladder: Sequence[int] = BATCH_LADDER,
                 program: Optional[Callable] = None) -> List[Dict[float, np.ndarray]]:
  """The fused plan on padded pairs of ONE bucket, one ``{s: prob [H, W]}`` each; ``program``:
  ``fused_program`` or one of its signature (``ExportedFused.program``)."""
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
      geos = [scale_geometry(targets[i], s, max(scales), bucket=bucket).arrays()
              for i in idx_padded]
      geo = jax.tree_util.tree_map(lambda *a: np.stack(a), *geos)
      run = program(config, bucket, s, max(scales), n, queries, variables=variables)
      probs[s], seg = run(variables, image, seg, geo)
    host = {s: np.asarray(p) for s, p in probs.items()}
    for k, i in enumerate(idx):
      h, w = targets[i]
      results.append({s: np.array(host[s][k, :h, :w]) for s in scales})
  return results


# Programs: the jitted functions a plan runs, with their arguments.

@dataclasses.dataclass(frozen=True)
class Program:
  """One program of a plan: the very ``jax.jit`` object ``fn``, its abstract ``args`` and static
  ``kwargs``; ``calls``: runs per image at this scale. ``lower``/``export`` need no device."""

  name: str
  fn: Any
  args: tuple
  kwargs: Dict[str, Any]
  calls: int = 1

  def __call__(self, *args):
    return self.fn(*args, **self.kwargs)

  def trace(self):
    return self.fn.trace(*self.args, **self.kwargs)

  def lower(self, platforms: Optional[Sequence[str]] = None):  # None: the default backend
    return self.trace().lower(lowering_platforms=None if platforms is None else tuple(platforms))

  def export(self, platforms: Sequence[str]):
    return jax.export.export(self.fn, platforms=tuple(platforms))(*self.args, **self.kwargs)


def _abstract(tree):
  """Arrays (NumPy, JAX, abstract) as ``jax.ShapeDtypeStruct``; other leaves kept."""
  def leaf(a):
    if isinstance(a, (np.ndarray, np.generic, jax.Array, jax.ShapeDtypeStruct)):
      return jax.ShapeDtypeStruct(np.shape(a), a.dtype)
    return a
  return jax.tree_util.tree_map(leaf, tree)


_abstract_float32_variables = functools.lru_cache(maxsize=16)(ckpt.abstract_variables)


def abstract_variables(config: ModelConfig, dtype="float32"):
  """Shapes of ``CRM(config)``'s variables, every leaf in ``dtype``, without computing."""
  dtype = jnp.dtype(dtype)
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype),
                                _abstract_float32_variables(config))


def _dtype_name(variables) -> str:
  return jnp.dtype(variables["params"]["encoder"]["conv1"]["kernel"].dtype).name


def fused_program(config: ModelConfig, bucket: Tuple[int, int], scale: float, max_scale: float,
                  batch: int, queries: int, dtype="float32", variables=None) -> Program:
  """The fused ``Program`` of a bucket ``(Hb, Wb)``, scale and batch rung: ``(variables, image
  [N, Hb, Wb, 3], seg [N, Hb, Wb], geo) -> (prob, next seg)``; ``dtype`` if no ``variables``."""
  bucket = tuple(bucket)
  variables = abstract_variables(config, dtype) if variables is None else variables
  geo = scale_geometry(bucket, scale, max_scale, bucket=bucket).arrays()
  f32 = jnp.float32
  args = (_abstract(variables), jax.ShapeDtypeStruct((batch, *bucket, 3), f32),
          jax.ShapeDtypeStruct((batch, *bucket), f32),
          jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((batch, *np.shape(a)), a.dtype),
                                 geo))
  name = f"fused {bucket[1]}x{bucket[0]} scale {scale} batch {batch} {_dtype_name(variables)}"
  return Program(name, _fused_scale, args,
                 {"config": config, "rows_per_chunk": rows_per_chunk(bucket, queries)})


class _Recorder:
  """``_banded_projected``'s runner that records each call (abstractly) instead of running it."""

  def __init__(self):
    self.programs: Dict[tuple, Program] = {}

  def call(self, fn, *args, **kwargs):
    args = _abstract(args)
    key = (fn.__name__, repr(args), repr(sorted(kwargs.items())))
    known = self.programs.get(key)
    if known is None:
      statics = [a for a in args if isinstance(a, str) or (
          isinstance(a, tuple) and all(isinstance(v, (bool, int)) for v in a))]
      name = " ".join(["banded", fn.__name__.lstrip("_")] + [str(a) for a in statics])
      self.programs[key] = Program(name, fn, args, dict(kwargs))
    else:
      self.programs[key] = dataclasses.replace(known, calls=known.calls + 1)
    return fn.eval_shape(*args, **kwargs)

  @staticmethod
  def zeros(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)

  @staticmethod
  def wait(value):
    return value


def banded_programs(config: ModelConfig, bucket: Tuple[int, int], scale: float,
                    max_scale: float, queries: int, dtype="float32", variables=None,
                    band_elements: int = BAND_ELEMENTS,
                    target: Optional[Tuple[int, int]] = None) -> List[Program]:
  """The banded plan's programs at one scale, in ``refine_banded``'s order (recorded, not run);
  ``target``: the padded grid (default: the bucket), which fixes ``Program.calls``."""
  bucket = tuple(bucket)
  target = tuple(target or bucket)
  variables = _abstract(abstract_variables(config, dtype) if variables is None else variables)
  g = scale_geometry(target, scale, max_scale, bucket=bucket)
  image, seg = (jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((*bucket, 3), bucket))
  recorder = _Recorder()
  projected, _ = _banded_projected(config, variables, image, seg, g, band_elements,
                                   _Timer(None), run=recorder)
  recorder.call(_banded_queries, config, sub_variables(variables, "implicit_decoder"), projected,
                g.query_arrays(), rows_per_chunk(bucket, queries))
  suffix = f" {bucket[1]}x{bucket[0]} scale {scale} {_dtype_name(variables)}"
  return [dataclasses.replace(p, name=p.name + suffix) for p in recorder.programs.values()]


# Choosing a plan.

def fused_peak_bytes(config: ModelConfig, bucket: Tuple[int, int], max_scale: float,
                     batch: int, dtype_bytes: int, queries: int) -> int:
  """A conservative estimate of the fused plan's peak device bytes for one batch: per pair,
  inputs, outputs, each level's live activations, one query chunk (docs/benchmarks.md)."""
  hb, wb = bucket
  h_in, w_in = scaled_size(bucket, max_scale)
  a1 = -(-h_in // 2) * -(-w_in // 2)
  a2, a3 = -(-a1 // 4), -(-a1 // 16)
  blocks = config.encoder_blocks()
  width = lambda level: max(s.width * s.expansion for s in blocks if s.out_level == level)
  x1_channels = (config.stem_width + 2 * sum(config.fusion_widths) + config.feature_dim
                 + config.decoder_hidden[0])
  network = (a1 * x1_channels + a2 * (3 * width(LEVEL_X2) + config.fusion_widths[1])
             + a3 * (3 * width(LEVEL_X3) + config.fusion_widths[2])) * dtype_bytes
  rows = rows_per_chunk(bucket, queries)
  query_chunk = rows * wb * 4 * max(config.decoder_hidden) * 4 * 2
  io = hb * wb * (3 + 1 + 2 * 4) * 4
  return batch * (network + query_chunk + io)


def device_memory(device=None) -> Optional[int]:
  """Free bytes of ``device`` (default: the first), None where JAX cannot tell (CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # Backends without memory statistics.
    return None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def choose_plan(plan: str, config: ModelConfig, bucket: Tuple[int, int], max_scale: float,
                dtype_bytes: int, queries: int, memory_budget: Optional[int] = None,
                batch: int = 1, platform: Optional[str] = None, device=None) -> str:
  """``plan``, or for ``auto``: ``banded`` on the CPU, else ``fused`` where the memory
  (``memory_budget`` bytes, else ``device_memory``) holds ``fused_peak_bytes``, else ``banded``."""
  if plan != "auto":
    return plan
  if (platform or (device.platform if device is not None else jax.default_backend())) == "cpu":
    return "banded"
  budget = memory_budget if memory_budget is not None else device_memory(device)
  if budget is None:
    return "fused"
  peak = fused_peak_bytes(config, bucket, max_scale, batch, dtype_bytes, queries)
  return "fused" if peak <= budget else "banded"
