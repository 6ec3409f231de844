"""Model checkpoints: ``DIR/config.json`` (``{"format": "crm-jax-model", "model", "meta"}``) and
``DIR/variables/`` (orbax), written atomically; a training workdir's ``model/`` is read too."""

import hashlib
import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from crm_jax.outputs import folder_written_atomically
from crm_jax.models.crm import CRM, ModelConfig, init_variables
from crm_jax.scales import check_min_side

FORMAT = "crm-jax-model"
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"
EXPORT_DIR = "model"  # train.py exports its final model to WORKDIR/model.


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or written, or does not fit the model."""


def abstract_variables(config: ModelConfig):
  """Shapes and dtypes of the variables of ``CRM(config)``, without computing."""
  return jax.eval_shape(lambda: init_variables(CRM(config), jax.random.PRNGKey(0)))


def tree_paths(tree) -> Dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): leaf for p, leaf in flat}


def check_tree(variables, config: ModelConfig, source: str) -> None:
  """Raises ``CheckpointError`` unless ``variables`` matches ``CRM(config)``."""
  want, have = tree_paths(abstract_variables(config)), tree_paths(variables)
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    raise CheckpointError(
        f"{source}: variables do not match the model: missing {missing[:5]}"
        f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
        f"{'...' if len(extra) > 5 else ''}")
  for k, leaf in have.items():
    if tuple(np.shape(leaf)) != tuple(want[k].shape):
      raise CheckpointError(f"{source}: {k} has shape {tuple(np.shape(leaf))}, "
                            f"the model needs {tuple(want[k].shape)}")


def save_model(path: str, variables, config: ModelConfig,
               meta: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> str:
  """Writes a checkpoint folder atomically; returns its path (existing: needs ``overwrite``)."""
  path = os.path.abspath(path)
  check_tree(variables, config, path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise CheckpointError(f"{path}: is a file, not a checkpoint folder")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path}: already exists (pass overwrite to replace it)")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.access(os.path.dirname(path), os.W_OK):
      raise PermissionError(13, "Permission denied")
  except OSError as e:
    raise CheckpointError(f"{path}: cannot be written ({e.strerror or e})") from None
  variables = jax.tree_util.tree_map(np.asarray, jax.device_get(variables))
  with folder_written_atomically(path) as tmp:
    # This process alone (only one exports; orbax would wait for the others at its barriers).
    me = jax.process_index()
    checkpointer = ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}))
    checkpointer.save(os.path.join(tmp, VARIABLES_DIR), variables)
    checkpointer.wait_until_finished()
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump({"format": FORMAT, "model": config.to_dict(), "meta": meta or {}}, f, indent=2)
  return path


def fingerprint(config: ModelConfig, variables) -> str:
  """``sha256:<hex>`` of the architecture and every variable's path, dtype, shape and bytes."""
  h = hashlib.sha256(json.dumps(config.architecture(), sort_keys=True).encode())
  leaves = tree_paths(jax.device_get(variables))
  for key in sorted(leaves):
    leaf = np.ascontiguousarray(leaves[key])
    h.update(f"\n{key} {leaf.dtype.str} {leaf.shape}\n".encode())
    h.update(leaf.tobytes())
  return "sha256:" + h.hexdigest()


def resolve(path: str) -> str:
  """``path``, or ``path/model`` when ``path`` is a training workdir."""
  path = os.path.abspath(path)
  exported = os.path.join(path, EXPORT_DIR)
  return (exported if not os.path.isfile(os.path.join(path, CONFIG_FILE))
          and os.path.isfile(os.path.join(exported, CONFIG_FILE)) else path)


def read_config(path: str) -> Tuple[ModelConfig, Dict[str, Any]]:
  """The model config and metadata of a model checkpoint directory."""
  path = resolve(path)
  cfg_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such checkpoint directory")
  try:
    with open(cfg_file) as f:
      blob = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{cfg_file}: not a crm-jax checkpoint config ({e})") from None
  if blob.get("format") != FORMAT or "model" not in blob:
    raise CheckpointError(f"{cfg_file}: not a crm-jax model checkpoint")
  try:
    config = ModelConfig.from_dict(blob["model"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{cfg_file}: bad model config ({e})") from None
  return config, blob.get("meta", {})


def recommended_min_side(path: str) -> int:
  """``meta["refine"]["min_side"]`` of the checkpoint at ``path``, else 0 (the published loop)."""
  refine = read_config(path)[1].get("refine", {})
  try:
    if not isinstance(refine, dict):
      raise ValueError(f"expected {{\"min_side\": N}}, got {refine!r}")
    return check_min_side(refine.get("min_side", 0))
  except ValueError as e:
    raise CheckpointError(f"{os.path.join(resolve(path), CONFIG_FILE)}: bad refine.min_side "
                          f"({e})") from None


def resolve_min_side(min_side: Optional[int], path: str) -> Tuple[int, Optional[str]]:
  """``(min_side, note)``: the caller's (checked), else the checkpoint's, noted unless it is 0."""
  if min_side is not None:
    return check_min_side(min_side), None
  value = recommended_min_side(path)
  return value, (f"{path} recommends min_side {value}: the leading scales at which an image's "
                 f"shorter side is below {value} px are left out (small images only; "
                 f"--min-side 0 runs the published loop)" if value else None)


def load_model(path: str) -> Tuple[ModelConfig, Dict[str, Any]]:
  """``(config, {'params', 'batch_stats'} of numpy arrays)`` of a model checkpoint directory."""
  path = resolve(path)
  config, _ = read_config(path)
  var_dir = os.path.join(path, VARIABLES_DIR)
  if not os.path.isdir(var_dir):
    raise CheckpointError(f"{var_dir}: missing (incomplete checkpoint)")
  try:
    variables = ocp.StandardCheckpointer().restore(var_dir, abstract_variables(config))
  except Exception as e:  # orbax raises many types; report one line.
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{var_dir}: cannot restore the variables ({msg})") from None
  check_tree(variables, config, path)
  return config, variables
