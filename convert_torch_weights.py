"""Converts PyTorch weights into a crm-jax model checkpoint (the same as ``crm-convert``).

    python convert_torch_weights.py CKPT.pth OUT_DIR [--verify]
    python convert_torch_weights.py --imagenet resnet50-19c8e357.pth OUT_DIR

All the work, and the flags, are in ``crm_jax.convert.main``.
"""

import sys

from crm_jax.convert import main

if __name__ == "__main__":
  sys.exit(main())
