"""The commands, one module each; the library below never imports them (docs/architecture.md).

- ``refine``: ``crm-refine``, one image or a folder of images with their coarse masks.
- ``evaluate``: ``crm-evaluate`` (``evaluate.py``), BIG-style data at every scale, IoU and mBA.
- ``train``: ``crm-train`` (``train.py``), training from a config file into a workdir.
- ``convert``: ``crm-convert`` (``convert_torch_weights.py``), PyTorch weights in and out.
- ``export``: ``crm-export``, the fused plan's programs serialized for chosen sizes and platforms.
- ``demo``: ``make demo``, the bundled images refined with the bundled checkpoint.
- ``common``: the flags that refine and evaluate share, and the exit-status rule.

Each runs as ``python -m crm_jax.cli.<name>``.
"""
