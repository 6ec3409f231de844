"""Published PyTorch CRM keys <-> Flax variables, both ways, from the tables ``_MODULES`` and
``_LEAVES`` (docs/model.md). PyTorch is needed only to read and write ``.pth`` files."""

import os
import re
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax import checkpoint as ckpt
from crm_jax.outputs import atomic_write
from crm_jax.models.crm import ModelConfig
from crm_jax.models.encoder import Bottleneck

CONV, BN, LINEAR = "conv", "bn", "linear"
PREFIX = "module."  # nn.DataParallel's, which the published checkpoint carries.
BN_COUNTER = "num_batches_tracked"
USED_STAGES = 3  # layer1-3; layer4 is skipped.
# The fusion branches: PyTorch's suffix (aspp1_<n>, bn1_<n>) -> the Flax branch.
_FUSION_BRANCHES = (("128", "branch_x1"), ("256", "branch_x2"), ("1024", "branch_x3"))

# Module names, PyTorch <-> Flax, in network order. A field in braces is an integer; ``{2l}`` is
# twice ``l`` (``imnet.layers`` also counts the ReLUs).
_MODULES = (
    ("feats.conv1", "encoder/conv1", CONV),
    ("feats.bn1", "encoder/bn1", BN),
    ("feats.layer{s}.{b}.conv{j}", "encoder/layer{s}_{b}/conv{j}", CONV),
    ("feats.layer{s}.{b}.bn{j}", "encoder/layer{s}_{b}/bn{j}", BN),
    ("feats.layer{s}.{b}.downsample.0", "encoder/layer{s}_{b}/downsample_conv", CONV),
    ("feats.layer{s}.{b}.downsample.1", "encoder/layer{s}_{b}/downsample_bn", BN),
    *[rule for n, branch in _FUSION_BRANCHES for rule in (
        (f"aspp_.aspp1_{n}.atrous_conv", f"fusion/{branch}/conv", CONV),
        (f"aspp_.aspp1_{n}.bn", f"fusion/{branch}/bn", BN),
        (f"aspp_.bn1_{n}", f"fusion/{branch}/post_bn", BN))],
    ("aspp_.last_conv.0", "fusion/last_conv", CONV),
    ("aspp_.last_conv.1", "fusion/last_bn", BN),
    ("imnet.layers.{2l}", "implicit_decoder/layers_{l}", LINEAR),
)

# Leaves per kind, in PyTorch's order: PyTorch leaf -> (Flax collection, Flax leaf, axes) with
# ``flax = torch.transpose(axes)`` (None: as it is).
_LEAVES = {
    CONV: {"weight": ("params", "kernel", (2, 3, 1, 0))},  # OIHW -> HWIO
    BN: {"weight": ("params", "scale", None), "bias": ("params", "bias", None),
         "running_mean": ("batch_stats", "mean", None),
         "running_var": ("batch_stats", "var", None)},
    LINEAR: {"weight": ("params", "kernel", (1, 0)), "bias": ("params", "bias", None)},
}

# layer4 (unused by CRM, not in the Flax model) is exported as placeholders, for strict loading.
LAYER4_STAGE, LAYER4_BLOCKS, LAYER4_WIDTH_FACTOR = 4, 3, 2
_LAYER4_FILL = {"kernel": 0.0, "scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0}

_FIELD = re.compile(r"\{(2?)([a-z])\}")
# Per kind: (Flax collection, Flax leaf) -> (PyTorch leaf, axes back to PyTorch).
_LEAVES_BACK = {kind: {(c, f): (t, axes and tuple(int(i) for i in np.argsort(axes)))
                       for t, (c, f, axes) in leaves.items()} for kind, leaves in _LEAVES.items()}
_LEAF_ORDER = [*_LEAVES[BN], BN_COUNTER]  # PyTorch's order of a module's leaves, every kind.
_TOPS = list(dict.fromkeys(rule[0].split(".")[0] for rule in _MODULES))  # feats, aspp_, imnet


class MappingError(ValueError):
  """A state dict that is not a CRM checkpoint or does not fit the model."""


def _translate(name: str, side: int) -> Optional[Tuple[str, Dict[str, int], str]]:
  """``(kind, fields, the other side's name)`` for a module name of PyTorch (side 0) or Flax
  (side 1), or None. Fields are integers without leading zeros; ``{2l}`` must be even."""
  for rule in _MODULES:
    parts = _FIELD.split(rule[side])  # literal, "2" or "", field, literal, ...
    match = re.fullmatch("(0|[1-9][0-9]*)".join(map(re.escape, parts[::3])), name)
    if match and not any(two and int(v) % 2 for two, v in zip(parts[1::3], match.groups())):
      fields = {f: int(v) // int(two or 1)
                for two, f, v in zip(parts[1::3], parts[2::3], match.groups())}
      return rule[2], fields, _FIELD.sub(
          lambda f: str(fields[f.group(2)] * int(f.group(1) or 1)), rule[1 - side])
  return None


def torch_key(flax_module: str, leaf: str) -> str:
  """The PyTorch key (no prefix) of a leaf of a Flax module (``"encoder/layer1_0/conv1"``)."""
  found = _translate(flax_module, 1)
  if found is None:
    raise KeyError(flax_module)
  return f"{found[2]}.{leaf}"


def strip_prefix(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Removes the ``module.`` prefix that ``nn.DataParallel`` adds."""
  return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def is_skipped(key: str) -> bool:
  """Keys the port deliberately does not use."""
  return key.endswith(BN_COUNTER) or key.startswith(f"feats.layer{LAYER4_STAGE}.")


def torch_to_flax(state: Mapping[str, np.ndarray]) -> Tuple[dict, List[str]]:
  """A CRM state dict (conv OIHW, linear ``[out, in]``) -> ``(variables, skipped_keys)`` (HWIO,
  ``[in, out]``; skipped: ``layer4``, ``num_batches_tracked``). Shapes unchecked; ``MappingError``
  on a key of no known module."""
  variables: dict = {"params": {}, "batch_stats": {}}
  skipped, unknown = [], []
  for key, value in strip_prefix(state).items():
    module, _, leaf = key.rpartition(".")
    found = None if is_skipped(key) else _translate(module, 0)
    if found is None or leaf not in _LEAVES[found[0]]:
      (skipped if is_skipped(key) else unknown).append(key)
      continue
    collection, flax_leaf, axes = _LEAVES[found[0]][leaf]
    value = np.asarray(value, dtype=np.float32)
    if axes is not None:
      if value.ndim != len(axes):
        raise MappingError(f"{key}: expected a {len(axes)}-d {found[0]} weight, "
                           f"got shape {value.shape}")
      value = value.transpose(axes)
    node = variables[collection]
    for part in found[2].split("/"):
      node = node.setdefault(part, {})
    node[flax_leaf] = value
  if unknown:
    raise MappingError(f"unexpected keys (not CRM): {sorted(unknown)[:8]}"
                       f"{' ...' if len(unknown) > 8 else ''}")
  return variables, sorted(skipped)


def _torch_entries(variables) -> Iterator[Tuple[str, str, str, Optional[Tuple[int, ...]], object]]:
  """``(PyTorch module, PyTorch leaf, kind, axes back, leaf)`` per leaf of Flax variables."""
  for path, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
    names = [str(getattr(p, "key", p)) for p in path]
    found = _translate("/".join(names[1:-1]), 1)
    back = found and _LEAVES_BACK[found[0]].get((names[0], names[-1]))
    if not back:
      raise MappingError(f"{'/'.join(names)}: no PyTorch name for this variable")
    yield found[2], back[0], found[0], back[1], value


def _layer4_variables(config: ModelConfig) -> dict:
  """Flax-layout placeholder variables of layer4 (``encoder/layer4_{i}``; ``_LAYER4_FILL``)."""
  width = LAYER4_WIDTH_FACTOR * config.stage_widths[-1]
  in_ch = config.stage_widths[-1] * config.expansion
  out: dict = {}
  for i in range(LAYER4_BLOCKS):
    block = Bottleneck(width, expansion=config.expansion, downsample=(i == 0))
    x = jax.ShapeDtypeStruct((1, 8, 8, in_ch), jnp.float32)
    for collection, tree in jax.eval_shape(block.init, jax.random.PRNGKey(0), x).items():
      out.setdefault(collection, {}).setdefault("encoder", {})[f"layer{LAYER4_STAGE}_{i}"] = (
          jax.tree_util.tree_map_with_path(
              lambda p, s: np.full(s.shape, _LAYER4_FILL[p[-1].key], np.float32), tree))
    in_ch = width * config.expansion
  return out


def flax_to_torch(variables, config: ModelConfig,
                  num_batches_tracked: int = 0) -> Dict[str, np.ndarray]:
  """Flax variables (HWIO) -> the published layout's state dict (OIHW, ``module.``-prefixed, with
  layer4 placeholders; docs/model.md, "Exporting to PyTorch")."""
  count = num_batches_tracked
  if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
    raise MappingError(f"num_batches_tracked must be a non-negative integer, "
                       f"not {num_batches_tracked!r}")
  try:
    ckpt.check_tree(variables, config, "variables")
  except ckpt.CheckpointError as e:
    raise MappingError(str(e)) from None
  state = {}
  for tree in (variables, _layer4_variables(config)):
    for module, leaf, kind, axes, value in _torch_entries(tree):
      value = np.asarray(value, dtype=np.float32)
      state[f"{module}.{leaf}"] = np.ascontiguousarray(
          value if axes is None else value.transpose(axes))
      if kind == BN:
        state[f"{module}.{BN_COUNTER}"] = np.array(count, dtype=np.int64)

  def rank(key):  # Top module, then modules in natural order, then leaves in PyTorch's.
    module, _, leaf = key.rpartition(".")
    natural = tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", module))
    return _TOPS.index(module.split(".")[0]), natural, _LEAF_ORDER.index(leaf)

  return {PREFIX + key: state[key] for key in sorted(state, key=rank)}


def infer_config(state: Mapping[str, np.ndarray]) -> ModelConfig:
  """Reads the architecture off a CRM state dict's shapes (``module.`` prefix or not)."""
  state = strip_prefix(state)

  def shape(flax_module, leaf="weight"):
    key = torch_key(flax_module, leaf)
    if key not in state:
      raise MappingError(f"missing key {key!r}: not a CRM checkpoint")
    return tuple(np.shape(state[key]))

  conv1 = shape("encoder/conv1")
  if len(conv1) != 4 or conv1[1] != 4 or conv1[2:] != (7, 7):
    raise MappingError(f"{torch_key('encoder/conv1', 'weight')} has shape {conv1}; "
                       "CRM needs [C, 4, 7, 7]")
  found = [_translate(key.rpartition(".")[0], 0) for key in state]
  blocks = [f[1] for f in found if f and "b" in f[1]]  # Fields {s, b} of the blocks' modules.
  sizes, widths = [], []
  for stage in range(1, USED_STAGES + 1):
    widths.append(shape(f"encoder/layer{stage}_0/conv1")[0])  # Raises if the stage is missing.
    sizes.append(1 + max(f["b"] for f in blocks if f["s"] == stage))
  expansion = shape("encoder/layer1_0/conv3")[0] // widths[0]
  fusion = tuple(shape(f"fusion/{branch}/conv")[0] for _, branch in _FUSION_BRANCHES)
  feature_dim = shape("fusion/last_conv")[0]
  hidden = [shape("implicit_decoder/layers_0")[0]]  # Raises if the decoder is missing.
  while torch_key(f"implicit_decoder/layers_{len(hidden)}", "weight") in state:
    hidden.append(shape(f"implicit_decoder/layers_{len(hidden)}")[0])
  if hidden[-1] != 1:
    last = torch_key(f"implicit_decoder/layers_{len(hidden) - 1}", "weight")
    raise MappingError(f"{last} has {hidden[-1]} outputs; CRM's last layer has one")
  return ModelConfig(stem_width=conv1[0], stage_sizes=tuple(sizes), stage_widths=tuple(widths),
                     expansion=expansion, fusion_widths=fusion,
                     feature_dim=feature_dim, decoder_hidden=tuple(hidden[:-1]))


def expected_keys(config: ModelConfig) -> Dict[str, Tuple[int, ...]]:
  """The keys CRM uses and their PyTorch shapes (no prefix, ``layer4``, ``num_batches_tracked``)."""
  return {f"{module}.{leaf}": tuple(value.shape[i] for i in axes) if axes else value.shape
          for module, leaf, _, axes, value in _torch_entries(ckpt.abstract_variables(config))}


def check_keys(state: Mapping[str, np.ndarray], config: ModelConfig) -> None:
  """``MappingError`` naming keys missing, unexpected or misshapen for ``config``."""
  state = strip_prefix(state)
  want = expected_keys(config)
  have = {k: tuple(np.shape(v)) for k, v in state.items() if not is_skipped(k)}

  def listed(keys):
    return f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"

  missing = sorted(set(want) - set(have))
  if missing:
    raise MappingError(f"missing {len(missing)} key(s): {listed(missing)}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise MappingError(f"unexpected keys (not CRM): {listed(extra)}")
  for key, shape in want.items():
    if have[key] != shape:
      raise MappingError(f"{key} has shape {list(have[key])}, expected {list(shape)} "
                         "(the architecture read from the other keys)")


def torch_load_reason(e: BaseException) -> str:
  """A ``torch.load(weights_only=True)`` failure in one line: what an unpickling refusal refused
  (without torch's advice and links), else the message's first line."""
  text = str(e).strip()
  if not text:
    return type(e).__name__
  paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
  if paragraphs[0].startswith("Weights only load failed"):
    specific = [p for p in paragraphs[1:] if not p.startswith("Check the documentation")]
    if specific:
      return " ".join(specific).rstrip(".") + "."
  return text.splitlines()[0].strip()


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A ``.pth`` file's state dict (plain or under ``state_dict``/``model``/``net``/
  ``model_state_dict``) as numpy arrays, PyTorch layout."""
  try:
    import torch  # Only needed here.
  except ImportError:
    raise MappingError("reading PyTorch checkpoints needs torch "
                       "(pip install torch==2.13.0)") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise MappingError(f"{path}: no such file") from None
  except Exception as e:
    reason = torch_load_reason(e)
    if "GLOBAL" in reason:  # an object other than tensors, which unpickling would construct
      raise MappingError(f"{path}: refused: it holds Python objects besides tensors, which "
                         f"loading could run as code ({reason}); only weights-only files are "
                         "read, as the published checkpoint is") from None
    raise MappingError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
  if isinstance(obj, Mapping):
    obj = next((obj[w] for w in ("state_dict", "model", "net", "model_state_dict")
                if w in obj and isinstance(obj[w], Mapping)), obj)
  if not isinstance(obj, Mapping) or not obj or not all(
      hasattr(v, "numpy") for v in obj.values()):
    raise MappingError(f"{path}: does not hold a state dict of tensors")
  return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def check_torch_target(path: str, overwrite: bool = False) -> None:
  """``CheckpointError`` for a folder, ``FileExistsError`` for a file unless ``overwrite``."""
  if os.path.isdir(path):
    raise ckpt.CheckpointError(f"{path}: is a folder, not a file")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path}: already exists (pass overwrite to replace it)")


def save_torch_state_dict(path: str, state: Mapping[str, np.ndarray],
                          overwrite: bool = False) -> str:
  """Writes ``state`` as a flat dict of tensors (``weights_only``-readable), atomically; returns
  ``path``. One-line errors: ``MappingError``, ``FileExistsError``, ``CheckpointError``."""
  try:
    import torch  # optional dependency: PyTorch
  except ImportError:
    raise MappingError(f"{path}: writing PyTorch checkpoints needs torch "
                       "(pip install torch==2.13.0)") from None
  check_torch_target(path, overwrite)
  tensors = {}
  for key, value in state.items():
    if not isinstance(key, str):
      raise MappingError(f"{path}: state dict keys must be strings, not {key!r}")
    try:
      # A C-ordered copy: torch.from_numpy shares memory and needs a writable array.
      tensors[key] = torch.from_numpy(np.array(value, order="C", copy=True))
    except (TypeError, ValueError) as e:
      raise MappingError(f"{path}: {key} is not a numeric array ({e})") from None

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      torch.save(tensors, f)
      f.flush()
      os.fsync(f.fileno())

  try:
    atomic_write(path, write)
  except OSError as e:  # atomic_write's message names path.
    raise ckpt.CheckpointError(str(e)) from None
  except Exception as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ckpt.CheckpointError(f"{path}: cannot be written ({first[:200]})") from None
  return path
