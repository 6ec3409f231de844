"""The bundled SMALL model fine-tuned on composites of real photographs (and synthetic pairs).

    python train.py --config configs/real_photos_small.py --workdir runs/real_photos_small

(27 min for its 850 steps pinned to one core, ``taskset -c 1``, of the 2-core development
machine, shared with other jobs; docs/data.md, "Real photographs", gives the figures.)

Stage 3 of the bundled checkpoint's recipe: stage 2 (configs/synthetic_small_sizes.py) with the
data replaced by crm_jax.data.real_photos composites (regions of the photographs scikit-image
ships, cut with natural silhouettes and pasted onto one another; the held-out photographs never
appear), a quarter of synthetic pairs kept so that the bundled demo set stays refined. Needs
scikit-image installed (training only). Starts from the bundled model (``init``). docs/data.md
("Real photographs") describes the source; benchmarks/real_photos.py measures the result on the
held-out photographs, benchmarks/bundled_sizes.py on the bundled set.
"""

import ml_collections

from configs import synthetic_small_sizes


def get_config() -> ml_collections.ConfigDict:
  """synthetic_small_sizes with the fields below overridden."""
  c = synthetic_small_sizes.get_config()
  c.init = 'crm_jax/assets/crm_small'  # the bundled model (stage 2)
  c.dataset = 'real_photos'
  c.real_photos_num_examples = 100_000  # no composite is seen twice.
  c.real_photos_size = 256  # composites of 256x256 (made from silhouettes drawn at 512).
  c.real_photos_synthetic_fraction = 0.25  # a quarter synthetic_small pairs of synthetic_size.
  c.num_steps = 850
  c.lr_milestones = (600, 765)
  c.checkpoint_every = 250
  c.num_workers = 1
  return c
