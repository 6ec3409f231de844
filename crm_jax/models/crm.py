"""The CRM network: ``[B, H, W, 4]`` -> encoder -> fusion -> F -> implicit decoder (NHWC)."""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from crm_jax.models.encoder import LEVEL_X1, BlockSpec, Encoder, block_layout
from crm_jax.models.fusion import DROPOUT_RATE, Fusion
from crm_jax.models.implicit_decoder import ImplicitDecoder


# ModelConfig fields that act in training only (no parameter, no inference output depends on them).
TRAINING_ONLY_FIELDS = ("dropout_rate",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a CRM network (the published one by default)."""

  stem_width: int = 64
  stage_sizes: Tuple[int, ...] = (3, 4, 6)
  stage_widths: Tuple[int, ...] = (64, 128, 256)
  expansion: int = 4
  fusion_widths: Tuple[int, ...] = (64, 64, 128)
  feature_dim: int = 256
  decoder_hidden: Tuple[int, ...] = (32, 32, 32, 32)
  # Dropout of the fusion branches and head in training (the published 0.5 by default).
  dropout_rate: float = DROPOUT_RATE

  def encoder_blocks(self) -> Tuple[BlockSpec, ...]:
    """The encoder's bottlenecks in order (``encoder.block_layout``)."""
    return block_layout(self.stage_sizes, self.stage_widths, self.expansion)

  def to_dict(self) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  def architecture(self) -> Dict[str, Any]:
    """``to_dict()`` without the training-only fields: what fixes the parameters and outputs."""
    return {k: v for k, v in self.to_dict().items() if k not in TRAINING_ONLY_FIELDS}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown model config fields: {sorted(unknown)}")
    return cls(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()})


# The published ResNet-50 setting.
RESNET50 = ModelConfig()
# A small variant for tests and the bundled demo (trains on a CPU in minutes).
SMALL = ModelConfig(stem_width=16, stage_sizes=(1, 1, 2), stage_widths=(16, 32, 64),
                    fusion_widths=(16, 16, 32), feature_dim=64)
# A tiny variant for fast unit tests.
TINY = ModelConfig(stem_width=8, stage_sizes=(1, 1, 2), stage_widths=(8, 16, 32),
                   fusion_widths=(8, 8, 16), feature_dim=32)


class CRM(nn.Module):
  """Continuous Refinement Model; ``bn_axis_name`` synchronises BatchNorm over a pmap axis."""

  config: ModelConfig = RESNET50
  bn_axis_name: Optional[str] = None

  def setup(self):
    c = self.config
    self.encoder = Encoder(c.stem_width, c.encoder_blocks(), self.bn_axis_name)
    self.fusion = Fusion(tuple(c.fusion_widths), c.feature_dim, self.bn_axis_name, c.dropout_rate)
    self.implicit_decoder = ImplicitDecoder(c.feature_dim, tuple(c.decoder_hidden))

  def features(self, x: jax.Array, train: bool = False, valid=None, tables=None) -> jax.Array:
    """F ``[B, h, w, feature_dim]`` of ``[B, H, W, 4]``; ``valid``/``tables``: the bucketed
    plans' regions and resize tables (``Encoder``, ``Fusion.fuse``), None for true shapes."""
    feats = self.encoder(x, train, valid)
    return self.fusion(feats, train, tables, None if valid is None else valid[LEVEL_X1])

  def __call__(self, x: jax.Array, coord: jax.Array, cell: jax.Array,
               train: bool = False, return_indices: bool = False):
    """Logits ``[B, Q]`` at queries ``coord`` ``[B, Q, 2]`` with ``cell``."""
    return self.implicit_decoder(self.features(x, train), coord, cell,
                                 return_indices=return_indices)

  def project(self, feature_map: jax.Array) -> jax.Array:
    """First decoder layer's feature part on F: ``[B, h, w, hidden[0]]``."""
    return self.implicit_decoder.project(feature_map)

  def decode_grid(self, projected: jax.Array, rows: jax.Array,
                  target_size: Tuple[int, int]) -> jax.Array:
    return self.implicit_decoder.decode_grid(projected, rows, target_size)


def init_variables(model: CRM, rng: jax.Array, size: int = 32):
  """Fresh variables ``{'params', 'batch_stats'}`` of ``model``."""
  x = jnp.zeros((1, size, size, 4), jnp.float32)
  coord = jnp.zeros((1, 1, 2), jnp.float32)
  return model.init(rng, x, coord, coord)
