"""PyTorch weights in and out of crm-jax (``crm-convert``).

    python convert_torch_weights.py CKPT.pth OUT_DIR [--verify]
    python convert_torch_weights.py --to-torch CKPT_DIR OUT.pth

Flags: ``crm_jax/cli/convert.py``; docs/model.md.
"""

import sys

from crm_jax.cli.convert import main

if __name__ == "__main__":
  sys.exit(main())
