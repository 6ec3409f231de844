"""Training-loader throughput: samples/s, and samples/s per core used.

    python benchmarks/loader_throughput.py [--config configs/synthetic_small.py] \
        [--workers 0 1 2] [--steps 20]

For each worker count, builds ``crm_jax.data.pipeline.TrainLoader`` for the config (one host),
skips the first batch (start-up), times the next ``--steps`` batches and prints samples/s and
samples/s per core (the main process counts as a core when there are no workers).
"""

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crm_jax.data import pipeline  # noqa: E402


def measure(config, workers: int, steps: int) -> float:
  """Samples per second of ``steps`` batches after the first one."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.num_steps = steps + 1
  with pipeline.TrainLoader(config, 0, process_index=0, process_count=1,
                            num_workers=workers) as loader:
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = 0
    for _, batch in it:
      n += batch['image'].shape[0]
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument('--config', default=os.path.join(here, 'configs', 'synthetic_small.py'))
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--batch-size', type=int, help='override config.batch_size')
  parser.add_argument('--crop-size', type=int, help='override config.crop_size')
  args = parser.parse_args(argv)
  spec = importlib.util.spec_from_file_location('loader_config', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if args.batch_size:
    config.batch_size = args.batch_size
  if args.crop_size:
    config.crop_size = args.crop_size
  print(f'{args.config}: dataset {config.dataset}, batch {config.batch_size}, crop '
        f'{config.crop_size}, {os.cpu_count()} CPU(s)')
  for workers in args.workers:
    rate = measure(config, workers, args.steps)
    print(f'workers {workers}: {rate:8.1f} samples/s, {rate / max(1, workers):8.1f} samples/s '
          'per core')
  return 0


if __name__ == '__main__':
  sys.exit(main())
