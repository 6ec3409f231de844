"""Training loss and IoU counts of CRM (docs/training.md). ``logits``, ``gt`` (soft, [0, 1]),
``seg`` ([-1, 1]) and ``prob`` are NHWC ``[B, H, W, 1]`` float32."""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from crm_jax.constants import (SOBEL_EPS, TRAIN_GT_THRESHOLD, TRAIN_PROB_THRESHOLD,
                               TRAIN_SEG_THRESHOLD)

# Cross-correlation kernels, indexed [row (H), column (W)].
_SOBEL_KX = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
_SOBEL_KY = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))
_SOBEL_SCALE = 4.0


def _windows3x3(x: jax.Array):
  """``(i, j, view)``: ``view[:, h, w] == x_padded[:, h + i, w + j]``, zero padding 1."""
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  for i in range(3):
    for j in range(3):
      yield i, j, xp[:, i:i + h, j:j + w, :]


def sobel(x: jax.Array) -> jax.Array:
  """Smoothed Sobel magnitude of ``x`` ``[B, H, W, C]`` (per channel), same shape; shifted
  slices rather than convolutions, so exact float32 on every backend (no TF32)."""
  pooled = sum(view for _, _, view in _windows3x3(x)) / 9.0
  gx = jnp.zeros_like(pooled)
  gy = jnp.zeros_like(pooled)
  for i, j, view in _windows3x3(pooled):
    if _SOBEL_KX[i][j]:
      gx = gx + (_SOBEL_KX[i][j] / _SOBEL_SCALE) * view
    if _SOBEL_KY[i][j]:
      gy = gy + (_SOBEL_KY[i][j] / _SOBEL_SCALE) * view
  return jnp.sqrt(gx * gx + gy * gy + SOBEL_EPS)


def crm_loss(logits: jax.Array, gt: jax.Array, *, ce_weight: float, l1_weight: float,
             l2_weight: float, grad_weight: float) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """``(total, parts)``: the weighted sum of the unweighted means ``ce`` (against ``gt > 0.5``),
  ``l1``, ``l2`` and ``grad`` (Sobel), and those parts with ``total``; in at least float32."""
  dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float32 (float64 in x64 parity tests)
  logits, gt = logits.astype(dtype), gt.astype(dtype)
  p = jax.nn.sigmoid(logits)
  target = (gt > TRAIN_GT_THRESHOLD).astype(dtype)
  diff = p - gt
  parts = {'ce': jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target)),
           'l1': jnp.mean(jnp.abs(diff)), 'l2': jnp.mean(diff * diff),
           'grad': jnp.mean(jnp.abs(sobel(gt) - sobel(p)))}
  total = (ce_weight * parts['ce'] + l1_weight * parts['l1'] +
           l2_weight * parts['l2'] + grad_weight * parts['grad'])
  parts['total'] = total
  return total, parts


def iou_counts(seg: jax.Array, prob: jax.Array, gt: jax.Array) -> Dict[str, jax.Array]:
  """int32 intersection and union counts over the batch, ``{seg,pred}_{intersection,union}``
  (add them up, then ``iou_from_counts``); seg ``> 0.5`` on [-1, 1], the published quirk."""
  gt_mask = gt > TRAIN_GT_THRESHOLD
  counts = {}
  for name, mask in (('seg', seg > TRAIN_SEG_THRESHOLD), ('pred', prob > TRAIN_PROB_THRESHOLD)):
    counts[f'{name}_intersection'] = jnp.sum(mask & gt_mask, dtype=jnp.int32)
    counts[f'{name}_union'] = jnp.sum(mask | gt_mask, dtype=jnp.int32)
  return counts


def iou_from_counts(counts: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """``{'seg_iou', 'pred_iou'}`` = intersection / union (1.0 for an empty union)."""
  out = {}
  for name in ('seg', 'pred'):
    inter = jnp.asarray(counts[f'{name}_intersection'], jnp.float32)
    union = jnp.asarray(counts[f'{name}_union'], jnp.float32)
    out[f'{name}_iou'] = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)
  return out
