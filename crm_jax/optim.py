"""The CRM optimiser: Adam with L2 weight decay and a step learning rate.

As published (docs/training.md): ``torch.optim.Adam(lr, betas, eps,
weight_decay)`` (the decay is added to the gradient before Adam, on every
parameter: L2, not AdamW) and ``MultiStepLR(milestones, gamma)`` stepped once
per iteration after ``optimizer.step()``. The published values are the
fields of ``configs/crm_resnet50.py``, the one place for them.

Off-by-one: torch iteration ``i`` (0-based) trains with the learning rate that
``MultiStepLR`` holds after ``i`` scheduler steps, which is
``lr * gamma ** #{m in milestones : m <= i}``. Optax evaluates the schedule at
the number of updates already applied, also ``i`` for iteration ``i``, so the
milestones are the optax boundaries unchanged: with milestones ``[m]``,
iterations ``0 .. m - 1`` use ``lr`` and iteration ``m`` onwards ``lr * gamma``.
"""

import collections
from typing import Any, Sequence, Tuple

import optax


def make_schedule(learning_rate: float, milestones: Sequence[int],
                  gamma: float) -> optax.Schedule:
  """``MultiStepLR`` as an optax schedule of the 0-based iteration index.

  ``schedule(i) == learning_rate * gamma ** #{m in milestones : m <= i}``.
  A milestone listed twice decays twice, as in ``MultiStepLR``.
  """
  counts = collections.Counter(int(m) for m in milestones)
  if any(m <= 0 for m in counts):
    raise ValueError(f'milestones must be positive iteration indices: {milestones}')
  return optax.piecewise_constant_schedule(
      init_value=learning_rate,
      boundaries_and_scales={m: gamma**n for m, n in counts.items()})


def make_optimizer(learning_rate: float, weight_decay: float, milestones: Sequence[int],
                   gamma: float, b1: float, b2: float,
                   eps: float) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with L2 weight decay (``torch.optim.Adam(weight_decay=...)``).

  Returns ``(tx, schedule)``; ``schedule(step)`` is the learning rate that the
  update number ``step`` (0-based) uses, for logging.
  """
  schedule = make_schedule(learning_rate, milestones, gamma)
  tx = optax.chain(
      optax.add_decayed_weights(weight_decay),  # grad + wd * param, every leaf.
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.scale_by_learning_rate(schedule),
  )
  return tx, schedule


def make_optimizer_from_config(config: Any) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """``make_optimizer`` from a config's (or dict's) fields ``learning_rate``, ``weight_decay``,
  ``lr_milestones``, ``lr_gamma``, ``adam_b1``, ``adam_b2``, ``adam_eps``; every one is required
  (the published values are in ``configs/crm_resnet50.py``)."""
  return make_optimizer(
      learning_rate=config['learning_rate'], weight_decay=config['weight_decay'],
      milestones=tuple(config['lr_milestones']), gamma=config['lr_gamma'],
      b1=config['adam_b1'], b2=config['adam_b2'], eps=config['adam_eps'])
