"""Training throughput: images per second of one optimiser step, crm-jax against PyTorch.

The published recipe's step (docs/training.md): the ResNet-50 CRM, crops of 224x224 with every
pixel centre queried, the CRM loss (ce 1, l1 0.5, l2 0.5, grad 2), Adam with L2 weight decay,
batch 12. crm-jax runs the step that ``train.py`` runs (``crm_jax.training.step.build``: the
pmapped, guarded step with donated state, BatchNorm synchronised over the local devices); the
PyTorch side is the independent reference (``TorchCRM``: forward in training mode, dropout
included, ``layer4`` computed and unused as upstream), the same loss (``crm_loss_reference``),
``backward()`` and ``torch.optim.Adam``. Both see the same random batch (the data pipeline is
not measured) and run in this one process; ``--warmup`` steps (compilation included) are not
timed, then ``--steps`` steps are, each waited for; the figure is the median step (steady
state, and robust to other work on a shared machine).

    .venv/bin/python benchmarks/train_throughput.py                      # the published size
    .venv/bin/python benchmarks/train_throughput.py --dtype bfloat16     # both in bfloat16
    .venv/bin/python benchmarks/train_throughput.py --model tiny --batch 4 --crop 32 --steps 2

``--dtype bfloat16``: crm-jax with ``config.compute_dtype='bfloat16'``, PyTorch under
``torch.autocast``. The global batch must split over the local devices.
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def torch_reference():
  """The PyTorch reference module: in the package when it is there, else the tests' copy."""
  try:
    from crm_jax import torch_reference as ref  # noqa: F401
  except ImportError:
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
    import torch_reference as ref
  return ref


def make_config(args):
  from configs import crm_resnet50
  config = crm_resnet50.get_config()
  config.model = args.model
  config.batch_size = args.batch
  config.crop_size = args.crop
  config.compute_dtype = args.dtype
  return config


def make_batch(batch: int, crop: int, seed: int = 0):
  """A random batch in the training layout (NHWC float32): normalised image, seg in {-1, 1},
  soft gt in [0, 1]."""
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((batch, crop, crop, 3), dtype=np.float32)
  gt = np.clip(rng.uniform(-0.5, 1.5, (batch, crop, crop, 1)), 0, 1).astype(np.float32)
  seg = np.where(rng.uniform(size=gt.shape) < 0.8, gt > 0.5, gt <= 0.5)
  return {'image': image, 'seg': np.where(seg, 1.0, -1.0).astype(np.float32), 'gt': gt}


def time_steps(run_step, warmup: int, steps: int, sync) -> float:
  """The median seconds per step over ``steps`` steps (each waited for) after ``warmup``
  untimed ones; the median keeps other work on a shared machine out of the figure."""
  for _ in range(warmup):
    sync(run_step())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    sync(run_step())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def jax_seconds_per_step(args) -> float:
  import jax
  from crm_jax.training import devices
  from crm_jax.training import step as step_lib

  config = make_config(args)
  n = jax.local_device_count()
  if args.batch % n:
    raise SystemExit(f'--batch {args.batch} must be a multiple of the {n} local devices')
  trainer = step_lib.build(config)
  state = step_lib.create_train_state(config, jax.random.PRNGKey(0))
  carry = [devices.replicate(state), devices.replicate(step_lib.Guard.clear())]
  batch = jax.device_put(devices.shard(make_batch(args.batch, args.crop), n))
  rng = jax.random.PRNGKey(1)

  def run():
    carry[0], carry[1], metrics = trainer.p_step(carry[0], carry[1], batch, rng)
    return metrics

  return time_steps(run, args.warmup, args.steps, jax.block_until_ready)


def torch_seconds_per_step(args) -> float:
  import torch
  from crm_jax.training import config as cfg_lib

  ref = torch_reference()
  config = make_config(args)
  arch = cfg_lib.model_config(config).architecture()
  model = ref.TorchCRM(**arch, layer4_blocks=args.torch_layer4_blocks).train()
  opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                         betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps,
                         weight_decay=config.weight_decay)
  b = make_batch(args.batch, args.crop)
  x = torch.from_numpy(np.concatenate([b['image'], b['seg']], -1)).permute(0, 3, 1, 2)
  x = x.contiguous()
  gt = torch.from_numpy(b['gt']).permute(0, 3, 1, 2).contiguous()
  coord = ref.make_coord((args.crop, args.crop))[None].expand(args.batch, -1, -1).contiguous()
  cell = torch.full_like(coord, 2.0 / args.crop)
  weights = dict(ce_w=config.ce_weight, l1_w=config.l1_weight, l2_w=config.l2_weight,
                 grad_w=config.grad_weight)

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16'):
      logit = model(x, coord, cell)
    logit = logit.float().reshape(args.batch, 1, args.crop, args.crop)
    loss, _ = ref.crm_loss_reference(logit, gt, **weights)
    loss.backward()
    opt.step()
    return loss.detach()

  return time_steps(run, args.warmup, args.steps, lambda out: None)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='resnet50', choices=('resnet50', 'small', 'tiny'))
  parser.add_argument('--batch', type=int, default=12, help='global batch (published: 12)')
  parser.add_argument('--crop', type=int, default=224, help='crop side (published: 224)')
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps first')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--torch-layer4-blocks', type=int, default=3,
                      help="PyTorch's unused layer4, computed as upstream (0: left out)")
  parser.add_argument('--skip-torch', action='store_true', help='crm-jax only')
  args = parser.parse_args(argv)
  import jax
  print(f'{args.model}, batch {args.batch}, {args.crop}x{args.crop} crops, every pixel '
        f'queried, {args.dtype}; {args.warmup} warm-up + {args.steps} timed steps; JAX '
        f'{jax.__version__} on {jax.local_device_count()} {jax.devices()[0].platform} '
        f'device(s), {os.cpu_count()} CPU cores', flush=True)
  jax_s = jax_seconds_per_step(args)
  print(f'crm-jax: {args.batch / jax_s:.2f} images/s ({jax_s:.4g} s/step)', flush=True)
  if args.skip_torch:
    return 0
  import torch
  torch_s = torch_seconds_per_step(args)
  print(f'PyTorch {torch.__version__}: {args.batch / torch_s:.2f} images/s '
        f'({torch_s:.4g} s/step, {torch.get_num_threads()} threads)', flush=True)
  print(f'ratio crm-jax / PyTorch: {torch_s / jax_s:.2f}x')
  return 0


if __name__ == '__main__':
  sys.exit(main())
