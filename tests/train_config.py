"""The small training config shared by test_train.py and train_worker.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import synthetic_small  # noqa: E402


def small_test_config(**overrides):
  """configs/synthetic_small.py shrunk: TINY model, 32x32 crops, global batch 4, no workers."""
  c = synthetic_small.get_config()
  c.model = 'tiny'
  c.crop_size = 32
  c.batch_size = 4
  c.num_steps = 6
  c.synthetic_size = 48
  c.synthetic_num_examples = 64
  c.num_workers = 0
  c.log_every = 2
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  c.image_every = 0
  c.eval_every = 0
  c.learning_rate = 1e-2  # the TINY model moves visibly within a few dozen steps.
  c.lr_milestones = (4,)
  for k, v in overrides.items():
    c[k] = v
  return c
