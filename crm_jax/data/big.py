"""The objects of BIG-style data (image, coarse seg, gt): a BIG-layout folder
(``<name>_im.jpg|png``, ``<name>_seg.png``, ``<name>_gt.png``) or a prepared TFDS set with seg/gt
features (``crm_big``). Each object is a ``crm_jax.parallel.Item`` whose ``load()`` gives
``(image RGB uint8 [H, W, 3], seg uint8 [H, W], gt uint8 [H, W])``."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from crm_jax.data import folders
from crm_jax.io import InputError, encoded_size, file_image_size, read_image, read_mask
from crm_jax.labels import read_labels
from crm_jax.outputs import one_line
from crm_jax.parallel import Item


def _check_sizes(image: np.ndarray, seg: np.ndarray, gt: np.ndarray,
                 names: Tuple[str, str, str]) -> None:
  h, w = image.shape[:2]
  for label, m in zip(names[1:], (seg, gt)):
    if m.shape != (h, w):
      raise InputError(f"{label}: {m.shape[1]}x{m.shape[0]} but the image {names[0]} is "
                       f"{w}x{h} (width x height)")


def _read_triple(triple: folders.BigTriple, labels: bool = False):
  image = read_image(triple.image)
  if labels:  # label maps (crm_jax.labels.LabelMap)
    seg, gt = read_labels(triple.seg), read_labels(triple.gt)
    _check_sizes(image, seg.labels, gt.labels, (os.path.basename(triple.image), triple.seg,
                                                triple.gt))
    return image, seg, gt
  seg = read_mask(triple.seg)
  gt = read_mask(triple.gt)
  _check_sizes(image, seg, gt, (os.path.basename(triple.image), triple.seg, triple.gt))
  return image, seg, gt


def _describe_unmatched(report: folders.ScanReport) -> List[str]:
  """One line per object of a BIG scan that was left out: the files it lacks, or the files
  that make it ambiguous."""
  dups: Dict[str, List[str]] = {}
  for f in report.duplicates:
    parsed = folders.big_entry(f)
    dups.setdefault(parsed[0] if parsed else f, []).append(f)
  have: Dict[str, List[str]] = {}
  for f in report.unmatched:
    parsed = folders.big_entry(f)
    if parsed and parsed[0] not in dups:
      have.setdefault(parsed[0], []).append(parsed[1])
  lines = []
  for name, roles in sorted(have.items()):
    lacking = [f"{name}_{role}.{'jpg' if role == 'im' else 'png'} ({what})"
               for role, what in folders.BIG_ROLES.items() if role not in roles]
    lines.append(f"{name}: missing {', '.join(lacking)}")
  for name, files in sorted(dups.items()):
    lines.append(f"{name}: ambiguous, several files for one role: {', '.join(files)}")
  return lines


def list_objects(data_dir: str) -> Tuple[List[folders.BigTriple], List[str]]:
  """The complete ``(image, seg, gt)`` file triples of a BIG-layout folder, and one line per
  object left out (which files it lacks).

  Raises ``InputError`` when the folder is missing, empty or holds no complete object.
  """
  try:
    triples, report = folders.scan_big(data_dir)
  except (OSError, ValueError) as e:
    raise InputError(one_line(e)) from None
  return triples, _describe_unmatched(report)


def folder_objects(data_dir: str, labels: bool = False) -> Tuple[List[Item], List[str]]:
  """``list_objects`` as ``Item`` s (loading checks that the sizes agree); ``labels``: seg and
  gt are label maps, loaded as ``crm_jax.labels.LabelMap``."""
  triples, problems = list_objects(data_dir)
  return [Item(t.name, lambda t=t: _read_triple(t, labels), file_image_size(t.image))
          for t in triples], problems


def _text(x) -> str:
  if isinstance(x, np.ndarray):
    x = x.item()
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def tfds_objects(name: str, data_dir: str,
                 split: Optional[str] = None) -> Tuple[List[Item], List[str]]:
  """The objects of a prepared TFDS dataset with ``seg`` and ``gt`` features (``crm_big``).

  ``split`` may be left out when the dataset has one split only. Raises ``InputError`` for an
  unknown or unprepared dataset, one without seg/gt, or a missing split.
  """
  # Optional and heavy (TFDS takes seconds to import): only on this path.
  import tensorflow_datasets as tfds
  from crm_jax.data import tfds_builders as tb

  if not os.path.isdir(data_dir):
    raise InputError(f"{data_dir}: no such TFDS data folder")
  try:
    builder = tb.get_builder(name, data_dir)
    if split is None and tb.is_prepared(name, data_dir):
      splits = list(builder.info.splits)
      if len(splits) > 1:
        raise InputError(f"{name} in {data_dir} has splits {', '.join(splits)}; choose one "
                         "with --split")
      split = splits[0] if splits else None
    # load_source checks that the dataset is prepared and has the split.
    source = tb.load_source(name, data_dir, split or "train")
  except (FileNotFoundError, ValueError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f"--data {name}: {one_line(e)}") from None
  split = source.split
  features = set(builder.info.features)
  if not {"image", "seg", "gt"} <= features:
    raise InputError(f"{name} has no seg/gt features ({', '.join(sorted(features))}); only "
                     "BIG-style datasets (crm_big) can be evaluated")
  # The names, without decoding any image (a resumed run skips complete objects cheaply).
  raw = builder.as_data_source(split=split, decoders={
      k: tfds.decode.SkipDecoding() for k in ("image", "seg", "gt")})

  def load(i: int):
    item = source[i]
    image, seg, gt = item["image"], item["seg"], item["gt"]
    where = f"{name}/{split}/{item['name']}"
    _check_sizes(image, seg, gt, (f"{where} image", f"{where} seg", f"{where} gt"))
    return image, seg, gt

  objects = []
  for i in range(len(raw)):
    record = raw[i]
    obj_name = _text(record["name"]).replace("/", "_").replace(os.sep, "_")
    encoded = record["image"]
    size = encoded_size(encoded.item() if isinstance(encoded, np.ndarray) else encoded)
    objects.append(Item(obj_name, lambda i=i: load(i), size))
  return objects, []
