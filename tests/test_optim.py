"""Tests of the optimiser against torch.optim.Adam + MultiStepLR."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import crm_resnet50
from crm_jax.optim import make_optimizer
from crm_jax.optim import make_optimizer_from_config
from crm_jax.optim import make_schedule

LR = 1e-2
WD = 1e-2
MILESTONES = (5, 12)
GAMMA = 0.1
STEPS = 30


def _toy_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      'w1': rng.standard_normal((5, 4)).astype(np.float32) * 0.5,
      'b1': rng.standard_normal((4,)).astype(np.float32) * 0.1,
      'w2': rng.standard_normal((4, 2)).astype(np.float32) * 0.5,
      'b2': rng.standard_normal((2,)).astype(np.float32) * 0.1,
  }
  xs = rng.standard_normal((STEPS, 16, 5)).astype(np.float32)
  ys = rng.standard_normal((STEPS, 16, 2)).astype(np.float32)
  return params, xs, ys


def _forward(p, x, tanh):
  h = tanh(x @ p['w1'] + p['b1'])
  return h @ p['w2'] + p['b2']


def _jax_loss(p, x, y):
  return jnp.mean((_forward(p, x, jnp.tanh) - y)**2)


def _trajectories(dtype, jax_milestones=MILESTONES):
  """Runs torch Adam + MultiStepLR and the optax optimiser side by side.

  Each framework computes its own gradients from the same data at its own
  parameters. Returns one ``(jax_params, torch_params)`` pair of numpy dicts
  per step, after the step.
  """
  torch = pytest.importorskip('torch')
  init, xs, ys = _toy_problem()
  init = {k: v.astype(dtype) for k, v in init.items()}
  xs, ys = xs.astype(dtype), ys.astype(dtype)

  tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
  topt = torch.optim.Adam(list(tparams.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=WD)
  tsched = torch.optim.lr_scheduler.MultiStepLR(topt, milestones=list(MILESTONES), gamma=GAMMA)

  tx, schedule = make_optimizer(learning_rate=LR, weight_decay=WD, milestones=jax_milestones,
                                gamma=GAMMA, b1=0.9, b2=0.999, eps=1e-8)
  params = jax.tree.map(jnp.asarray, init)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(_jax_loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  same_recipe = tuple(jax_milestones) == MILESTONES
  out = []
  for i in range(STEPS):
    if same_recipe:  # the lr torch iteration i trains with
      assert float(schedule(i)) == pytest.approx(topt.param_groups[0]['lr'], rel=1e-6), i
    x, y = torch.from_numpy(xs[i]), torch.from_numpy(ys[i])
    topt.zero_grad()
    tloss = torch.mean((_forward(tparams, x, torch.tanh) - y)**2)
    tloss.backward()
    topt.step()
    tsched.step()

    params, opt_state, loss = step(params, opt_state, xs[i], ys[i])
    assert params['w1'].dtype == dtype
    if same_recipe:
      assert float(loss) == pytest.approx(tloss.item(), rel=1e-5), i
    out.append(({k: np.asarray(v) for k, v in params.items()},
                {k: v.detach().numpy().copy() for k, v in tparams.items()}))
  return out


def _max_scaled_error(jax_params, torch_params):
  """Largest |difference| over all leaves, relative to the largest |parameter|."""
  scale = max(np.abs(v).max() for v in torch_params.values())
  return max(np.abs(jax_params[k] - v).max() for k, v in torch_params.items()) / scale


@pytest.mark.torch
def test_matches_torch_adam_multisteplr_every_step_float64():
  # In float64 the two agree to rounding (measured ~4e-14 elementwise), which
  # pins the algorithm: L2 decay, bias corrections, eps placement, lr steps.
  with jax.enable_x64(True):
    for i, (jp, tp) in enumerate(_trajectories(np.float64)):
      for k, v in tp.items():
        np.testing.assert_allclose(jp[k], v, rtol=1e-10, atol=1e-13, err_msg=f'step {i} {k}')


@pytest.mark.torch
def test_matches_torch_adam_multisteplr_every_step_float32():
  # In float32 independent gradients differ by rounding, which Adam amplifies
  # on near-zero entries; compare at 1e-6 of the parameter scale (measured
  # ~4e-7).
  for i, (jp, tp) in enumerate(_trajectories(np.float32)):
    assert _max_scaled_error(jp, tp) < 1e-6, i
    for k, v in tp.items():
      np.testing.assert_allclose(jp[k], v, rtol=1e-6, atol=1e-6, err_msg=f'step {i} {k}')


@pytest.mark.torch
@pytest.mark.parametrize('shifted', [(6, 13), (4, 11)])
def test_off_by_one_schedule_is_detected(shifted):
  # Negative control: milestones one iteration late or early diverge from torch.
  with jax.enable_x64(True):
    errors = [_max_scaled_error(jp, tp) for jp, tp in _trajectories(np.float64, shifted)]
  first_bad = min(MILESTONES[0], shifted[0])
  assert max(errors[:first_bad]) < 1e-12
  assert errors[first_bad] > 1e-4


def test_weight_decay_is_l2_added_to_gradient():
  # With zero gradients, Adam's first step moves every parameter by
  # lr * sign(wd * param) (Adam normalises wd * param): L2, not AdamW's
  # lr * wd * param.
  tx, _ = make_optimizer(learning_rate=0.1, weight_decay=1e-3, milestones=(100,), gamma=0.1,
                         b1=0.9, b2=0.999, eps=1e-8)
  params = {'a': jnp.array([2.0, -3.0, 0.5])}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates['a']), [-0.1, 0.1, -0.1], rtol=1e-4)


def test_schedule_boundaries():
  schedule = make_schedule(LR, MILESTONES, GAMMA)
  expected = {0: LR, 4: LR, 5: LR * 0.1, 11: LR * 0.1, 12: LR * 0.01, 29: LR * 0.01}
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-6), step
    assert float(jax.jit(schedule)(jnp.int32(step))) == pytest.approx(value, rel=1e-6), step


@pytest.mark.torch
def test_schedule_matches_torch_multisteplr():
  torch = pytest.importorskip('torch')
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 3, 7], gamma=0.5)
  schedule = make_schedule(LR, (3, 3, 7), 0.5)  # a repeated milestone decays twice
  for i in range(12):
    assert float(schedule(i)) == pytest.approx(opt.param_groups[0]['lr'], rel=1e-6), i
    opt.step()
    sched.step()


def test_published_recipe():
  # configs/crm_resnet50.py is the one place for the published values.
  _, schedule = make_optimizer_from_config(crm_resnet50.get_config())
  assert float(schedule(0)) == pytest.approx(2.25e-4, rel=1e-6)
  assert float(schedule(22_499)) == pytest.approx(2.25e-4, rel=1e-6)
  assert float(schedule(22_500)) == pytest.approx(2.25e-5, rel=1e-6)
  assert float(schedule(37_499)) == pytest.approx(2.25e-5, rel=1e-6)
  assert float(schedule(37_500)) == pytest.approx(2.25e-6, rel=1e-6)
  assert float(schedule(44_999)) == pytest.approx(2.25e-6, rel=1e-6)


def test_from_config():
  config = dict(crm_resnet50.get_config(), learning_rate=1.0, lr_milestones=[2], lr_gamma=0.5)
  _, schedule = make_optimizer_from_config(config)
  assert [float(schedule(i)) for i in range(4)] == [1.0, 1.0, 0.5, 0.5]
  with pytest.raises(ValueError):
    make_schedule(1.0, (0,), 0.1)
  del config['adam_eps']  # no silent default for a missing field
  with pytest.raises(KeyError, match='adam_eps'):
    make_optimizer_from_config(config)
