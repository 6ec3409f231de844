"""Data: training-set folders and TFDS builders, synthetic pairs, coarse-mask synthesis, augmentation."""
