"""Trains CRM: ``python train.py --config configs/crm_resnet50.py --workdir DIR`` (``crm-train``).

Flags and errors: ``crm_jax/cli/train.py``; the recipe and configs: docs/training.md.
"""

from crm_jax.cli.train import main

if __name__ == '__main__':
  main()
