"""The mapping between published PyTorch CRM keys and the Flax variables.

One auditable rename (key names: docs/model.md and docs/decoder.md; ``module.`` prefixes of
``nn.DataParallel`` are dropped): conv ``OIHW -> HWIO``, linear ``.T``, BN
``weight/bias -> scale/bias``, running statistics -> ``batch_stats``
``mean/var``. ``layer4`` (never used by CRM) and ``num_batches_tracked`` are
skipped and reported.

Works on plain numpy arrays; PyTorch is only needed to read ``.pth`` files
(``load_torch_state_dict``).
"""

import re
from typing import Dict, List, Mapping, Tuple

import numpy as np

from crm_jax.models.crm import ModelConfig

# Fusion module names: PyTorch -> Flax.
_FUSION = {
    "aspp1_128": "branch_x1",
    "aspp1_256": "branch_x2",
    "aspp1_1024": "branch_x3",
}
_FUSION_POST_BN = {"bn1_128": "branch_x1", "bn1_256": "branch_x2",
                   "bn1_1024": "branch_x3"}
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"),
              "running_var": ("batch_stats", "var")}
USED_STAGES = 3  # layer1-3; layer4 is skipped.


class MappingError(ValueError):
  """A state dict that is not a CRM checkpoint or does not fit the model."""


def strip_prefix(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Removes the ``module.`` prefix that ``nn.DataParallel`` adds."""
  out = {}
  for k, v in state.items():
    out[k[len("module."):] if k.startswith("module.") else k] = v
  return out


def _module_path(torch_module: str) -> Tuple[str, ...]:
  """Flax module path of a PyTorch module name (without the leaf)."""
  parts = torch_module.split(".")
  if parts[0] == "feats":
    if parts[1] in ("conv1", "bn1"):
      return ("encoder", parts[1])
    m = re.fullmatch(r"layer(\d)", parts[1])
    if m and len(parts) >= 4:
      block = f"{parts[1]}_{parts[2]}"
      if parts[3] == "downsample":
        name = {"0": "downsample_conv", "1": "downsample_bn"}[parts[4]]
        return ("encoder", block, name)
      return ("encoder", block, parts[3])
  elif parts[0] == "aspp_":
    if parts[1] in _FUSION:
      sub = {"atrous_conv": "conv", "bn": "bn"}[parts[2]]
      return ("fusion", _FUSION[parts[1]], sub)
    if parts[1] in _FUSION_POST_BN:
      return ("fusion", _FUSION_POST_BN[parts[1]], "post_bn")
    if parts[1] == "last_conv":
      return ("fusion", {"0": "last_conv", "1": "last_bn"}[parts[2]])
  elif parts[0] == "imnet" and parts[1] == "layers":
    index = int(parts[2])
    if index % 2:
      raise KeyError(torch_module)
    return ("implicit_decoder", f"layers_{index // 2}")
  raise KeyError(torch_module)


def _set(tree: dict, path: Tuple[str, ...], value: np.ndarray) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def is_skipped(key: str) -> bool:
  """Keys the port deliberately does not use."""
  return key.endswith("num_batches_tracked") or key.startswith("feats.layer4.")


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
    try:
      path = _module_path(module)
    except (KeyError, IndexError):
      unknown.append(key)
      continue
    value = np.asarray(value, dtype=np.float32)
    name = path[-1]
    is_linear = path[0] == "implicit_decoder"
    is_conv = not is_linear and ("conv" in name)
    if is_conv and leaf == "weight":
      if value.ndim != 4:
        raise MappingError(f"{key}: expected a 4-d conv weight, got shape {value.shape}")
      _set(variables["params"], path + ("kernel",), value.transpose(2, 3, 1, 0))
    elif is_linear and leaf in ("weight", "bias"):
      _set(variables["params"], path + ("kernel" if leaf == "weight" else "bias",),
           value.T if leaf == "weight" else value)
    elif not is_conv and not is_linear and leaf in _BN_LEAVES:
      collection, flax_leaf = _BN_LEAVES[leaf]
      _set(variables[collection], path + (flax_leaf,), value)
    else:
      unknown.append(key)
  if unknown:
    raise MappingError(f"unexpected keys (not CRM): {sorted(unknown)[:8]}"
                       f"{' ...' if len(unknown) > 8 else ''}")
  return variables, sorted(skipped)


def infer_config(state: Mapping[str, np.ndarray]) -> ModelConfig:
  """Reads the architecture off a CRM state dict's shapes."""
  state = strip_prefix(state)

  def shape(key):
    if key not in state:
      raise MappingError(f"missing key {key!r}: not a CRM checkpoint")
    return tuple(np.shape(state[key]))

  conv1 = shape("feats.conv1.weight")
  if len(conv1) != 4 or conv1[1] != 4 or conv1[2:] != (7, 7):
    raise MappingError(f"feats.conv1.weight has shape {conv1}; CRM needs [C, 4, 7, 7]")
  sizes, widths = [], []
  for stage in range(1, USED_STAGES + 1):
    blocks = {int(m.group(1)) for k in state
              for m in [re.match(rf"feats\.layer{stage}\.(\d+)\.", k)] if m}
    if not blocks:
      raise MappingError(f"missing feats.layer{stage}: not a CRM checkpoint")
    sizes.append(max(blocks) + 1)
    widths.append(shape(f"feats.layer{stage}.0.conv1.weight")[0])
  expansion = shape("feats.layer1.0.conv3.weight")[0] // widths[0]
  fusion = tuple(shape(f"aspp_.{n}.atrous_conv.weight")[0] for n in _FUSION)
  feature_dim = shape("aspp_.last_conv.0.weight")[0]
  hidden, i = [], 0
  while f"imnet.layers.{i}.weight" in state:
    hidden.append(shape(f"imnet.layers.{i}.weight")[0])
    i += 2
  if not hidden or hidden[-1] != 1:
    raise MappingError("imnet.layers: missing or not ending in one output")
  return ModelConfig(stem_width=conv1[0], stage_sizes=tuple(sizes),
                     stage_widths=tuple(widths), expansion=expansion,
                     fusion_widths=fusion, feature_dim=feature_dim,
                     decoder_hidden=tuple(hidden[:-1]))


def expected_keys(config: ModelConfig) -> Dict[str, Tuple[int, ...]]:
  """The keys CRM uses and their PyTorch shapes, for ``config`` (docs/model.md, docs/decoder.md).

  Without the ``module.`` prefix, ``layer4`` and ``num_batches_tracked``.
  """
  keys: Dict[str, Tuple[int, ...]] = {}

  def conv(name, out_ch, in_ch, k):
    keys[f"{name}.weight"] = (out_ch, in_ch, k, k)

  def bn(name, n):
    for leaf in _BN_LEAVES:
      keys[f"{name}.{leaf}"] = (n,)

  c = config
  conv("feats.conv1", c.stem_width, 4, 7)
  bn("feats.bn1", c.stem_width)
  in_ch = c.stem_width
  for spec in c.encoder_blocks():
    width, out_ch = spec.width, spec.width * spec.expansion
    block = f"feats.layer{spec.stage}.{spec.index}"
    for j, (o, n_in, k) in enumerate(((width, in_ch, 1), (width, width, 3),
                                      (out_ch, width, 1)), 1):
      conv(f"{block}.conv{j}", o, n_in, k)
      bn(f"{block}.bn{j}", o)
    if spec.downsample:
      conv(f"{block}.downsample.0", out_ch, in_ch, 1)
      bn(f"{block}.downsample.1", out_ch)
    in_ch = out_ch
  fusion_in = (c.stem_width, c.stage_widths[0] * c.expansion,
               c.stage_widths[-1] * c.expansion)
  for name, post, n_in, n_out in zip(_FUSION, _FUSION_POST_BN, fusion_in,
                                     c.fusion_widths):
    conv(f"aspp_.{name}.atrous_conv", n_out, n_in, 1)
    bn(f"aspp_.{name}.bn", n_out)
    bn(f"aspp_.{post}", n_out)
  conv("aspp_.last_conv.0", c.feature_dim, sum(c.fusion_widths), 3)
  bn("aspp_.last_conv.1", c.feature_dim)
  dims = (c.feature_dim + 6, *c.decoder_hidden, 1)
  for i in range(len(dims) - 1):
    keys[f"imnet.layers.{2 * i}.weight"] = (dims[i + 1], dims[i])
    keys[f"imnet.layers.{2 * i}.bias"] = (dims[i + 1],)
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
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise MappingError(f"{path}: not a readable PyTorch checkpoint ({first[:200]})") from None
  if isinstance(obj, Mapping):
    for wrapper in ("state_dict", "model", "net", "model_state_dict"):
      if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping) or not obj or not all(
      hasattr(v, "numpy") for v in obj.values()):
    raise MappingError(f"{path}: does not hold a state dict of tensors")
  return {k: v.detach().cpu().numpy() for k, v in obj.items()}
