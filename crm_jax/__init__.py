"""crm-jax: the Continuous Refinement Model (CRM) in JAX/Flax. ``crm_jax.Refiner`` refines a coarse
mask: ``Refiner.from_checkpoint(crm_jax.bundled.DEMO_CHECKPOINT).refine(image, mask)``, RGB uint8
``[H, W, 3]`` and uint8 ``[H, W]`` -> float32 ``[H, W]`` in [0, 1]. The commands are
``crm_jax.cli``; the layers: docs/architecture.md."""

__all__ = ["Refiner"]


def __getattr__(name):
  if name == "Refiner":
    # JAX is heavy: imported on first use, so the data workers (grain) stay free of it.
    from crm_jax.refine import Refiner
    return Refiner
  raise AttributeError(f"module 'crm_jax' has no attribute {name!r}")
