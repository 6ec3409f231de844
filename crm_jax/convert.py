"""PyTorch <-> crm-jax weights (``crm-convert``; keys: ``crm_jax.torch_mapping``; docs/model.md):
published CRM checkpoints and torchvision's ResNet-50 in, the published layout out."""

import importlib
import os
from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax import checkpoint as ckpt
from crm_jax.models.crm import CRM, RESNET50, ModelConfig, init_variables
from crm_jax.ops import make_coord
from crm_jax.torch_mapping import (LAYER4_STAGE, MappingError, check_keys, check_torch_target,
                                   flax_to_torch, infer_config, load_torch_state_dict,
                                   save_torch_state_dict, strip_prefix, torch_to_flax)

TORCHVISION_SKIPPED_PREFIXES = ("layer4.", "fc.")


def convert_state_dict(state: Dict[str, np.ndarray]) -> Tuple[ModelConfig, dict, List[str]]:
  """A CRM state dict (numpy, PyTorch layout) -> ``(config, variables, skipped_keys)``,
  checked against the architecture read off it."""
  config = infer_config(state)
  check_keys(state, config)
  variables, skipped = torch_to_flax(state)
  try:
    ckpt.check_tree(variables, config, "state dict")
  except ckpt.CheckpointError as e:
    raise MappingError(str(e)) from None
  return config, variables, skipped


def convert_crm(src: str, out_dir: str, overwrite: bool = False,
                log=print) -> Tuple[ModelConfig, dict]:
  """Converts a PyTorch CRM checkpoint file into a model checkpoint directory."""
  state = load_torch_state_dict(src)
  try:
    config, variables, skipped = convert_state_dict(state)
  except MappingError as e:
    raise MappingError(f"{src}: {e}") from None
  log(f"read {len(state)} entries from {src}")
  log(f"skipped {sum('.layer4.' in '.' + k for k in skipped)} layer4 entries (never used by CRM) "
      f"and {sum(k.endswith('num_batches_tracked') for k in skipped)} num_batches_tracked buffers")
  ckpt.save_model(out_dir, variables, config, meta={"source": os.path.abspath(src), "kind": "crm"},
                  overwrite=overwrite)
  log(f"wrote {out_dir}")
  return config, variables


def imagenet_to_variables(state: Dict[str, np.ndarray], seed: int = 0,
                          config: ModelConfig = RESNET50) -> Tuple[dict, List[str]]:
  """A torchvision ResNet state dict -> ``(variables, skipped_keys)``: CRM's encoder from it
  (conv1's 4th input channel zero), the rest initialised with ``seed``."""
  state = strip_prefix(state)
  if "conv1.weight" not in state or "layer1.0.conv1.weight" not in state:
    raise MappingError("not a torchvision ResNet state dict (no conv1/layer1 keys)")
  conv1 = np.asarray(state["conv1.weight"], np.float32)
  if conv1.ndim != 4 or conv1.shape[1] != 3:
    raise MappingError(f"conv1.weight has shape {conv1.shape}; expected [C, 3, 7, 7]")
  skip = lambda k: k.startswith(TORCHVISION_SKIPPED_PREFIXES) or k.endswith("num_batches_tracked")
  skipped = [k for k in state if skip(k)]
  renamed = {"feats." + k: v for k, v in state.items() if not skip(k)}
  renamed["feats.conv1.weight"] = np.concatenate([conv1, np.zeros_like(conv1[:, :1])], axis=1)
  encoder_vars, _ = torch_to_flax(renamed)
  fresh = jax.tree_util.tree_map(np.asarray, init_variables(CRM(config), jax.random.PRNGKey(seed)))
  for collection in ("params", "batch_stats"):
    got = encoder_vars[collection].get("encoder", {})
    gp, wp = ckpt.tree_paths(got), ckpt.tree_paths(fresh[collection]["encoder"])
    missing, extra = sorted(set(wp) - set(gp))[:5], sorted(set(gp) - set(wp))[:5]
    if missing or extra:
      raise MappingError(f"encoder {collection} do not match: missing {missing}, "
                         f"unexpected {extra}")
    for k in (k for k in wp if np.shape(gp[k]) != np.shape(wp[k])):
      raise MappingError(f"encoder {collection}{k}: shape {np.shape(gp[k])}, "
                         f"expected {np.shape(wp[k])}")
    fresh[collection]["encoder"] = got
  return fresh, sorted(skipped)


def convert_imagenet(src: str, out_dir: str, seed: int = 0, overwrite: bool = False,
                     log=print) -> dict:
  """torchvision ``resnet50-*.pth`` -> an initial CRM model checkpoint."""
  state = load_torch_state_dict(src)
  try:
    variables, skipped = imagenet_to_variables(state, seed)
  except MappingError as e:
    raise MappingError(f"{src}: {e}") from None
  log(f"read {len(state)} entries from {src}; skipped {len(skipped)} "
      f"(layer4, fc, num_batches_tracked); conv1's 4th channel set to zero; "
      f"fusion and decoder initialised with seed {seed}")
  ckpt.save_model(out_dir, variables, RESNET50,
                  meta={"source": os.path.abspath(src), "kind": "imagenet-init",
                        "seed": seed}, overwrite=overwrite)
  log(f"wrote {out_dir}")
  return variables


def export_torch(checkpoint_dir: str, out_path: str, overwrite: bool = False,
                 log=print) -> Dict[str, np.ndarray]:
  """A model checkpoint or workdir -> a ``.pth`` in the published layout; returns the state.
  ``num_batches_tracked`` holds the checkpoint's ``meta["step"]`` (else 0)."""
  check_torch_target(out_path, overwrite)  # Before the work.
  config, variables = ckpt.load_model(checkpoint_dir)
  steps = ckpt.read_config(checkpoint_dir)[1].get("step", 0)
  try:
    state = flax_to_torch(variables, config, num_batches_tracked=steps)
  except MappingError as e:
    raise MappingError(f"{ckpt.resolve(checkpoint_dir)}: {e}") from None
  save_torch_state_dict(out_path, state, overwrite=overwrite)
  layer4 = sum(k.startswith(f"module.feats.layer{LAYER4_STAGE}.") for k in state)
  log(f"wrote {out_path}: {len(state)} tensors in the published layout ({layer4} of them "
      f"placeholders for layer4, never used by CRM), num_batches_tracked {steps}")
  return state


def _torch_reference():
  """``crm_jax.torch_reference``, or a MappingError saying that PyTorch is needed."""
  try:
    return importlib.import_module("crm_jax.torch_reference")
  except ImportError as e:
    raise MappingError(f"verifying a conversion: {e}") from None


def verify_conversion(torch_ckpt_path: str, converted_dir: str, seed: int = 0,
                      size: Tuple[int, int] = (61, 47)) -> float:
  """Largest ``|logit difference|`` between the PyTorch reference holding the original and the
  converted model, in eval mode on a random ``[1, H, W, 4]``: every pixel centre and 1000 points."""
  reference = _torch_reference()
  torch = reference.torch
  config, variables = ckpt.load_model(converted_dir)
  state = strip_prefix(load_torch_state_dict(torch_ckpt_path))
  # The state dict sizes the unused layer4; the converted config all the rest.
  net = reference.TorchCRM(**{**reference.config_from_state_dict(state),
                              **config.architecture()}).eval()
  try:
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
  except RuntimeError as e:
    msg = " ".join(str(e).split())
    raise MappingError(f"{torch_ckpt_path}: does not load into the PyTorch "
                       f"reference ({msg[:300]})") from None
  rng, (h, w) = np.random.default_rng(seed), size
  x = rng.normal(size=(1, h, w, 4)).astype(np.float32)
  coord = np.concatenate([np.asarray(make_coord((h, w))).reshape(1, -1, 2),
                          rng.uniform(-1, 1, size=(1, 1000, 2)).astype(np.float32)], axis=1)
  cell = np.broadcast_to(np.asarray([2 / h, 2 / w], np.float32), coord.shape).copy()
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
               torch.from_numpy(coord), torch.from_numpy(cell)).numpy()
  got = CRM(config).apply(variables, jnp.asarray(x), jnp.asarray(coord), jnp.asarray(cell))
  return float(np.max(np.abs(np.asarray(got) - want)))
