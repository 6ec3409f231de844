"""The mapping between published PyTorch CRM keys and the Flax variables, both ways.

One auditable rename (key names: docs/model.md and docs/decoder.md), read by both directions from
the same two tables: ``_MODULES`` (PyTorch module name <-> Flax module path, and the module's
kind) and ``_LEAVES`` (per kind: PyTorch leaf <-> Flax collection and leaf, and the axes
permutation: conv ``OIHW -> HWIO``, linear ``.T``, BN ``weight/bias -> scale/bias``, running
statistics -> ``batch_stats`` ``mean/var``).

* ``torch_to_flax``: a state dict -> Flax variables. ``module.`` prefixes of ``nn.DataParallel``
  are dropped; ``layer4`` (never used by CRM) and ``num_batches_tracked`` are skipped and
  reported.
* ``flax_to_torch``: Flax variables -> a state dict in the published layout (``module.``-prefixed,
  ``num_batches_tracked`` buffers, and placeholder ``layer4`` entries so that the published
  network loads it with ``strict=True``; docs/model.md, "Exporting to PyTorch").

Works on plain numpy arrays; PyTorch is only needed to read and write ``.pth`` files
(``load_torch_state_dict``, ``save_torch_state_dict``).
"""

import os
import re
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax import checkpoint as ckpt
from crm_jax.io import atomic_write
from crm_jax.models.crm import ModelConfig
from crm_jax.models.encoder import Bottleneck

CONV, BN, LINEAR = "conv", "bn", "linear"
PREFIX = "module."  # nn.DataParallel's, which the published checkpoint carries.
BN_COUNTER = "num_batches_tracked"
USED_STAGES = 3  # layer1-3; layer4 is skipped.
# The fusion branches: PyTorch's suffix (aspp1_<n>, bn1_<n>) -> the Flax branch.
_FUSION_BRANCHES = (("128", "branch_x1"), ("256", "branch_x2"), ("1024", "branch_x3"))

# Module names, PyTorch <-> Flax (path parts joined by "/"), in network order. A field in braces
# is a non-negative integer; ``{2l}`` is twice the field ``l``: PyTorch's ``imnet.layers``
# Sequential also counts the ReLUs between the Linear layers.
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
# ``flax = torch.transpose(axes)`` (None: as it is). BatchNorm also has ``num_batches_tracked``,
# which Flax does not keep.
_LEAVES = {
    CONV: {"weight": ("params", "kernel", (2, 3, 1, 0))},  # OIHW -> HWIO
    BN: {"weight": ("params", "scale", None), "bias": ("params", "bias", None),
         "running_mean": ("batch_stats", "mean", None),
         "running_var": ("batch_stats", "var", None)},
    LINEAR: {"weight": ("params", "kernel", (1, 0)), "bias": ("params", "bias", None)},
}

# layer4 of the published ResNet-50 (3 bottlenecks, width 512 = 2 x layer3's) is never used by
# CRM and not in the Flax model. The export writes it so that the published network (and
# ``torch_reference.TorchCRM``, sized like it) loads the file with ``strict=True``: convs zero,
# BatchNorm with PyTorch's fresh values (scale 1, bias 0, mean 0, var 1).
LAYER4_STAGE = 4
LAYER4_BLOCKS = 3
LAYER4_WIDTH_FACTOR = 2
_LAYER4_FILL = {"kernel": 0.0, "scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0}

_FIELD = re.compile(r"\{(2?)([a-z])\}")


class MappingError(ValueError):
  """A state dict that is not a CRM checkpoint or does not fit the model."""


def _pattern(template: str) -> "re.Pattern":
  """A template as a regex; each field an integer written without leading zeros."""
  pieces, end = [], 0
  for field in _FIELD.finditer(template):
    pieces += [re.escape(template[end:field.start()]),
               f"(?P<{field.group(2)}>0|[1-9][0-9]*)"]
    end = field.end()
  return re.compile("".join(pieces) + re.escape(template[end:]))


class _Rule(NamedTuple):
  torch: str
  flax: str
  kind: str

  def parse(self, side: str, name: str) -> Optional[Dict[str, int]]:
    """The fields of ``name`` on ``side`` ("torch" or "flax"), or None if it does not match."""
    template = getattr(self, side)
    match = _PATTERNS[self][side].fullmatch(name)
    if match is None:
      return None
    fields = {}
    for field in _FIELD.finditer(template):
      value = int(match.group(field.group(2)))
      if field.group(1):
        if value % 2:
          return None
        value //= 2
      fields[field.group(2)] = value
    return fields

  def format(self, side: str, fields: Mapping[str, int]) -> str:
    return _FIELD.sub(lambda f: str(fields[f.group(2)] * (2 if f.group(1) else 1)),
                      getattr(self, side))


_RULES = tuple(_Rule(*rule) for rule in _MODULES)
_PATTERNS = {rule: {"torch": _pattern(rule.torch), "flax": _pattern(rule.flax)}
             for rule in _RULES}
# Per kind: (Flax collection, Flax leaf) -> (PyTorch leaf, axes).
_LEAVES_BACK = {kind: {(c, f): (t, axes) for t, (c, f, axes) in leaves.items()}
                for kind, leaves in _LEAVES.items()}


def _translate(name: str, side: str) -> Optional[Tuple[_Rule, Dict[str, int], str]]:
  """``(rule, fields, the other side's name)`` for a module name on ``side``, or None."""
  other = "flax" if side == "torch" else "torch"
  for rule in _RULES:
    fields = rule.parse(side, name)
    if fields is not None:
      return rule, fields, rule.format(other, fields)
  return None


def torch_key(flax_module: str, leaf: str) -> str:
  """The PyTorch key (no prefix) of a leaf of a Flax module (``"encoder/layer1_0/conv1"``)."""
  found = _translate(flax_module, "flax")
  if found is None:
    raise KeyError(flax_module)
  return f"{found[2]}.{leaf}"


def _inverse(axes: Tuple[int, ...]) -> Tuple[int, ...]:
  return tuple(int(i) for i in np.argsort(axes))


def strip_prefix(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Removes the ``module.`` prefix that ``nn.DataParallel`` adds."""
  out = {}
  for k, v in state.items():
    out[k[len(PREFIX):] if k.startswith(PREFIX) else k] = v
  return out


def _set(tree: dict, path: Tuple[str, ...], value: np.ndarray) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def is_skipped(key: str) -> bool:
  """Keys the port deliberately does not use."""
  return key.endswith(BN_COUNTER) or key.startswith(f"feats.layer{LAYER4_STAGE}.")


def torch_to_flax(state: Mapping[str, np.ndarray]) -> Tuple[dict, List[str]]:
  """Renames a CRM state dict (numpy values) to Flax variables.

  Returns ``(variables, skipped_keys)``; raises ``MappingError`` on a key
  that belongs to no known module. Shapes are checked by the caller against
  the model (``crm_jax.checkpoint.check_tree``).
  """
  state = strip_prefix(state)
  variables: dict = {"params": {}, "batch_stats": {}}
  skipped, unknown = [], []
  for key, value in state.items():
    if is_skipped(key):
      skipped.append(key)
      continue
    module, _, leaf = key.rpartition(".")
    found = _translate(module, "torch")
    if found is None or leaf not in _LEAVES[found[0].kind]:
      unknown.append(key)
      continue
    rule, _, flax_module = found
    collection, flax_leaf, axes = _LEAVES[rule.kind][leaf]
    value = np.asarray(value, dtype=np.float32)
    if axes is not None:
      if value.ndim != len(axes):
        raise MappingError(f"{key}: expected a {len(axes)}-d {rule.kind} weight, "
                           f"got shape {value.shape}")
      value = value.transpose(axes)
    _set(variables[collection], tuple(flax_module.split("/")) + (flax_leaf,), value)
  if unknown:
    raise MappingError(f"unexpected keys (not CRM): {sorted(unknown)[:8]}"
                       f"{' ...' if len(unknown) > 8 else ''}")
  return variables, sorted(skipped)


def _torch_entries(variables) -> Iterator[Tuple[str, str, str, Optional[Tuple[int, ...]], object]]:
  """``(PyTorch module, PyTorch leaf, kind, axes back to PyTorch, leaf)`` for every leaf of a
  Flax variables tree (``{"params": ..., "batch_stats": ...}``); ``MappingError`` for a leaf
  that has no PyTorch name."""
  for path, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
    names = [str(getattr(p, "key", p)) for p in path]
    collection, module, leaf = names[0], "/".join(names[1:-1]), names[-1]
    found = _translate(module, "flax")
    back = found and _LEAVES_BACK[found[0].kind].get((collection, leaf))
    if not back:
      raise MappingError(f"{'/'.join(names)}: no PyTorch name for this variable")
    torch_leaf, axes = back
    yield found[2], torch_leaf, found[0].kind, axes and _inverse(axes), value


def _layer4_variables(config: ModelConfig) -> dict:
  """Flax-layout placeholder variables of layer4 (``encoder/layer4_{i}``; ``_LAYER4_FILL``)."""
  width = LAYER4_WIDTH_FACTOR * config.stage_widths[-1]
  in_ch = config.stage_widths[-1] * config.expansion
  out: dict = {}
  for i in range(LAYER4_BLOCKS):
    block = Bottleneck(width, expansion=config.expansion, downsample=(i == 0))
    x = jax.ShapeDtypeStruct((1, 8, 8, in_ch), jnp.float32)
    shapes = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)
    for collection, tree in shapes.items():
      out.setdefault(collection, {}).setdefault("encoder", {})[f"layer{LAYER4_STAGE}_{i}"] = (
          jax.tree_util.tree_map_with_path(
              lambda p, s: np.full(s.shape, _LAYER4_FILL[p[-1].key], np.float32), tree))
    in_ch = width * config.expansion
  return out


def _natural(text: str) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def flax_to_torch(variables, config: ModelConfig,
                  num_batches_tracked: int = 0) -> Dict[str, np.ndarray]:
  """Flax variables -> a CRM state dict in the published layout (numpy values).

  The inverse of ``torch_to_flax``, through the same tables: keys ``module.``-prefixed as in the
  published checkpoint; conv ``HWIO -> OIHW``, linear ``.T``, BN ``scale/bias -> weight/bias``,
  ``mean/var -> running_mean/running_var``, all float32 and C-contiguous; every BatchNorm gets a
  ``num_batches_tracked`` int64 scalar holding ``num_batches_tracked`` (Flax keeps no count;
  PyTorch reads it only when a BatchNorm's momentum is None, which CRM's are not). ``layer4``
  (never used by CRM) is written as placeholders, zero convs and fresh BatchNorms
  (``LAYER4_BLOCKS`` blocks of width ``LAYER4_WIDTH_FACTOR`` x layer3's, as the published
  ResNet-50), so that the published network loads the dict with ``strict=True``. Entries come
  as ``feats``, ``aspp_``, ``imnet``, grouped by module, each module's leaves in PyTorch's order
  (``load_state_dict`` does not depend on the order).

  Raises ``MappingError`` when ``variables`` does not fit ``CRM(config)``.
  """
  count = num_batches_tracked
  if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
    raise MappingError(f"num_batches_tracked must be a non-negative integer, "
                       f"not {num_batches_tracked!r}")
  try:
    ckpt.check_tree(variables, config, "variables")
  except ckpt.CheckpointError as e:
    raise MappingError(str(e)) from None
  entries = {}  # (PyTorch module, leaf) -> (the leaf's rank within its module, array)
  for tree in (variables, _layer4_variables(config)):
    for module, leaf, kind, axes, value in _torch_entries(tree):
      value = np.asarray(value, dtype=np.float32)
      entries[(module, leaf)] = (list(_LEAVES[kind]).index(leaf), np.ascontiguousarray(
          value if axes is None else value.transpose(axes)))
      if kind == BN:
        entries[(module, BN_COUNTER)] = (len(_LEAVES[BN]), np.array(count, dtype=np.int64))
  tops = list(dict.fromkeys(rule.torch.split(".")[0] for rule in _RULES))  # feats, aspp_, imnet

  def rank(key):
    return tops.index(key[0].split(".")[0]), _natural(key[0]), entries[key][0]

  return {f"{PREFIX}{module}.{leaf}": entries[(module, leaf)][1]
          for module, leaf in sorted(entries, key=rank)}


def infer_config(state: Mapping[str, np.ndarray]) -> ModelConfig:
  """Reads the architecture off a CRM state dict's shapes."""
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
  blocks: Dict[int, set] = {}
  for key in state:
    found = _translate(key.rpartition(".")[0], "torch")
    if found and {"s", "b"} <= set(found[1]):
      blocks.setdefault(found[1]["s"], set()).add(found[1]["b"])
  sizes, widths = [], []
  for stage in range(1, USED_STAGES + 1):
    widths.append(shape(f"encoder/layer{stage}_0/conv1")[0])  # Raises if the stage is missing.
    sizes.append(max(blocks[stage]) + 1)
  expansion = shape("encoder/layer1_0/conv3")[0] // widths[0]
  fusion = tuple(shape(f"fusion/{branch}/conv")[0] for _, branch in _FUSION_BRANCHES)
  feature_dim = shape("fusion/last_conv")[0]
  hidden = [shape("implicit_decoder/layers_0")[0]]  # Raises if the decoder is missing.
  while torch_key(f"implicit_decoder/layers_{len(hidden)}", "weight") in state:
    hidden.append(shape(f"implicit_decoder/layers_{len(hidden)}")[0])
  if hidden[-1] != 1:
    last = torch_key(f"implicit_decoder/layers_{len(hidden) - 1}", "weight")
    raise MappingError(f"{last} has {hidden[-1]} outputs; CRM's last layer has one")
  return ModelConfig(stem_width=conv1[0], stage_sizes=tuple(sizes),
                     stage_widths=tuple(widths), expansion=expansion,
                     fusion_widths=fusion, feature_dim=feature_dim,
                     decoder_hidden=tuple(hidden[:-1]))


def expected_keys(config: ModelConfig) -> Dict[str, Tuple[int, ...]]:
  """The keys CRM uses and their PyTorch shapes, for ``config`` (docs/model.md, docs/decoder.md).

  Without the ``module.`` prefix, ``layer4`` and ``num_batches_tracked``. Read off the Flax
  model's variables through the mapping tables.
  """
  keys = {}
  for module, leaf, _, axes, value in _torch_entries(ckpt.abstract_variables(config)):
    keys[f"{module}.{leaf}"] = tuple(value.shape[i] for i in axes) if axes else value.shape
  return keys


def check_keys(state: Mapping[str, np.ndarray], config: ModelConfig) -> None:
  """Raises ``MappingError`` naming the PyTorch keys that are missing,
  unexpected or of the wrong shape for ``config``."""
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
  """The cause of a ``torch.load(weights_only=True)`` failure in whole sentences on one line:
  for an unpickling refusal, the paragraph naming what was refused (not torch's advice about
  ``weights_only=False``, its issue-tracker line or its documentation link); otherwise the
  message's first line."""
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
  """Reads a ``.pth`` file: a state dict, or a dict holding one.

  Accepts ``{'state_dict': ...}``, ``{'model': ...}``, ``{'net': ...}`` or
  a plain state dict. Tensors become float32/int numpy arrays.
  """
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
    for wrapper in ("state_dict", "model", "net", "model_state_dict"):
      if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping) or not obj or not all(
      hasattr(v, "numpy") for v in obj.values()):
    raise MappingError(f"{path}: does not hold a state dict of tensors")
  return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def check_torch_target(path: str, overwrite: bool = False) -> None:
  """Raises unless a ``.pth`` file may be written at ``path``: ``CheckpointError`` for a folder,
  ``FileExistsError`` for an existing file without ``overwrite``."""
  if os.path.isdir(path):
    raise ckpt.CheckpointError(f"{path}: is a folder, not a file")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path}: already exists (pass overwrite to replace it)")


def save_torch_state_dict(path: str, state: Mapping[str, np.ndarray],
                          overwrite: bool = False) -> str:
  """Writes ``state`` (str -> numpy array) to ``path`` as a ``.pth`` file; returns ``path``.

  The file holds a flat dict of str -> ``torch.Tensor`` and nothing else (no pickled classes),
  so ``torch.load(path, weights_only=True)`` reads it. Written atomically
  (``crm_jax.io.atomic_write``): a temporary file in the same folder, flushed and fsynced, then
  renamed over ``path``; on any error neither a partial file nor the temporary one is left, and
  an existing ``path`` is untouched.

  Errors are one line naming ``path``: ``MappingError`` without PyTorch or for a value that is
  not an array, ``FileExistsError`` (exists, no ``overwrite``), ``CheckpointError`` when the
  file cannot be written.
  """
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
