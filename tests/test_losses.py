"""Tests of the CRM training loss and IoU counts against PyTorch and NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crm_jax.losses import crm_loss
from crm_jax.losses import iou_counts
from crm_jax.losses import iou_from_counts
from crm_jax.losses import sobel

WEIGHTS = dict(ce_weight=1.0, l1_weight=0.5, l2_weight=0.5, grad_weight=2.0)


def _torch_sobel(x):
  """The published sobel (docs/training.md) in PyTorch, NCHW."""
  import torch
  import torch.nn.functional as F
  kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4
  ky = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]) / 4
  x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
  gx = F.conv2d(x, kx[None, None], padding=1)
  gy = F.conv2d(x, ky[None, None], padding=1)
  return torch.sqrt(gx**2 + gy**2 + 1e-4)


def _to_nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def _random_batch(seed, shape=(2, 1, 13, 17)):
  rng = np.random.default_rng(seed)
  logits = (rng.standard_normal(shape) * 3).astype(np.float32)
  # A soft gt with exact 0s and 1s and values on both sides of 0.5.
  gt = np.clip(rng.uniform(-0.3, 1.3, shape), 0, 1).astype(np.float32)
  seg = rng.uniform(-1, 1, shape).astype(np.float32)
  return logits, gt, seg


@pytest.mark.torch
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_sobel_matches_torch(seed):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(seed).standard_normal((2, 1, 13, 17)).astype(np.float32)
  ref = _torch_sobel(torch.from_numpy(x)).numpy()
  out = np.asarray(jax.jit(sobel)(_to_nhwc(x)))
  assert out.shape == (2, 13, 17, 1)
  np.testing.assert_allclose(out, np.transpose(ref, (0, 2, 3, 1)), rtol=1e-6, atol=1e-6)


def test_sobel_orientation_and_padding():
  # A vertical step edge gives gx only, a horizontal one gy only; the zero
  # padding makes the border of a constant image non-flat.
  x = np.zeros((1, 7, 9, 1), np.float32)
  x[:, :, 5:] = 1.0
  gx_only = np.asarray(sobel(jnp.asarray(x)))[0, 3, :, 0]
  gy_only = np.asarray(sobel(jnp.asarray(np.swapaxes(x, 1, 2))))[0, :, 3, 0]
  np.testing.assert_allclose(gx_only, gy_only, rtol=1e-6)
  assert gx_only[0] == pytest.approx(0.01) and gx_only[4] > 0.1
  ones = np.asarray(sobel(jnp.ones((1, 9, 9, 1))))
  assert ones[0, 4, 4, 0] == pytest.approx(0.01)
  assert ones[0, 0, 4, 0] > 0.1


@pytest.mark.torch
@pytest.mark.parametrize('seed', [0, 1])
def test_crm_loss_matches_torch(seed):
  torch = pytest.importorskip('torch')
  logits, gt, _ = _random_batch(seed)
  tl, tg = torch.from_numpy(logits), torch.from_numpy(gt)
  tp = torch.sigmoid(tl)
  ref = {
      'ce': torch.nn.BCEWithLogitsLoss()(tl, (tg > 0.5).float()).item(),
      'l1': torch.nn.L1Loss()(tp, tg).item(),
      'l2': torch.nn.MSELoss()(tp, tg).item(),
      'grad': torch.mean(torch.abs(_torch_sobel(tg) - _torch_sobel(tp))).item(),
  }
  ref['total'] = (WEIGHTS['ce_weight'] * ref['ce'] + WEIGHTS['l1_weight'] * ref['l1'] +
                  WEIGHTS['l2_weight'] * ref['l2'] + WEIGHTS['grad_weight'] * ref['grad'])
  loss_fn = jax.jit(functools.partial(crm_loss, **WEIGHTS))
  total, parts = loss_fn(_to_nhwc(logits), _to_nhwc(gt))
  assert set(parts) == {'ce', 'l1', 'l2', 'grad', 'total'}
  assert float(total) == float(parts['total'])
  for name, value in ref.items():
    assert float(parts[name]) == pytest.approx(value, rel=1e-6), name


def test_crm_loss_weights_and_gradient():
  logits, gt, _ = _random_batch(3)
  logits, gt = _to_nhwc(logits), _to_nhwc(gt)
  _, parts = crm_loss(logits, gt, ce_weight=0.0, l1_weight=1.0, l2_weight=1.0, grad_weight=5.0)
  expected = parts['l1'] + parts['l2'] + 5.0 * parts['grad']
  assert float(parts['total']) == pytest.approx(float(expected), rel=1e-6)
  grads = jax.grad(lambda z: crm_loss(z, gt, **WEIGHTS)[0])(logits)
  assert grads.shape == logits.shape and bool(jnp.all(jnp.isfinite(grads)))
  assert float(jnp.abs(grads).max()) > 0


def test_crm_loss_stable_for_large_logits():
  _, gt, _ = _random_batch(4)
  gt = _to_nhwc(gt)
  logits = jnp.where(gt > 0.5, -200.0, 200.0)  # confidently wrong everywhere
  total, parts = crm_loss(logits, gt, **WEIGHTS)
  assert bool(jnp.isfinite(total))
  assert float(parts['ce']) == pytest.approx(200.0, rel=1e-5)
  grads = jax.grad(lambda z: crm_loss(z, gt, **WEIGHTS)[0])(logits)
  assert bool(jnp.all(jnp.isfinite(grads)))


def _numpy_counts(seg, prob, gt):
  g = gt > 0.5
  out = {}
  for name, m in (('seg', seg > 0.5), ('pred', prob > 0.5)):
    out[f'{name}_intersection'] = int(np.sum(m & g))
    out[f'{name}_union'] = int(np.sum(m | g))
  return out


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_iou_counts_match_numpy(seed):
  logits, gt, seg = _random_batch(seed, shape=(3, 1, 11, 9))
  prob = 1 / (1 + np.exp(-logits))
  ref = _numpy_counts(seg, prob, gt)
  counts = jax.jit(iou_counts)(_to_nhwc(seg), _to_nhwc(prob), _to_nhwc(gt))
  assert {k: int(v) for k, v in counts.items()} == ref
  # The seg threshold is 0.5 on [-1, 1] values, not 0.
  assert ref['seg_intersection'] < int(np.sum((seg > 0) & (gt > 0.5)))
  ious = iou_from_counts(counts)
  for name in ('seg', 'pred'):
    assert float(ious[f'{name}_iou']) == pytest.approx(
        ref[f'{name}_intersection'] / ref[f'{name}_union'], rel=1e-6)


def test_iou_counts_psum_over_shards_equals_full_batch():
  logits, gt, seg = _random_batch(5, shape=(4, 1, 8, 10))
  prob = 1 / (1 + np.exp(-logits))
  seg, prob, gt = _to_nhwc(seg), _to_nhwc(prob), _to_nhwc(gt)
  full = iou_counts(seg, prob, gt)

  def shard(x):
    return x.reshape((2, 2) + x.shape[1:])

  summed = jax.vmap(lambda s, p, g: jax.lax.psum(iou_counts(s, p, g), 'batch'),
                    axis_name='batch')(shard(seg), shard(prob), shard(gt))
  for key, value in full.items():
    assert summed[key].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(summed[key]), int(value))


def test_iou_from_counts_empty_union():
  zero = jnp.zeros((), jnp.int32)
  ious = iou_from_counts({'seg_intersection': zero, 'seg_union': zero,
                          'pred_intersection': zero, 'pred_union': zero})
  assert float(ious['seg_iou']) == 1.0 and float(ious['pred_iou']) == 1.0
