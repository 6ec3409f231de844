"""The commands, one module each (``crm-<name>``, or ``python -m crm_jax.cli.<name>``): refine,
evaluate, train, convert, export, demo, and common (their shared flags and exit-status rule). The
library never imports them (docs/architecture.md)."""
