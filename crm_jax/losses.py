"""Training loss and IoU counts of CRM (docs/training.md).

Layouts are NHWC. ``logits``, ``gt``, ``seg`` and ``prob`` are ``[B, H, W, 1]``
float32; ``gt`` is the soft mask in [0, 1], ``seg`` the coarse input in [-1, 1].
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from crm_jax.constants import SOBEL_EPS
from crm_jax.constants import TRAIN_GT_THRESHOLD
from crm_jax.constants import TRAIN_PROB_THRESHOLD
from crm_jax.constants import TRAIN_SEG_THRESHOLD

# Cross-correlation kernels, indexed [row (H), column (W)].
_SOBEL_KX = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
_SOBEL_KY = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))
_SOBEL_SCALE = 4.0


def _windows3x3(x: jax.Array):
  """The nine shifted views of ``x`` ``[B, H, W, C]`` zero-padded by 1.

  Yields ``(i, j, view)`` with ``view[:, h, w] == x_padded[:, h + i, w + j]``.
  """
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  for i in range(3):
    for j in range(3):
      yield i, j, xp[:, i:i + h, j:j + w, :]


def sobel(x: jax.Array) -> jax.Array:
  """Smoothed Sobel gradient magnitude of ``x`` ``[B, H, W, C]`` (per channel).

  A 3x3 average pool (stride 1, zero padding 1, padding counted: the 3x3 sum
  divided by 9), then cross-correlation with ``kx`` and ``ky`` (each / 4, zero
  padding 1), then ``sqrt(gx**2 + gy**2 + SOBEL_EPS)``. Same shape as ``x``.

  Written with shifted slices rather than convolutions, so the result is exact
  float32 arithmetic on every backend (no TF32 convolutions on GPUs).
  """
  pooled = sum(view for _, _, view in _windows3x3(x)) / 9.0
  gx = jnp.zeros_like(pooled)
  gy = jnp.zeros_like(pooled)
  for i, j, view in _windows3x3(pooled):
    if _SOBEL_KX[i][j]:
      gx = gx + (_SOBEL_KX[i][j] / _SOBEL_SCALE) * view
    if _SOBEL_KY[i][j]:
      gy = gy + (_SOBEL_KY[i][j] / _SOBEL_SCALE) * view
  return jnp.sqrt(gx * gx + gy * gy + SOBEL_EPS)


def crm_loss(
    logits: jax.Array,
    gt: jax.Array,
    *,
    ce_weight: float,
    l1_weight: float,
    l2_weight: float,
    grad_weight: float,
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The CRM training loss.

  ``total = ce_weight * ce + l1_weight * l1 + l2_weight * l2 + grad_weight *
  grad`` with, for ``p = sigmoid(logits)``:
    ce: mean binary cross-entropy with logits against ``gt > 0.5`` (as float);
    l1: mean ``|p - gt|``; l2: mean ``(p - gt)**2``;
    grad: mean ``|sobel(gt) - sobel(p)|``.
  The published command uses weights ce 1.0, l1 0.5, l2 0.5, grad 2.0.

  Args:
    logits: ``[B, H, W, 1]`` logits (computed in float32, or float64 for float64 logits).
    gt: ``[B, H, W, 1]`` soft ground truth in [0, 1].
    ce_weight, l1_weight, l2_weight, grad_weight: the weights of the parts.

  Returns:
    ``(total, parts)``: the scalar loss, and a dict of the unweighted scalar
    parts ``ce``, ``l1``, ``l2``, ``grad`` plus ``total``.
  """
  dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float32 (float64 in x64 parity tests)
  logits = logits.astype(dtype)
  gt = gt.astype(dtype)
  p = jax.nn.sigmoid(logits)
  target = (gt > TRAIN_GT_THRESHOLD).astype(dtype)
  diff = p - gt
  parts = {
      'ce': jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target)),
      'l1': jnp.mean(jnp.abs(diff)),
      'l2': jnp.mean(diff * diff),
      'grad': jnp.mean(jnp.abs(sobel(gt) - sobel(p))),
  }
  total = (ce_weight * parts['ce'] + l1_weight * parts['l1'] +
           l2_weight * parts['l2'] + grad_weight * parts['grad'])
  parts['total'] = total
  return total, parts


def _intersection_union(mask: jax.Array, gt_mask: jax.Array):
  intersection = jnp.sum(mask & gt_mask, dtype=jnp.int32)
  union = jnp.sum(mask | gt_mask, dtype=jnp.int32)
  return intersection, union


def iou_counts(seg: jax.Array, prob: jax.Array, gt: jax.Array) -> Dict[str, jax.Array]:
  """Intersection and union pixel counts summed over the whole batch.

  The input seg is thresholded ``seg > 0.5`` on its [-1, 1] values (the
  published quirk: a probability above 0.75), the prediction ``prob > 0.5``
  (``prob`` is ``sigmoid(logits)``), the ground truth ``gt > 0.5``.

  The counts are int32 scalars: ``jax.lax.psum`` them across devices (and add
  them across steps), then take ``iou_from_counts``.

  Returns:
    ``{'seg_intersection', 'seg_union', 'pred_intersection', 'pred_union'}``.
  """
  gt_mask = gt > TRAIN_GT_THRESHOLD
  seg_i, seg_u = _intersection_union(seg > TRAIN_SEG_THRESHOLD, gt_mask)
  pred_i, pred_u = _intersection_union(prob > TRAIN_PROB_THRESHOLD, gt_mask)
  return {
      'seg_intersection': seg_i,
      'seg_union': seg_u,
      'pred_intersection': pred_i,
      'pred_union': pred_u,
  }


def iou_from_counts(counts: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """``{'seg_iou', 'pred_iou'}`` = intersection / union from ``iou_counts``.

  An empty union (no foreground anywhere) gives 1.0.
  """
  out = {}
  for name in ('seg', 'pred'):
    inter = jnp.asarray(counts[f'{name}_intersection'], jnp.float32)
    union = jnp.asarray(counts[f'{name}_union'], jnp.float32)
    out[f'{name}_iou'] = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)
  return out
