"""Paths of the data and checkpoint bundled with the package."""

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEMO_DATA = os.path.join(ASSETS, "demo_big")
DEMO_CHECKPOINT = os.path.join(ASSETS, "crm_small")


def default_checkpoint() -> str:
  """The bundled small checkpoint (trained on synthetic data)."""
  return DEMO_CHECKPOINT
