"""The JAX side of tests/test_train_parity.py: ``train_step`` on two devices, no PyTorch.

    python tests/train_parity_worker.py IN.pkl OUT.pkl

runs ``run(**inputs)`` with float64 enabled (``jax_enable_x64``, set before anything computes)
on two forced CPU devices (the caller sets XLA_FLAGS) and pickles the result. The float32 side
imports ``run`` and calls it in the test process, on two of its devices.
"""

import functools
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def run(config: dict, variables, batches, *, dtype: str, batch_norm_sync: str, optimizer: dict,
        weights: dict, num_devices: int = 2) -> dict:
  """``len(batches)`` pmapped ``train_step``s from ``variables`` on ``num_devices`` devices.

  Args:
    config: ``ModelConfig`` fields (dropout 0, so that both sides compute the same function).
    variables: ``{'params', 'batch_stats'}`` numpy trees (``torch_to_flax`` of the reference).
    batches: one ``{'image', 'seg', 'gt'}`` NHWC batch per step.
    dtype: 'float32' or 'float64' (the compute dtype of the step and of every variable).
    batch_norm_sync: 'published' or 'all' (``crm_jax.training.step.bn_axis_name``).
    optimizer: ``crm_jax.optim.make_optimizer`` keyword arguments.
    weights: ``crm_loss`` weights.

  Returns numpy values, per device where the name says so:
    ``parts``: the first step's loss parts; ``grads``: its gradient (``pmean`` over the
    devices), read back from Adam's first moment ``mu = (1 - b1) * (g + wd * p)``;
    ``batch_stats``: every device's running statistics after the first step ``[D, ...]``;
    ``forward_stats``: every device's running statistics after a training-mode forward on its
    share of the first batch ``[D, ...]``; ``params``: every device's parameters after the last
    step ``[D, ...]``; ``lrs``: the learning rate of each step.
  """
  from crm_jax import optim
  from crm_jax.models.crm import CRM, ModelConfig
  from crm_jax.training import devices as devices_lib
  from crm_jax.training import step as step_lib

  cast = functools.partial(jax.tree_util.tree_map, lambda x: np.asarray(x, dtype))
  model = CRM(ModelConfig.from_dict(config),
              bn_axis_name=step_lib.bn_axis_name(batch_norm_sync))
  tx, schedule = optim.make_optimizer(**optimizer)
  params, batch_stats = cast(variables['params']), cast(variables['batch_stats'])
  state = step_lib.TrainState(step=np.zeros((), np.int32), params=params,
                              batch_stats=batch_stats, opt_state=tx.init(params))
  devices = jax.local_devices()[:num_devices]
  assert len(devices) == num_devices, jax.local_devices()

  def replicate(tree):
    return devices_lib.replicate(tree, devices)

  def shard(batch):
    return {k: np.asarray(v, dtype).reshape((num_devices, -1) + v.shape[1:])
            for k, v in batch.items()}

  p_step = jax.pmap(functools.partial(step_lib.train_step, model=model, tx=tx,
                                      schedule=schedule, weights=weights, compute_dtype=dtype),
                    axis_name=step_lib.AXIS_NAME, in_axes=(0, 0, None), devices=devices)
  rng = jax.random.PRNGKey(0)
  out = {}
  r_state = replicate(state)
  lrs = []
  for t, batch in enumerate(batches):
    r_state, metrics = p_step(r_state, shard(batch), rng)
    lrs.append(float(metrics['lr'][0]))
    if t == 0:
      out['parts'] = {k: float(metrics[k][0]) for k in ('ce', 'l1', 'l2', 'grad', 'total')}
      mu = jax.device_get(r_state.opt_state[1].mu)
      b1, wd = optimizer['b1'], optimizer['weight_decay']
      out['grads'] = jax.tree_util.tree_map(lambda m, p: m[0] / (1 - b1) - wd * p, mu, params)
      out['batch_stats'] = jax.device_get(r_state.batch_stats)
  out['params'] = jax.device_get(r_state.params)
  out['lrs'] = lrs

  def forward(v, x):
    return model.apply(v, x, True, method=CRM.features, mutable=['batch_stats'],
                       rngs={'dropout': rng})[1]['batch_stats']

  first = shard(batches[0])
  x = np.concatenate([first['image'], first['seg']], axis=-1)
  p_forward = jax.pmap(forward, axis_name=step_lib.AXIS_NAME, devices=devices)
  out['forward_stats'] = jax.device_get(
      p_forward(replicate({'params': params, 'batch_stats': batch_stats}), x))
  return out


def main(argv):
  jax.config.update('jax_enable_x64', True)
  with open(argv[1], 'rb') as f:
    inputs = pickle.load(f)
  out = run(**inputs)
  with open(argv[2], 'wb') as f:
    pickle.dump(out, f)


if __name__ == '__main__':
  main(sys.argv)
