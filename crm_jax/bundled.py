"""Paths of the data and checkpoint bundled with the package."""

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEMO_DATA = os.path.join(ASSETS, "demo_big")
DEMO_CHECKPOINT = os.path.join(ASSETS, "crm_small")
# Stage 2 of the bundled checkpoint (synthetic data only): the init of configs/real_photos_small.py.
SYNTHETIC_CHECKPOINT = os.path.join(ASSETS, "crm_small_synthetic")


def default_checkpoint() -> str:
  """The bundled small checkpoint (synthetic shapes, then composites of real photographs)."""
  return DEMO_CHECKPOINT
