"""Refines BIG-style data at every scale and reports IoU and mBA (``crm-evaluate``).

    python evaluate.py --data DIR --checkpoint CKPT --output OUT

Flags: ``crm_jax/cli/evaluate.py``; output folder, resume, hosts: docs/big.md.
"""

import sys

from crm_jax.cli.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
