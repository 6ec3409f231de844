"""Multi-level fusion of the encoder features into the feature map F.

Spec section 3 (``module.aspp_`` upstream, "ASPP_no4level"; no atrous rates are
in effect). Layouts are NHWC.
"""

from typing import Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from crm_jax.models.encoder import batch_norm, conv
from crm_jax.ops import resize_bilinear_align_corners

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
  """Fuses ``x1``, ``x2``, ``x3`` into F ``[B, h, w, feature_dim]``.

  ``(h, w)`` is the spatial size of ``x1`` (stride 2 of the network input);
  the ``x2`` and ``x3`` branches are resized to it, bilinear with
  align_corners=True, and concatenated in that order before a 3x3 conv.
  ``dropout_rate`` acts on every branch and on the head, in training only.
  """

  branch_widths: Sequence[int] = (64, 64, 128)
  feature_dim: int = 256
  bn_axis_name: Optional[str] = None
  dropout_rate: float = DROPOUT_RATE

  def setup(self):
    if len(self.branch_widths) != len(FUSION_INPUTS):
      raise ValueError(f"branch_widths needs {len(FUSION_INPUTS)} entries")
    widths = dict(zip(FUSION_INPUTS, self.branch_widths))
    self.branch_x1 = Branch(widths["x1"], self.bn_axis_name, self.dropout_rate)
    self.branch_x2 = Branch(widths["x2"], self.bn_axis_name, self.dropout_rate)
    self.branch_x3 = Branch(widths["x3"], self.bn_axis_name, self.dropout_rate)
    self.last_conv = conv(self.feature_dim, 3, None)
    self.last_bn = batch_norm(None, self.bn_axis_name)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, feats: Dict[str, jax.Array], train: bool = False) -> jax.Array:
    return self.head(self.concat_branches(feats, train), train)

  def concat_branches(self, feats: Dict[str, jax.Array],
                      train: bool = False) -> jax.Array:
    """The three branches at x1's size, concatenated: ``[B, h, w, sum(widths)]``."""
    size = feats["x1"].shape[1:3]
    branches = (self.branch_x1, self.branch_x2, self.branch_x3)
    outs = [
        resize_bilinear_align_corners(branch(feats[key], train), size)
        for key, branch in zip(FUSION_INPUTS, branches)
    ]
    return jnp.concatenate(outs, axis=-1)

  def head(self, x: jax.Array, train: bool = False) -> jax.Array:
    """3x3 conv (padding 1), BN, ReLU, dropout on the concatenated branches."""
    x = self.last_bn(self.last_conv(x), use_running_average=not train)
    return self.dropout(nn.relu(x), deterministic=not train)
