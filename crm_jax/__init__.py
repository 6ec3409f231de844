"""crm-jax: the Continuous Refinement Model (CRM) in JAX/Flax.

``crm_jax.Refiner`` refines one coarse mask::

    from crm_jax import Refiner
    refiner = Refiner.from_checkpoint("crm_jax/assets/crm_small")
    prob = refiner.refine(image, mask)  # [H, W] float32 in [0, 1]

JAX is imported on first use of ``Refiner``, so the metric and data modules
stay light.
"""

__all__ = ["Refiner"]


def __getattr__(name):
  if name == "Refiner":
    from crm_jax.refine import Refiner
    return Refiner
  raise AttributeError(f"module 'crm_jax' has no attribute {name!r}")
