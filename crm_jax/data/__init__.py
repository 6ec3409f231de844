"""Data: training-set folders and TFDS builders, synthetic pairs, real-photograph composites,
coarse-mask synthesis, augmentation (docs/data.md)."""


def source_index(index: int, length: int) -> int:
  """``index`` into a random-access source of ``length`` items (negative counts from the end);
  ``IndexError`` outside it. Every source's ``__getitem__`` uses it."""
  index = int(index)
  if index < 0:
    index += length
  if not 0 <= index < length:
    raise IndexError(f"index {index} out of range for {length} items")
  return index
