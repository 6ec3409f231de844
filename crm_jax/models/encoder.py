"""The encoder: a ResNet-50 with a 4-channel stem and a dilated third stage.

Spec section 2. Layouts are NHWC. Every padding is explicit and symmetric, as
PyTorch pads (XLA's 'SAME' pads a stride-2 conv asymmetrically). ``layer4`` of
the published network is never used by CRM, so it is not built here.

Flax submodule names mirror the PyTorch keys (``feats.layer1.0.conv1`` ->
``encoder/layer1_0/conv1``) so that ``crm_jax.torch_mapping`` stays mechanical.
"""

from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from crm_jax.constants import BN_EPSILON, BN_MOMENTUM
from crm_jax.ops import mask_valid

# Per stage: (stride of block 0, dilation of block 0, dilation of later blocks).
STAGE_LAYOUT = ((1, 1, 1), (2, 1, 1), (1, 1, 2))

# He-normal (fan_out, as torchvision initialises ResNet convs).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(name: Optional[str], axis_name: Optional[str]) -> nn.BatchNorm:
  """PyTorch-equivalent BatchNorm; ``axis_name`` synchronises statistics.

  Call it with ``use_running_average=not train``.
  """
  return nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      axis_name=axis_name, name=name)


def bn_relu(name: str, x: jax.Array, train: bool,
            axis_name: Optional[str], relu: bool = True) -> jax.Array:
  """BatchNorm (train: batch statistics; eval: running ones), then ReLU."""
  x = batch_norm(name, axis_name)(x, use_running_average=not train)
  return nn.relu(x) if relu else x


def conv(features: int, kernel: int, name: Optional[str], stride: int = 1,
         dilation: int = 1, padding: Optional[int] = None) -> nn.Conv:
  """A bias-free conv with symmetric explicit padding (PyTorch semantics).

  ``name`` is None inside ``setup``, where the attribute names the module.
  """
  if padding is None:
    padding = dilation * (kernel // 2)
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      kernel_dilation=(dilation, dilation),
      use_bias=False,
      kernel_init=conv_init,
      name=name,
  )


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 max-pool, stride 2, padding 1 with -inf (PyTorch ``MaxPool2d``)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


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
    """``x`` ``[B, H, W, in]`` -> ``[B, H', W', 4w]``.

    ``valid`` (int32 ``[3]``, ``(row0, h, w)``, see ``ops.mask_valid``) marks
    the valid region of ``x``; the 3x3 conv's input is zeroed outside it, so
    the valid outputs equal those of the unpadded input. None: no masking.
    """
    out_dim = self.width * self.expansion
    y = conv(self.width, 1, "conv1")(x)
    y = bn_relu("bn1", y, train, self.bn_axis_name)
    if valid is not None:
      y = mask_valid(y, valid)
    y = conv(self.width, 3, "conv2", stride=self.stride,
             dilation=self.dilation)(y)
    y = bn_relu("bn2", y, train, self.bn_axis_name)
    y = conv(out_dim, 1, "conv3")(y)
    y = bn_relu("bn3", y, train, self.bn_axis_name, relu=False)
    if self.downsample:
      shortcut = conv(out_dim, 1, "downsample_conv", stride=self.stride)(x)
      shortcut = bn_relu("downsample_bn", shortcut, train, self.bn_axis_name,
                         relu=False)
    else:
      shortcut = x
    return nn.relu(y + shortcut)


class Encoder(nn.Module):
  """ResNet encoder returning the features CRM reads, by name.

  Input: ``[B, H, W, 4]`` (normalised RGB + seg). Output dict:
    ``x1``: ``[B, H1, W1, stem_width]`` after conv1/bn1/ReLU (stride 2),
    ``x2``: ``[B, H2, W2, 4*w1]`` after layer1 (stride 4),
    ``x3``: ``[B, H3, W3, 4*w3]`` after layer3 (stride 8, layer3 dilated).
  With ``Hk = floor((H_{k-1} - 1) / 2) + 1`` for every stride-2 step.
  """

  stem_width: int = 64
  stage_sizes: Sequence[int] = (3, 4, 6)
  stage_widths: Sequence[int] = (64, 128, 256)
  expansion: int = 4
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
    if len(self.stage_sizes) != 3 or len(self.stage_widths) != 3:
      raise ValueError("the CRM encoder has exactly three stages (layer1-3)")
    x = conv(self.stem_width, 7, "conv1", stride=2, padding=3)(x)
    x1 = bn_relu("bn1", x, train, self.bn_axis_name)
    y = max_pool_3x3_s2(x1)
    feats: Dict[str, Any] = {"x1": x1}
    for stage, (size, width) in enumerate(zip(self.stage_sizes,
                                              self.stage_widths)):
      stride, first_dilation, dilation = STAGE_LAYOUT[stage]
      for i in range(size):
        y = Bottleneck(
            width=width,
            stride=stride if i == 0 else 1,
            dilation=first_dilation if i == 0 else dilation,
            expansion=self.expansion,
            downsample=(i == 0),  # block 0 of every layer, as published
            bn_axis_name=self.bn_axis_name,
            name=f"layer{stage + 1}_{i}",
        )(y, train)
      if stage == 0:
        feats["x2"] = y
    feats["x3"] = y
    return feats
