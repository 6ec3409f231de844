"""``crm_jax.Refiner``: the published multi-scale test loop on one image or a batch, run by an
execution plan (``crm_jax.plans``), with ``min_side``, the compute dtype and the persistent
compilation cache. The algorithm: docs/refinement.md; using it: docs/refining.md.
"""

import os
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax import checkpoint as ckpt
from crm_jax import export as export_lib
from crm_jax import plans
from crm_jax.constants import REFLECT_PAD, SCALES
from crm_jax.geometry import BUCKET_STEPS, bucket_shape
from crm_jax.io import InputError, as_mask, as_rgb
from crm_jax.labels import IGNORE, Merge, check_labels, classes_to_refine
from crm_jax.models.crm import ModelConfig
from crm_jax.preprocess import mask_to_prob, normalize_image, normalize_seg
from crm_jax.scales import (SMALL_SIDE, SmallImageWarning, check_min_side, check_scales,
                            scales_to_run, small_image_note)

# Persistent compilation cache.
CACHE_DIR_ENV = "CRM_JAX_CACHE_DIR"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "crm_jax", "xla")
CACHE_MIN_COMPILE_SECS = 0.1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PLAN_CHOICES = ("auto",) + plans.PLANS


def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
  """Points JAX's persistent compilation cache at ``path`` (default ``$CRM_JAX_CACHE_DIR``, empty:
  off, else ``~/.cache/crm_jax/xla``); returns the dir. Call before the first compilation.
  Compilations over 0.1 s are cached (JAX's 1 s would skip most CPU ones of the query loop)."""
  if path is None:
    path = os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)
  path = os.path.expanduser(path) if path else None
  if path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      warnings.warn(f"compilation cache disabled: cannot create {path}: {e}")
      path = None
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path


def _cast(variables, dtype, device):
  """The variables as ``dtype`` on ``device`` (cast on the host: no compilation)."""
  return jax.tree_util.tree_map(
      lambda a: jax.device_put(np.asarray(a).astype(dtype), device), variables)


def _caller_stacklevel() -> int:
  """The ``warnings.warn`` stacklevel of the first frame outside this module."""
  frame, level = sys._getframe(1), 1
  while frame is not None and frame.f_code.co_filename == __file__:
    frame, level = frame.f_back, level + 1
  return level


class BatchInputError(InputError):
  """Some pairs of a ``refine_batch`` call were bad; the others were refined. ``results``: one
  entry per pair (None for a bad one); ``bad``: each bad pair's index -> its message."""

  def __init__(self, bad: Dict[int, str], results: list):
    lines = "; ".join(f"pair {i}: {msg}" for i, msg in sorted(bad.items()))
    super().__init__(f"{len(bad)} of {len(results)} pairs not refined: {lines}")
    self.bad = bad
    self.results = results


class Refiner:
  """Refines coarse masks with CRM, following the published test loop.

  Example::

      refiner = Refiner.from_checkpoint("checkpoints/crm_small")
      prob = refiner.refine(image, mask)   # [H, W] float32 in [0, 1]
      probs = refiner.refine_batch(images, masks)  # one [H_i, W_i] map per pair

  Args:
    config, variables: the model.
    plan: ``auto`` (banded on the CPU, fused where it fits), ``plain``, ``banded``, ``fused``.
    memory_budget: bytes the fused plan may use (``auto``; default: the device's free memory).
    query_chunk: queries per decoder chunk (whole rows; default per platform).
    pad: reflect padding (32, as published).
    bucket_steps: bucket ladder rungs per octave.
    dtype: ``"float32"`` or ``"bfloat16"`` (bucketed plans only).
    band_elements: elements of the widest per-band tensor (``banded``).
    batch_ladder: batch sizes the fused plan compiles for.
    compilation_cache: also switch on ``enable_compilation_cache``.
    device: the ``jax.Device`` that runs everything (default: JAX's default device).
    min_side: skip leading scales where ``min(H, W) * s < min_side`` (0: the published loop).
    warn_small: with ``min_side`` 0, warn once (``SmallImageWarning``) about a small image.
  """

  def __init__(self, config: ModelConfig, variables, *, plan: str = "auto",
               memory_budget: Optional[int] = None, query_chunk: Optional[int] = None,
               pad: int = REFLECT_PAD, bucket_steps: int = BUCKET_STEPS,
               dtype="float32", band_elements: int = plans.BAND_ELEMENTS,
               batch_ladder: Sequence[int] = plans.BATCH_LADDER,
               compilation_cache: bool = False, device: Optional[jax.Device] = None,
               min_side: int = 0, warn_small: bool = True):
    if compilation_cache:
      enable_compilation_cache()
    if plan not in PLAN_CHOICES:
      raise ValueError(f"plan must be one of {list(PLAN_CHOICES)}, not {plan!r}")
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if name != "float32" and plan == "plain":
      raise ValueError("dtype other than float32 needs a bucketed plan (banded or fused)")
    self.min_side, self.warn_small = check_min_side(min_side), warn_small
    self.config, self.dtype, self.plan, self.memory_budget = config, name, plan, memory_budget
    self.device = device or jax.devices()[0]
    self.variables = jax.device_put(variables, self.device)
    self.compute_variables = (self.variables if name == "float32"
                              else _cast(variables, DTYPES[name], self.device))
    self.query_chunk = query_chunk or plans.queries_per_chunk(self.device.platform)
    self.pad, self.bucket_steps, self.band_elements = pad, bucket_steps, band_elements
    self.batch_ladder = tuple(batch_ladder)
    self.exported = None  # a crm_jax.export.ExportedFused (from_export): runs the fused plan

  @classmethod
  def from_checkpoint(cls, path: str, **kwargs) -> "Refiner":
    """Loads a model checkpoint directory; ``min_side`` None: the checkpoint's recommendation."""
    kwargs["min_side"], _ = ckpt.resolve_min_side(kwargs.get("min_side"), path)
    config, variables = ckpt.load_model(path)
    return cls(config, variables, **kwargs)

  @classmethod
  def from_export(cls, path: str, checkpoint: Optional[str] = None, **kwargs) -> "Refiner":
    """Runs the fused plan from the programs ``crm-export`` wrote in ``path`` (no tracing), with
    the variables of ``checkpoint`` (default: the export's own; another one is refused)."""
    exported = export_lib.load_fused(path)
    checkpoint = checkpoint or exported.manifest["checkpoint"]
    kwargs["min_side"], _ = ckpt.resolve_min_side(kwargs.get("min_side"), checkpoint)
    config, variables = ckpt.load_model(checkpoint)
    exported.check_variables(config, variables)
    kwargs.update(exported.refiner_kwargs())
    refiner = cls(config, variables, **kwargs)
    refiner.exported = exported
    return refiner

  # -- inputs -------------------------------------------------------------------------------

  def _prepared(self, image, mask, scales) -> Tuple[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """The checked mask (uint8 ``[H, W]``) and the normalised, reflect-padded pair (float32
    ``[H+2p, W+2p, 3]``, ``[H+2p, W+2p]``); ``InputError`` for a bad pair or scales."""
    image, mask = as_rgb(image, "image"), as_mask(mask, "mask")
    if image.shape[:2] != mask.shape:
      raise InputError(f"image is {image.shape[1]}x{image.shape[0]} but mask is "
                       f"{mask.shape[1]}x{mask.shape[0]} (width x height)")
    if min(mask.shape) <= self.pad:
      raise InputError(f"image is {mask.shape[1]}x{mask.shape[0]}; both sides must "
                       f"exceed {self.pad} pixels (the reflect padding)")
    check_scales(scales, mask.shape, pad=self.pad)
    p = self.pad
    return mask, (np.pad(normalize_image(image), ((p, p), (p, p), (0, 0)), mode="reflect"),
                  self._padded_seg(mask))

  def _padded_seg(self, mask: np.ndarray) -> np.ndarray:
    p = self.pad
    return np.pad(normalize_seg(mask), ((p, p), (p, p)), mode="reflect")

  def bucket_of(self, size: Tuple[int, int]) -> Tuple[int, int]:
    """The bucket of an image of ``size`` ``(H, W)`` (pairs of one bucket batch together)."""
    p = self.pad
    return bucket_shape((size[0] + 2 * p, size[1] + 2 * p), self.bucket_steps)

  def plan_for(self, size: Tuple[int, int], scales: Sequence[float] = SCALES,
               batch: int = 1) -> str:
    """The plan that runs an image of ``size`` ``(H, W)`` (``auto`` resolved)."""
    return self._bucket_plan(self.bucket_of(size), scales, batch)

  def _bucket_plan(self, bucket: Tuple[int, int], scales: Sequence[float], batch: int) -> str:
    return plans.choose_plan(self.plan, self.config, bucket, max(scales),
                             jnp.dtype(self.dtype).itemsize, self.query_chunk,
                             self.memory_budget, batch, device=self.device)

  # -- refinement ---------------------------------------------------------------------------

  def _run(self, padded: List[Tuple[np.ndarray, np.ndarray]],
           scales: Tuple[float, ...]) -> List[Dict[float, np.ndarray]]:
    """Padded pairs -> ``{s: prob}`` on their padded grids, on ``self.device`` (fused pairs
    batched by bucket)."""
    results: List[Optional[Dict[float, np.ndarray]]] = [None] * len(padded)
    groups: Dict[tuple, List[int]] = {}
    for i, (image_p, _) in enumerate(padded):
      groups.setdefault(bucket_shape(image_p.shape[:2], self.bucket_steps), []).append(i)
    with jax.default_device(self.device):
      for bucket, idx in groups.items():
        plan = self._bucket_plan(bucket, scales, min(len(idx), max(self.batch_ladder)))
        if plan == "fused":
          program = None if self.exported is None else self.exported.program
          out = plans.refine_fused(self.config, self.compute_variables,
                                   [padded[i][0] for i in idx], [padded[i][1] for i in idx],
                                   scales, self.query_chunk, self.bucket_steps,
                                   self.batch_ladder, program=program)
          for i, r in zip(idx, out):
            results[i] = r
        elif plan == "plain":
          for i in idx:
            results[i] = plans.refine_plain(self.config, self.variables, *padded[i], scales,
                                            self.query_chunk)
        else:
          for i in idx:
            results[i] = plans.refine_banded(self.config, self.compute_variables, *padded[i],
                                             scales, self.query_chunk, self.bucket_steps,
                                             self.band_elements)
    return results

  def _warn_if_small(self, sizes: Sequence[Tuple[int, int]], scales: Tuple[float, ...]) -> None:
    """The once-per-Refiner ``SmallImageWarning`` (see ``warn_small``)."""
    if self.min_side or not self.warn_small:
      return
    for size in sizes:
      note = small_image_note(scales, size)
      if note is not None:
        self.warn_small = False
        warnings.warn(f"an image of {note}; small images refine better with "
                      f"Refiner(..., min_side={SMALL_SIDE}) (this warning is given once per "
                      "Refiner)", SmallImageWarning, stacklevel=_caller_stacklevel())
        return

  def _refine_prepared(self, prepared, scales: Tuple[float, ...],
                       keep=None) -> List[Dict[float, np.ndarray]]:
    """``_prepared`` pairs -> ``{s: [H, W] float32}`` for each ``s`` of ``keep`` (default: all),
    refined at ``scales_to_run(scales, (H, W), self.min_side)``; a scale left out: ``mask/255``."""
    self._warn_if_small([mask.shape for mask, _ in prepared], scales)
    groups: Dict[Tuple[float, ...], List[int]] = {}
    for i, (mask, _) in enumerate(prepared):
      groups.setdefault(scales_to_run(scales, mask.shape, self.min_side), []).append(i)
    keep = tuple(scales if keep is None else keep)
    results: List[Optional[Dict[float, np.ndarray]]] = [None] * len(prepared)
    p = self.pad  # each kept scale cropped to the image and copied to the host (only those)
    for kept, idx in groups.items():
      for i, probs in zip(idx, self._run([prepared[i][1] for i in idx], kept)):
        results[i] = {s: np.array(probs[s][p:probs[s].shape[0] - p, p:probs[s].shape[1] - p])
                      if s in probs else mask_to_prob(prepared[i][0]) for s in scales if s in keep}
    return results

  def refine_all_scales(self, image: np.ndarray, mask: np.ndarray,
                        scales: Sequence[float] = SCALES) -> Dict[float, np.ndarray]:
    """RGB uint8 ``[H, W, 3]`` image and grey uint8 ``[H, W]`` coarse mask -> the probability
    map after each of ``scales`` (coarse to fine), ``{s: [H, W] float32}``."""
    scales = check_scales(scales)
    return self._refine_prepared([self._prepared(image, mask, scales)], scales)[0]

  def refine(self, image: np.ndarray, mask: np.ndarray,
             scales: Sequence[float] = SCALES) -> np.ndarray:
    """The refined probability ``[H, W]`` float32 after the last scale."""
    scales = check_scales(scales)
    return self._refine_prepared([self._prepared(image, mask, scales)], scales,
                                 scales[-1:])[0][scales[-1]]

  def refine_batch_all_scales(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                              scales: Sequence[float] = SCALES,
                              keep: Optional[Sequence[float]] = None
                              ) -> List[Dict[float, np.ndarray]]:
    """``refine_all_scales`` of every pair (sizes may differ; one bucket: one ``fused`` batch).
    Bad pairs do not stop the others: then ``BatchInputError`` names them, with the results."""
    scales = check_scales(scales)
    images, masks = list(images), list(masks)
    if len(images) != len(masks):
      raise InputError(f"refine_batch: {len(images)} images but {len(masks)} masks")
    if not images:
      raise InputError("refine_batch: no pairs given")
    prepared, good, bad = [], [], {}
    for i, (image, mask) in enumerate(zip(images, masks)):
      try:
        prepared.append(self._prepared(image, mask, scales))
        good.append(i)
      except InputError as e:
        bad[i] = str(e)
    results: List[Optional[Dict[float, np.ndarray]]] = [None] * len(images)
    for i, r in zip(good, self._refine_prepared(prepared, scales, keep)):
      results[i] = r
    if bad:
      raise BatchInputError(bad, results)
    return results

  def refine_batch(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                   scales: Sequence[float] = SCALES) -> List[np.ndarray]:
    """One refined probability ``[H_i, W_i]`` float32 per pair, after the last scale (see
    ``refine_batch_all_scales``; ``BatchInputError.results`` hold the last scale's maps)."""
    last = check_scales(scales)[-1]
    try:
      return [r[last] for r in self.refine_batch_all_scales(images, masks, scales)]
    except BatchInputError as e:
      e.results = [None if r is None else r[last] for r in e.results]
      raise


  def refine_labels(self, image: np.ndarray, labels: np.ndarray,
                    classes: Optional[Sequence[int]] = None, ignore: Optional[int] = IGNORE,
                    scales: Sequence[float] = SCALES) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` image and ``[H, W]`` label map of class ids -> the refined label
    map, same shape and dtype. Each class (of ``classes``, or every one present but ``ignore``)
    is refined as a binary mask, the classes of the image batched together (one bucket), and
    the last scale's probabilities merged by ``crm_jax.labels.Merge`` (docs/labels.md)."""
    labels, image = check_labels(labels), as_rgb(image, "image")
    if image.shape[:2] != labels.shape:
      raise InputError(f"image is {image.shape[1]}x{image.shape[0]} but labels are "
                       f"{labels.shape[1]}x{labels.shape[0]} (width x height)")
    scales = check_scales(scales)
    chosen, last = classes_to_refine(labels, classes, ignore), scales[-1]
    merge = Merge(labels, ignore)
    step = max(self.batch_ladder)
    image_padded = None
    for i in range(0, len(chosen), step):
      group = chosen[i:i + step]
      masks = [np.where(labels == c, 255, 0).astype(np.uint8) for c in group]
      if image_padded is None:  # the image normalised once, checked with the first class
        first = self._prepared(image, masks[0], scales)
        image_padded = first[1][0]
      prepared = [(m, (image_padded, self._padded_seg(m))) for m in masks]
      for c, probs in zip(group, self._refine_prepared(prepared, scales, (last,))):
        merge.add(c, probs[last])
    return merge.result()


if __name__ == "__main__":  # the command moved to crm_jax.cli
  print("error: `python -m crm_jax.refine` is now `crm-refine` (or `python -m crm_jax.cli.refine`)",
        file=sys.stderr)
  sys.exit(2)
