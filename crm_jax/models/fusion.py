"""Multi-level fusion of the encoder features into F (``aspp_``, docs/model.md). NHWC."""

from typing import Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from crm_jax.models.encoder import batch_norm, conv
from crm_jax.ops import mask_valid, resize_bilinear_align_corners, resize_cols, resize_rows

DROPOUT_RATE = 0.5  # the published rate (every branch and the head).
FUSION_INPUTS = ("x1", "x2", "x3")


class Branch(nn.Module):
  """1x1 conv, BN, ReLU, then a second BN, ReLU and dropout."""

  features: int
  bn_axis_name: Optional[str] = None
  dropout_rate: float = DROPOUT_RATE

  def setup(self):
    self.conv = conv(self.features, 1, None)
    self.bn = batch_norm(None, self.bn_axis_name)
    self.post_bn = batch_norm(None, self.bn_axis_name)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.relu(self.bn(self.conv(x), use_running_average=not train))
    x = nn.relu(self.post_bn(x, use_running_average=not train))
    return self.dropout(x, deterministic=not train)


class Fusion(nn.Module):
  """Fuses ``x1``, ``x2``, ``x3`` into F ``[B, h, w, feature_dim]`` at x1's size (x2's and x3's
  branches resized with align_corners=True); dropout on every branch and the head in training."""

  branch_widths: Sequence[int] = (64, 64, 128)
  feature_dim: int = 256
  bn_axis_name: Optional[str] = None
  dropout_rate: float = DROPOUT_RATE

  def setup(self):
    if len(self.branch_widths) != len(FUSION_INPUTS):
      raise ValueError(f"branch_widths needs {len(FUSION_INPUTS)} entries")
    for key, width in zip(FUSION_INPUTS, self.branch_widths):
      setattr(self, f"branch_{key}", Branch(width, self.bn_axis_name, self.dropout_rate))
    self.last_conv = conv(self.feature_dim, 3, None)
    self.last_bn = batch_norm(None, self.bn_axis_name)
    self.dropout = nn.Dropout(self.dropout_rate)

  def branch(self, key: str, x: jax.Array, train: bool = False) -> jax.Array:
    """The branch of input ``key`` (``x1``, ``x2`` or ``x3``) at the input's size."""
    return getattr(self, f"branch_{key}")(x, train)

  def fuse(self, parts: Sequence[jax.Array], train: bool = False, tables=None,
           valid: Optional[jax.Array] = None) -> jax.Array:
    """F from the three branches at x1's size; ``tables``: None (static shapes) or x2's and x3's
    ``(rows, cols)`` resize tables; ``valid``: x1's region, masked before the 3x3 conv."""
    size = parts[0].shape[1:3]
    resized = [parts[0]]
    for k, part in enumerate(parts[1:]):
      if tables is None:
        resized.append(resize_bilinear_align_corners(part, size))
      else:
        rows, cols = tables[k]
        resized.append(resize_cols(resize_rows(part, rows), cols))
    x = jnp.concatenate(resized, axis=-1)
    if valid is not None:
      x = mask_valid(x, valid)
    return self.head(x, train)

  def __call__(self, feats: Dict[str, jax.Array], train: bool = False, tables=None,
               valid: Optional[jax.Array] = None) -> jax.Array:
    """F ``[B, h, w, feature_dim]`` from the encoder's named features."""
    parts = [self.branch(key, feats[key], train) for key in FUSION_INPUTS]
    return self.fuse(parts, train, tables, valid)

  def head(self, x: jax.Array, train: bool = False) -> jax.Array:
    """3x3 conv (padding 1), BN, ReLU, dropout on the concatenated branches."""
    x = self.last_bn(self.last_conv(x), use_running_average=not train)
    return self.dropout(nn.relu(x), deterministic=not train)
