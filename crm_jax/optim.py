"""The CRM optimiser: Adam with L2 weight decay and a step learning rate.

``../shared/crm_spec.md`` section 7: ``torch.optim.Adam(lr, betas, eps,
weight_decay)`` (the decay is added to the gradient before Adam, on every
parameter: L2, not AdamW) and ``MultiStepLR(milestones, gamma)`` stepped once
per iteration after ``optimizer.step()``.

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

# The published training command (spec section 7).
DEFAULT_LEARNING_RATE = 2.25e-4
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_MILESTONES = (22_500, 37_500)
DEFAULT_GAMMA = 0.1
DEFAULT_B1 = 0.9
DEFAULT_B2 = 0.999
DEFAULT_EPS = 1e-8


def make_schedule(
    learning_rate: float = DEFAULT_LEARNING_RATE,
    milestones: Sequence[int] = DEFAULT_MILESTONES,
    gamma: float = DEFAULT_GAMMA,
) -> optax.Schedule:
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


def make_optimizer(
    learning_rate: float = DEFAULT_LEARNING_RATE,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    milestones: Sequence[int] = DEFAULT_MILESTONES,
    gamma: float = DEFAULT_GAMMA,
    b1: float = DEFAULT_B1,
    b2: float = DEFAULT_B2,
    eps: float = DEFAULT_EPS,
) -> Tuple[optax.GradientTransformation, optax.Schedule]:
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
  """``make_optimizer`` from a config's fields, each optional.

  Fields: ``learning_rate``, ``weight_decay``, ``lr_milestones``, ``lr_gamma``,
  ``adam_b1``, ``adam_b2``, ``adam_eps`` (published defaults when absent).
  """
  def get(name, default):
    if isinstance(config, dict):
      return config.get(name, default)
    return getattr(config, name, default)

  return make_optimizer(
      learning_rate=get('learning_rate', DEFAULT_LEARNING_RATE),
      weight_decay=get('weight_decay', DEFAULT_WEIGHT_DECAY),
      milestones=tuple(get('lr_milestones', DEFAULT_MILESTONES)),
      gamma=get('lr_gamma', DEFAULT_GAMMA),
      b1=get('adam_b1', DEFAULT_B1),
      b2=get('adam_b2', DEFAULT_B2),
      eps=get('adam_eps', DEFAULT_EPS),
  )
