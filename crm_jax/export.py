"""The fused plan's programs as serialized ``jax.export`` modules (variables as arguments) beside
a ``manifest.json``, their loader, and the accelerator check of StableHLO (docs/benchmarks.md)."""

import dataclasses
import hashlib
import json
import os
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from crm_jax import checkpoint as ckpt
from crm_jax import plans
from crm_jax.io import InputError
from crm_jax.outputs import folder_written_atomically
from crm_jax.models.crm import ModelConfig
from crm_jax.scales import check_scales

FORMAT = "crm-jax-fused-export"
MANIFEST = "manifest.json"
PROGRAMS_DIR = "programs"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")

# Custom-call targets that every platform lowers (sharding annotations, shape checks); any
# other target is a host callback or a platform's own kernel.
PORTABLE_CUSTOM_CALLS = frozenset({
    "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "annotate_device_placement",
    "shape_assertion", "AllocateBuffer", "MoveToHost", "MoveToDevice"})
_CUSTOM_CALL = re.compile(r'custom_call\s*@([\w.$-]+)|call_target_name\s*=\s*"([^"]+)"')
_F64 = re.compile(r"[<x]f64>")
_DYNAMIC_DIM = re.compile(r"tensor<(?:\d+x)*\?")
_DYNAMIC_OPS = re.compile(
    r"stablehlo\.(dynamic_broadcast_in_dim|dynamic_reshape|dynamic_iota|real_dynamic_slice|"
    r"dynamic_pad|dynamic_gather|dynamic_conv|get_dimension_size|set_dimension_size)\b")


class PortabilityError(ValueError):
  """A program that cannot be lowered or run on an accelerator; the message names it."""


class ExportError(InputError):
  """An export folder that cannot be read or does not fit the model or the request."""


def portability_problems(text: str) -> List[str]:
  """What in a StableHLO module's text cannot run on an accelerator (empty: nothing): host
  callbacks, custom calls outside ``PORTABLE_CUSTOM_CALLS``, float64 values, dynamic shapes."""
  problems = []
  targets = sorted({a or b for a, b in _CUSTOM_CALL.findall(text)} - PORTABLE_CUSTOM_CALLS)
  for target in targets:
    kind = "host callback" if "callback" in target.lower() else "platform-specific custom call"
    problems.append(f"{kind} {target}")
  if _F64.search(text):
    problems.append(f"float64 values ({len(_F64.findall(text))} f64 types)")
  dims = _DYNAMIC_DIM.findall(text)
  ops = sorted(set(_DYNAMIC_OPS.findall(text)))
  if dims or ops:
    problems.append("dynamic shapes" + (f" ({', '.join(ops)})" if ops else ""))
  return problems


def export_program(program: plans.Program, platforms: Sequence[str]) -> jax.export.Exported:
  """``program.export(platforms)``; ``PortabilityError`` naming the program when the lowering
  fails, has ``portability_problems`` or asked for float64 (``fn``'s caches are cleared first)."""
  program.fn.clear_cache()
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("error", message=r".*float64.*")
      exported = program.export(platforms)
  except Exception as e:  # lowering errors, host callbacks, float64 asked for
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    found = _problems_on_cpu(program)
    raise PortabilityError(f"{program.name}: does not lower for {', '.join(platforms)}: "
                           f"{type(e).__name__}: {line}"
                           + (f" (its CPU lowering has: {'; '.join(found)})" if found else "")
                           ) from e
  problems = portability_problems(exported.mlir_module())
  if problems:
    raise PortabilityError(f"{program.name}: not portable to {', '.join(platforms)}: "
                           + "; ".join(problems))
  return exported


def _problems_on_cpu(program: plans.Program) -> List[str]:
  """``portability_problems`` of the program's CPU lowering (empty when that fails too)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return portability_problems(program.lower(("cpu",)).as_text())
  except Exception:  # the CPU lowering fails as well: nothing more to say
    return []


# Export folders.

def export_fused(checkpoint_dir: str, out_dir: str, buckets: Sequence[Tuple[int, int]],
                 scales: Sequence[float], dtype: str = "float32",
                 platforms: Sequence[str] = DEFAULT_PLATFORMS, *,
                 batch_sizes: Sequence[int] = (1,), queries: Optional[int] = None,
                 overwrite: bool = False) -> str:
  """Writes the fused programs of ``buckets`` ``(Hb, Wb)`` x ``scales`` x ``batch_sizes`` for
  ``platforms`` (no such device needed), atomically; returns ``out_dir``."""
  scales = check_scales(scales)
  platforms = tuple(platforms)
  config, variables = ckpt.load_model(checkpoint_dir)
  if queries is None:
    queries = plans.queries_per_chunk("cpu" if platforms == ("cpu",) else "default")
  abstract = plans.abstract_variables(config, dtype)
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir}: already exists (pass overwrite to replace it)")
  with folder_written_atomically(out_dir) as tmp:
    os.makedirs(os.path.join(tmp, PROGRAMS_DIR))
    entries = []
    for bucket in buckets:
      bucket = (int(bucket[0]), int(bucket[1]))
      for scale in scales:
        for batch in batch_sizes:
          program = plans.fused_program(config, bucket, scale, max(scales), int(batch), queries,
                                        variables=abstract)
          blob = export_program(program, platforms).serialize()
          name = f"fused_{bucket[0]}x{bucket[1]}_scale{scale:g}_batch{batch}.bin"
          with open(os.path.join(tmp, PROGRAMS_DIR, name), "wb") as f:
            f.write(blob)
          entries.append({"bucket": list(bucket), "scale": scale, "batch": int(batch),
                          "file": f"{PROGRAMS_DIR}/{name}",
                          "sha256": hashlib.sha256(blob).hexdigest(),
                          "rows_per_chunk": program.kwargs["rows_per_chunk"]})
    manifest = {"format": FORMAT, "version": 1, "model": config.to_dict(),
                "fingerprint": ckpt.fingerprint(config, variables),
                "checkpoint": os.path.abspath(checkpoint_dir), "dtype": dtype,
                "platforms": list(platforms), "buckets": [list(map(int, b)) for b in buckets],
                "scales": list(scales), "batch_sizes": [int(b) for b in batch_sizes],
                "queries": int(queries), "jax_version": jax.__version__, "programs": entries}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
  return out_dir


@dataclasses.dataclass
class ExportedFused:
  """A loaded export folder; ``program`` takes ``plans.fused_program``'s arguments, gives a call."""

  path: str
  manifest: Dict
  config: ModelConfig
  programs: Dict[Tuple[Tuple[int, int], float, int], jax.export.Exported]
  dtype = property(lambda self: self.manifest["dtype"])
  scales = property(lambda self: tuple(self.manifest["scales"]))
  batch_sizes = property(lambda self: tuple(self.manifest["batch_sizes"]))

  def refiner_kwargs(self) -> Dict:
    """The ``Refiner`` settings these programs need."""
    return {"plan": "fused", "dtype": self.dtype, "batch_ladder": self.batch_sizes}

  def check_variables(self, config: ModelConfig, variables) -> None:
    """``ExportError`` unless ``config`` and ``variables`` (fingerprint) are the export's."""
    if config.architecture() != self.config.architecture():
      raise ExportError(f"{self.path}: exported for another model architecture")
    if ckpt.fingerprint(config, variables) != self.manifest["fingerprint"]:
      raise ExportError(f"{self.path}: exported with the checkpoint "
                        f"{self.manifest['fingerprint']}, not these variables")

  def program(self, config: ModelConfig, bucket, scale: float, max_scale: float, batch: int,
              queries: Optional[int] = None, variables=None, dtype=None):
    del queries, variables, dtype
    if config.architecture() != self.config.architecture():
      raise ExportError(f"{self.path}: exported for another model architecture")
    if max_scale != max(self.scales):
      raise ExportError(f"{self.path}: exported for scales {list(self.scales)} (largest "
                        f"{max(self.scales)}), not a run whose largest scale is {max_scale}")
    key = ((int(bucket[0]), int(bucket[1])), float(scale), int(batch))
    if key not in self.programs:
      raise ExportError(f"{self.path}: no program for bucket {key[0][1]}x{key[0][0]} "
                        f"(width x height), scale {scale}, batch {batch}; exported: buckets "
                        f"{self.manifest['buckets']}, scales {list(self.scales)}, batch sizes "
                        f"{list(self.batch_sizes)}")
    return self.programs[key].call


def load_fused(path: str) -> ExportedFused:
  """Reads an ``export_fused`` folder (every program checked against its SHA-256)."""
  path = os.path.abspath(path)
  try:
    with open(os.path.join(path, MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ExportError(f"{os.path.join(path, MANIFEST)}: cannot be read ({e})") from None
  if manifest.get("format") != FORMAT:
    raise ExportError(f"{path}: not a crm-jax fused export")
  programs = {}
  for entry in manifest["programs"]:
    file = os.path.join(path, entry["file"])
    with open(file, "rb") as f:
      blob = f.read()
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
      raise ExportError(f"{file}: damaged (SHA-256 differs from the manifest)")
    key = (tuple(entry["bucket"]), float(entry["scale"]), int(entry["batch"]))
    programs[key] = jax.export.deserialize(bytearray(blob))
  return ExportedFused(path, manifest, ModelConfig.from_dict(manifest["model"]), programs)


def refine_exported(exported: ExportedFused, variables, images_p: Sequence[np.ndarray],
                    segs_p: Sequence[np.ndarray], bucket_steps: int,
                    scales: Optional[Sequence[float]] = None) -> List[Dict[float, np.ndarray]]:
  """``plans.refine_fused`` through the serialized programs; ``scales`` default to the export's."""
  return plans.refine_fused(exported.config, variables, images_p, segs_p,
                            tuple(scales or exported.scales), exported.manifest["queries"],
                            bucket_steps, exported.batch_sizes, program=exported.program)
