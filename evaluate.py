"""Refines BIG-style data at every scale and reports IoU and mBA (docs/metrics.md).

    python evaluate.py --data DIR --checkpoint CKPT --output OUT [--scales 0.125 0.25 0.5 1.0]
    python evaluate.py --data crm_big --tfds-data-dir TFDS_DIR [--split test] \\
        --checkpoint CKPT --output OUT
    python evaluate.py --metrics-only --output OUT

Writes the published output layout in OUT, OUT/manifest.json (the model's fingerprint, scales,
dtype, plan) and OUT/metrics.json; a run started again with the same model and settings skips
objects that are already complete, one with others is refused unless --overwrite. Bad objects are
reported and skipped; the exit status is non-zero only when nothing could be evaluated or an
argument is bad (one line, no traceback). The work is ``crm_jax.evaluation.evaluate``.
"""

import sys

from crm_jax.cli import evaluate_main as main

if __name__ == "__main__":
  sys.exit(main())
