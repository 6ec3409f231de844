"""crm-jax: the Continuous Refinement Model (CRM) in JAX/Flax.

``crm_jax.Refiner`` refines one coarse mask::

    from crm_jax import Refiner
    from crm_jax.bundled import DEMO_CHECKPOINT  # the bundled small checkpoint
    refiner = Refiner.from_checkpoint(DEMO_CHECKPOINT)  # or a converted one
    prob = refiner.refine(image, mask)  # image [H, W, 3] uint8 RGB, mask [H, W] uint8
                                        # -> prob [H, W] float32 in [0, 1]

The commands (``crm-refine``, ``crm-evaluate``, ``crm-train``, ``crm-convert``, the demo) are
``crm_jax.cli``; how the package is layered: docs/architecture.md.
"""

__all__ = ["Refiner"]


def __getattr__(name):
  if name == "Refiner":
    # JAX is heavy: imported on first use of Refiner, so that the data workers (grain
    # processes), which import crm_jax.data, stay free of it.
    from crm_jax.refine import Refiner
    return Refiner
  raise AttributeError(f"module 'crm_jax' has no attribute {name!r}")
