"""The encoder: a ResNet-50 with a 4-channel stem and a dilated third stage (docs/model.md).

NHWC; every padding explicit and symmetric, as PyTorch pads; no ``layer4``; names as PyTorch's."""

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from crm_jax.constants import BN_EPSILON, BN_MOMENTUM
from crm_jax.ops import mask_valid

# Per stage: (stride of block 0, dilation of block 0, dilation of later blocks);
# layer3 is dilated instead of strided (torchvision's replace_stride_with_dilation).
STAGE_LAYOUT = ((1, 1, 1), (2, 1, 1), (1, 1, 2))
# Spatial levels, indices into ``crm_jax.geometry`` sizes: the input, x1 (stride 2), x2 (4), x3 (8).
LEVEL_INPUT, LEVEL_X1, LEVEL_X2, LEVEL_X3 = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One bottleneck of the encoder: its submodule ``name`` (``layer{stage}_{index}``), the levels
  of its input and output, and whether its output is the stage's (``last_of_stage``)."""

  name: str
  stage: int  # 1-based, as in the PyTorch names.
  index: int
  width: int
  stride: int
  dilation: int
  expansion: int
  downsample: bool
  in_level: int
  out_level: int
  last_of_stage: bool

  def kind(self) -> tuple:
    """The fields that fix the block's computation (blocks of one kind share a compilation)."""
    return (self.width, self.stride, self.dilation, self.expansion, self.downsample)

  def bottleneck(self, bn_axis_name: Optional[str] = None) -> "Bottleneck":
    """The Flax module of this block (apply it on the block's sub-tree of the variables)."""
    return Bottleneck(*self.kind(), bn_axis_name=bn_axis_name)


def block_layout(stage_sizes: Sequence[int], stage_widths: Sequence[int],
                 expansion: int) -> Tuple[BlockSpec, ...]:
  """The encoder's bottlenecks in order: the one definition of the stage layout."""
  if len(stage_sizes) != len(STAGE_LAYOUT) or len(stage_widths) != len(STAGE_LAYOUT):
    raise ValueError("the CRM encoder has exactly three stages (layer1-3)")
  blocks = []
  level = LEVEL_X2
  for stage, (size, width) in enumerate(zip(stage_sizes, stage_widths), 1):
    stride, first_dilation, dilation = STAGE_LAYOUT[stage - 1]
    for i in range(size):
      block_stride = stride if i == 0 else 1
      out_level = level + (block_stride == 2)
      blocks.append(BlockSpec(
          name=f"layer{stage}_{i}", stage=stage, index=i, width=width,
          stride=block_stride, dilation=first_dilation if i == 0 else dilation,
          expansion=expansion, downsample=(i == 0),  # block 0 of every layer, as published
          in_level=level, out_level=out_level, last_of_stage=(i == size - 1)))
      level = out_level
  return tuple(blocks)


class BatchNorm(nn.Module):
  """BatchNorm as PyTorch trains it (docs/training.md, "BatchNorm"), with ``nn.BatchNorm``'s
  variables and, in inference, its exact bits. Training normalises with the biased variance and
  keeps the unbiased one (``n`` counts every device of ``axis_name``), in at least float32."""

  axis_name: Optional[str] = None
  # Flax's convention: running = momentum * running + (1 - momentum) * batch.
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    """``x`` ``[..., C]`` normalised per channel (the last axis)."""
    shape = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, jnp.float32))
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var, count = self._batch_statistics(x)
      if not self.is_initializing():
        unbiased = var * (count / max(count - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
    # The order of nn.BatchNorm's arithmetic (the same bits in inference).
    y = x - mean
    mul = jax.lax.rsqrt(var + self.epsilon)
    mul = mul * scale
    y = y * mul
    y = y + bias
    return jnp.asarray(y, jnp.result_type(x, scale, bias))

  def _batch_statistics(self, x: jax.Array):
    """``(mean, biased variance, n)`` per channel, also over ``axis_name`` once initialised."""
    axes = tuple(range(x.ndim - 1))
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    count = math.prod(x.shape[:-1])
    synced = self.axis_name is not None and not self.is_initializing()
    mean = jnp.mean(x, axes)
    if synced:  # Equal shares on every device: the mean of the means is the global mean.
      mean = jax.lax.pmean(mean, self.axis_name)
      count *= jax.lax.axis_size(self.axis_name)
    var = jnp.mean(jnp.square(x - mean), axes)
    if synced:
      var = jax.lax.pmean(var, self.axis_name)
    # One value per channel (PyTorch refuses it): the running variance takes the biased one.
    return mean, var, count


def batch_norm(name: Optional[str], axis_name: Optional[str]) -> BatchNorm:
  """The network's ``BatchNorm``; call it with ``use_running_average=not train``."""
  return BatchNorm(axis_name=axis_name, name=name)


def bn_relu(name: str, x: jax.Array, train: bool,
            axis_name: Optional[str], relu: bool = True) -> jax.Array:
  """BatchNorm (train: batch statistics; eval: running ones), then ReLU."""
  x = batch_norm(name, axis_name)(x, use_running_average=not train)
  return nn.relu(x) if relu else x


def conv(features: int, kernel: int, name: Optional[str], stride: int = 1,
         dilation: int = 1, padding: Optional[int] = None) -> nn.Conv:
  """A bias-free conv with symmetric explicit padding (``name`` None inside ``setup``)."""
  if padding is None:
    padding = dilation * (kernel // 2)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 kernel_dilation=(dilation, dilation), use_bias=False, name=name,
                 # He-normal (fan_out), as torchvision initialises ResNet convs.
                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


class Bottleneck(nn.Module):
  """ResNet bottleneck: 1x1 (w) -> 3x3 (w, stride, dilation) -> 1x1 (4w)."""

  width: int
  stride: int = 1
  dilation: int = 1
  expansion: int = 4
  downsample: bool = False
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               valid: Optional[jax.Array] = None) -> jax.Array:
    """``x`` ``[B, H, W, in]`` -> ``[B, H', W', 4w]``; ``valid``: ``ops.mask_valid``'s region
    of ``x``, outside which the 3x3 conv's input is zeroed (None: no masking)."""
    out_dim = self.width * self.expansion
    y = conv(self.width, 1, "conv1")(x)
    y = bn_relu("bn1", y, train, self.bn_axis_name)
    if valid is not None:
      y = mask_valid(y, valid)
    y = conv(self.width, 3, "conv2", stride=self.stride, dilation=self.dilation)(y)
    y = bn_relu("bn2", y, train, self.bn_axis_name)
    y = conv(out_dim, 1, "conv3")(y)
    y = bn_relu("bn3", y, train, self.bn_axis_name, relu=False)
    shortcut = x
    if self.downsample:
      shortcut = conv(out_dim, 1, "downsample_conv", stride=self.stride)(x)
      shortcut = bn_relu("downsample_bn", shortcut, train, self.bn_axis_name, relu=False)
    return nn.relu(y + shortcut)


class Encoder(nn.Module):
  """``[B, H, W, 4]`` -> ``{"x1": stride 2, stem_width; "x2": stride 4, 4*w1; "x3": stride 8,
  4*w3}``. ``valid`` maps a level to its ``ops.mask_valid`` region (None: no masking);
  ``stem`` and ``block`` are the pieces the banded plan applies one at a time."""

  stem_width: int
  blocks: Tuple[BlockSpec, ...]
  bn_axis_name: Optional[str] = None

  def setup(self):
    self.conv1 = conv(self.stem_width, 7, None, stride=2, padding=3)
    self.bn1 = batch_norm(None, self.bn_axis_name)
    for spec in self.blocks:
      setattr(self, spec.name, spec.bottleneck(self.bn_axis_name))

  def stem(self, x: jax.Array, train: bool = False,
           valid: Optional[Dict[int, jax.Array]] = None):
    """conv1, bn1, ReLU, then the 3x3/2 max-pool: ``(x1, pooled)``."""
    x1 = nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    if valid is not None:
      x1 = mask_valid(x1, valid[LEVEL_X1])
    pooled = nn.max_pool(x1, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # -inf padding
    if valid is not None:
      pooled = mask_valid(pooled, valid[LEVEL_X2])
    return x1, pooled

  def block(self, spec: BlockSpec, y: jax.Array, train: bool = False,
            valid: Optional[jax.Array] = None) -> jax.Array:
    """The bottleneck ``spec`` on ``y``; ``valid``: its input's region."""
    return getattr(self, spec.name)(y, train, valid)

  def __call__(self, x: jax.Array, train: bool = False,
               valid: Optional[Dict[int, jax.Array]] = None) -> Dict[str, jax.Array]:
    x1, y = self.stem(x, train, valid)
    feats: Dict[str, Any] = {"x1": x1}
    for spec in self.blocks:
      y = self.block(spec, y, train, None if valid is None else valid[spec.in_level])
      if spec.stage == 1 and spec.last_of_stage:
        feats["x2"] = y
    feats["x3"] = y
    return feats
