"""Scanning dataset folders laid out as the original archives (docs/data.md).

Layouts: FSS-1000 (``scan_fss1000``, ``FSS1000_LAYOUT``), flat salient-object sets paired by stem
anywhere under the root (``scan_flat``: DUTS, ECSSD, MSRA-10K, DUT-OMRON) and BIG (``scan_big``,
``big_split_folders``). Files without a partner, and names found twice for one role, are left out
and listed in the ``ScanReport``; hidden files and ``__MACOSX`` are ignored. A missing root raises
``FileNotFoundError``, a file ``NotADirectoryError``, a folder where nothing pairs ``FolderError``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from crm_jax.io import InputError, imdecode, read_bytes

IMAGE_EXTS = (".jpg", ".jpeg")  # training images (upstream globs ``*.jpg``)
MASK_EXTS = (".png",)
BIG_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
BIG_ROLES = {"im": "image", "seg": "coarse mask", "gt": "ground truth"}  # role: what it is
_IGNORED_DIRS = ("__MACOSX",)
_SPLIT_NAME = re.compile(r"^\w+$")

FSS1000_LAYOUT = "<root>/<class>/<k>.jpg + <root>/<class>/<k>.png"
FLAT_LAYOUT = ("<root>/<id>.jpg + <root>/<id>.png, or images and masks in subfolders "
               "(e.g. <root>/DUTS-TR-Image/<id>.jpg + <root>/DUTS-TR-Mask/<id>.png)")
BIG_LAYOUT = "<root>/<name>_im.jpg (or .png) + <root>/<name>_seg.png + <root>/<name>_gt.png"


class FolderError(ValueError):
  """A dataset folder that exists but holds nothing usable; the message names it."""


@dataclasses.dataclass(frozen=True)
class Pair:
  """One training sample: an image file and its grey mask file."""
  name: str
  image: str
  mask: str


@dataclasses.dataclass(frozen=True)
class BigTriple:
  """One BIG object: the image, the coarse mask (seg) and the ground truth."""
  name: str
  image: str
  seg: str
  gt: str


@dataclasses.dataclass
class ScanReport:
  """What a scan found (paths relative to ``root``); ``unreadable`` is None when not checked."""
  root: str
  layout: str
  matched: int = 0
  unmatched: List[str] = dataclasses.field(default_factory=list)
  duplicates: List[str] = dataclasses.field(default_factory=list)
  unreadable: Optional[List[str]] = None

  @property
  def num_unmatched(self) -> int:
    return len(self.unmatched)

  @property
  def num_duplicates(self) -> int:
    return len(self.duplicates)

  @property
  def num_unreadable(self) -> int:
    return len(self.unreadable or ())

  def summary(self) -> str:
    unreadable = "not checked" if self.unreadable is None else str(self.num_unreadable)
    text = (f"{self.root} ({self.layout}): {self.matched} matched, {self.num_unmatched} "
            f"unmatched, {self.num_duplicates} duplicate, unreadable: {unreadable}")
    for label, items in (("unmatched", self.unmatched), ("duplicate", self.duplicates),
                         ("unreadable", self.unreadable or [])):
      if items:
        shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
        text += f"\n  {label}: {shown}"
    return text


def check_folder(root: "str | os.PathLike[str]", what: str = "dataset") -> str:
  """``root`` as a string; raises a clear error when it is missing, a file, or empty."""
  root = os.fspath(root)
  if not os.path.exists(root):
    raise FileNotFoundError(f"{what}: folder {root} does not exist")
  if not os.path.isdir(root):
    raise NotADirectoryError(f"{what}: {root} is not a folder")
  if not any(not _ignored(e) for e in os.listdir(root)):
    raise FolderError(f"{what}: folder {root} is empty")
  return root


def _ignored(name: str) -> bool:
  return name.startswith(".") or name in _IGNORED_DIRS


def _walk_files(root: str) -> Iterable[Tuple[str, str]]:
  """(relative folder, file name) for every non-hidden file under root, in sorted order."""
  for folder, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not _ignored(d))
    rel = os.path.relpath(folder, root)
    rel = "" if rel == "." else rel
    for f in sorted(files):
      if not _ignored(f):
        yield rel, f


def _files_in(folder: str) -> List[str]:
  """The non-hidden files directly in folder, sorted."""
  return [f for f in sorted(os.listdir(folder))
          if not _ignored(f) and os.path.isfile(os.path.join(folder, f))]


def _split_ext(name: str) -> Tuple[str, str]:
  stem, ext = os.path.splitext(name)
  return stem, ext.lower()


def _pair_role(name: str) -> Tuple[str, Optional[str]]:
  """(stem, "image" | "mask" | None) of a file of an image/mask pair layout."""
  stem, ext = _split_ext(name)
  return stem, "image" if ext in IMAGE_EXTS else "mask" if ext in MASK_EXTS else None


def is_readable(path: str) -> bool:
  """Whether the file decodes completely (``crm_jax.io.imdecode``: a full decode)."""
  try:
    imdecode(read_bytes(path), path)
  except InputError:
    return False
  return True


def _group(entries: Sequence[Tuple[str, str, str]],
           report: ScanReport) -> Dict[Tuple[str, str], str]:
  """(key, role) -> relative path from (key, role, relative path) entries; duplicates reported."""
  seen: Dict[Tuple[str, str], List[str]] = {}
  for key, role, rel in entries:
    seen.setdefault((key, role), []).append(rel)
  unique = {}
  for k, rels in seen.items():
    if len(rels) == 1:
      unique[k] = rels[0]
    else:
      report.duplicates.extend(rels)
  report.duplicates.sort()
  return unique


def _match(entries: Sequence[Tuple[str, str, str]], roles: Sequence[str], root: str,
           report: ScanReport, check_readable: bool) -> List[Tuple[str, Dict[str, str]]]:
  """Samples (key, {role: absolute path}) that have every role; the rest goes to the report."""
  unique = _group(entries, report)
  by_key: Dict[str, Dict[str, str]] = {}
  for (key, role), rel in unique.items():
    by_key.setdefault(key, {})[role] = rel
  if check_readable:
    report.unreadable = []
  out = []
  for key in sorted(by_key):
    files = by_key[key]
    if len(files) < len(roles):
      report.unmatched.extend(files.values())
      continue
    if check_readable:
      bad = [rel for rel in files.values() if not is_readable(os.path.join(root, rel))]
      if bad:
        report.unreadable.extend(bad)
        continue
    out.append((key, {r: os.path.join(root, rel) for r, rel in files.items()}))
  report.unmatched.sort()
  report.matched = len(out)
  return out


def _check_found(out: list, report: ScanReport, what: str, layout: str, found: int) -> None:
  if not out:
    if found == 0:
      raise FolderError(f"{what}: no image or mask files in {report.root}; expected {layout}")
    raise FolderError(f"{what}: nothing pairs up in {report.root} (expected {layout}). "
                      + report.summary())


def scan_fss1000(root: "str | os.PathLike[str]", *, check_readable: bool = False,
                 what: str = "FSS-1000") -> Tuple[List[Pair], ScanReport]:
  """Pairs of ``<root>/<class>/<k>.jpg`` and ``.png``, named ``<class>/<k>``, sorted by name."""
  root = check_folder(root, what)
  report = ScanReport(root=root, layout="fss1000")
  entries = []
  for cls in sorted(os.listdir(root)):
    cls_dir = os.path.join(root, cls)
    if _ignored(cls) or not os.path.isdir(cls_dir):
      continue
    for f in _files_in(cls_dir):
      stem, role = _pair_role(f)
      if role:
        entries.append((f"{cls}/{stem}", role, os.path.join(cls, f)))
  return _pairs(entries, report, check_readable, what, FSS1000_LAYOUT)


def scan_flat(root: "str | os.PathLike[str]", *, check_readable: bool = False,
              what: str = "dataset") -> Tuple[List[Pair], ScanReport]:
  """Pairs of ``<id>.jpg`` and ``<id>.png`` found anywhere under root, named ``<id>``, sorted."""
  root = check_folder(root, what)
  report = ScanReport(root=root, layout="flat")
  entries = []
  for rel_dir, f in _walk_files(root):
    stem, role = _pair_role(f)
    if role:
      entries.append((stem, role, os.path.join(rel_dir, f)))
  return _pairs(entries, report, check_readable, what, FLAT_LAYOUT)


def _pairs(entries, report: ScanReport, check_readable: bool, what: str, layout: str):
  out = _match(entries, ("image", "mask"), report.root, report, check_readable)
  _check_found(out, report, what, layout, len(entries))
  return [Pair(name=k, image=f["image"], mask=f["mask"]) for k, f in out], report


def big_entry(f: str) -> Optional[Tuple[str, str]]:
  """(object name, role) of a BIG file name ``<name>_<role>.<ext>``, or None."""
  stem, ext = _split_ext(f)
  for role in BIG_ROLES:
    suffix = "_" + role
    if stem.endswith(suffix) and len(stem) > len(suffix):
      exts = BIG_IMAGE_EXTS if role == "im" else MASK_EXTS
      return (stem[:-len(suffix)], role) if ext in exts else None
  return None


def scan_big(root: "str | os.PathLike[str]", *, check_readable: bool = False,
             what: str = "BIG") -> Tuple[List[BigTriple], ScanReport]:
  """The complete ``<name>_im/_seg/_gt`` triples directly in root, sorted by name."""
  root = check_folder(root, what)
  report = ScanReport(root=root, layout="big")
  entries = []
  for f in _files_in(root):
    parsed = big_entry(f)
    if parsed:
      entries.append((parsed[0], parsed[1], f))
  out = _match(entries, tuple(BIG_ROLES), root, report, check_readable)
  _check_found(out, report, what, BIG_LAYOUT, len(entries))
  return [BigTriple(name=k, image=f["im"], seg=f["seg"], gt=f["gt"]) for k, f in out], report


def big_split_folders(root: "str | os.PathLike[str]", what: str = "BIG") -> Dict[str, str]:
  """{split: folder} for every subfolder of root that holds BIG files (the archive: val, test)."""
  root = check_folder(root, what)
  splits = {}
  for d in sorted(os.listdir(root)):
    path = os.path.join(root, d)
    if _ignored(d) or not os.path.isdir(path):
      continue
    if any(big_entry(f) for f in os.listdir(path) if not _ignored(f)):
      if not _SPLIT_NAME.match(d):
        raise FolderError(f"{what}: subfolder {path} holds BIG files but {d!r} is not a valid "
                          "split name (letters, digits and underscores only)")
      splits[d] = path
  if not splits:
    flat = any(big_entry(f) for f in os.listdir(root))
    hint = (" The files lie directly in it: move them into a val/ or test/ subfolder."
            if flat else "")
    raise FolderError(f"{what}: no subfolder of {root} holds BIG files; expected {root}/val/ "
                      f"and/or {root}/test/, each with {BIG_LAYOUT}.{hint}")
  return splits
