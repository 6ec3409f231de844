"""PyTorch -> crm-jax checkpoint conversion (``convert_torch_weights.py``).

Two modes:
* ``convert_crm``: a published CRM checkpoint (a state dict, with or without
  ``module.`` prefixes, or a dict holding one) -> a model checkpoint.
* ``convert_imagenet``: torchvision's ImageNet ResNet-50 weights -> an initial
  CRM checkpoint for training: the encoder from torchvision with conv1's fourth
  input channel zero, the fusion and decoder freshly initialised.
"""

import os
import sys
from typing import Dict, List, Optional, Tuple

import jax
import numpy as np

from crm_jax import checkpoint as ckpt
from crm_jax.models.crm import CRM, RESNET50, ModelConfig, init_variables
from crm_jax.torch_mapping import (MappingError, infer_config, load_torch_state_dict,
                                   strip_prefix, torch_to_flax)

TORCHVISION_SKIPPED_PREFIXES = ("layer4.", "fc.")


def convert_state_dict(state: Dict[str, np.ndarray]) -> Tuple[ModelConfig, dict, List[str]]:
  """A CRM state dict -> ``(config, variables, skipped_keys)``, checked."""
  config = infer_config(state)
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
  layer4 = [k for k in skipped if ".layer4." in "." + k]
  batches = [k for k in skipped if k.endswith("num_batches_tracked")]
  log(f"read {len(state)} entries from {src}")
  log(f"skipped {len(layer4)} layer4 entries (never used by CRM) and "
      f"{len(batches)} num_batches_tracked buffers")
  ckpt.save_model(out_dir, variables, config,
                  meta={"source": os.path.abspath(src), "kind": "crm"},
                  overwrite=overwrite)
  log(f"wrote {out_dir}")
  return config, variables


def imagenet_to_variables(state: Dict[str, np.ndarray], seed: int = 0,
                          config: ModelConfig = RESNET50) -> Tuple[dict, List[str]]:
  """Initial CRM variables from a torchvision ResNet state dict."""
  state = strip_prefix(state)
  if "conv1.weight" not in state or "layer1.0.conv1.weight" not in state:
    raise MappingError("not a torchvision ResNet state dict (no conv1/layer1 keys)")
  conv1 = np.asarray(state["conv1.weight"], np.float32)
  if conv1.ndim != 4 or conv1.shape[1] != 3:
    raise MappingError(f"conv1.weight has shape {conv1.shape}; expected [C, 3, 7, 7]")
  renamed, skipped = {}, []
  for k, v in state.items():
    if k.startswith(TORCHVISION_SKIPPED_PREFIXES) or k.endswith("num_batches_tracked"):
      skipped.append(k)
      continue
    renamed["feats." + k] = v
  renamed["feats.conv1.weight"] = np.concatenate(
      [conv1, np.zeros_like(conv1[:, :1])], axis=1)
  encoder_vars, _ = torch_to_flax(renamed)
  fresh = jax.tree_util.tree_map(
      np.asarray, init_variables(CRM(config), jax.random.PRNGKey(seed)))
  for collection in ("params", "batch_stats"):
    got = encoder_vars[collection].get("encoder", {})
    want = fresh[collection]["encoder"]
    gp = ckpt.tree_paths(got)
    wp = ckpt.tree_paths(want)
    if set(gp) != set(wp):
      missing = sorted(set(wp) - set(gp))[:5]
      extra = sorted(set(gp) - set(wp))[:5]
      raise MappingError(f"encoder {collection} do not match: missing {missing}, "
                         f"unexpected {extra}")
    for k in wp:
      if np.shape(gp[k]) != np.shape(wp[k]):
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
