"""The CRM optimiser as published: Adam with L2 weight decay and MultiStepLR (docs/training.md)."""

import collections
from typing import Any, Sequence, Tuple

import optax


def make_schedule(learning_rate: float, milestones: Sequence[int],
                  gamma: float) -> optax.Schedule:
  """``MultiStepLR`` as an optax schedule of the 0-based iteration ``i``:
  ``learning_rate * gamma ** #{m in milestones : m <= i}`` (a repeated milestone decays twice)."""
  counts = collections.Counter(int(m) for m in milestones)
  if any(m <= 0 for m in counts):
    raise ValueError(f'milestones must be positive iteration indices: {milestones}')
  return optax.piecewise_constant_schedule(
      init_value=learning_rate,
      boundaries_and_scales={m: gamma**n for m, n in counts.items()})


def make_optimizer(learning_rate: float, weight_decay: float, milestones: Sequence[int],
                   gamma: float, b1: float, b2: float,
                   eps: float) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """``(tx, schedule)``: Adam with L2 weight decay; ``schedule(step)``: update ``step``'s rate."""
  schedule = make_schedule(learning_rate, milestones, gamma)
  tx = optax.chain(optax.add_decayed_weights(weight_decay),  # grad + wd * param, every leaf.
                   optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                   optax.scale_by_learning_rate(schedule))
  return tx, schedule


def make_optimizer_from_config(config: Any) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """``make_optimizer`` from a config's fields (``learning_rate``, ``lr_milestones``...)."""
  return make_optimizer(
      learning_rate=config['learning_rate'], weight_decay=config['weight_decay'],
      milestones=tuple(config['lr_milestones']), gamma=config['lr_gamma'],
      b1=config['adam_b1'], b2=config['adam_b2'], eps=config['adam_eps'])
