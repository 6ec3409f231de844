"""Scanning dataset folders laid out as the original archives (docs/data.md): FSS-1000
(``scan_fss1000``), flat salient-object sets paired by stem anywhere under the root (``scan_flat``)
and BIG (``scan_big``, ``big_split_folders``); unpaired and duplicate files go to a ``ScanReport``.
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

  def summary(self) -> str:
    unreadable = "not checked" if self.unreadable is None else str(len(self.unreadable))
    text = (f"{self.root} ({self.layout}): {self.matched} matched, {self.num_unmatched} "
            f"unmatched, {len(self.duplicates)} duplicate, unreadable: {unreadable}")
    for label, items in (("unmatched", self.unmatched), ("duplicate", self.duplicates),
                         ("unreadable", self.unreadable or [])):
      if items:
        text += f"\n  {label}: " + ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
    return text


def check_folder(root: "str | os.PathLike[str]", what: str = "dataset") -> str:
  """``root`` as a string; raises a clear error when it is missing, a file, or empty."""
  root = os.fspath(root)
  if not os.path.exists(root):
    raise FileNotFoundError(f"{what}: folder {root} does not exist")
  if not os.path.isdir(root):
    raise NotADirectoryError(f"{what}: {root} is not a folder")
  if all(_ignored(e) for e in os.listdir(root)):
    raise FolderError(f"{what}: folder {root} is empty")
  return root


def _ignored(name: str) -> bool:
  return name.startswith(".") or name in _IGNORED_DIRS


def _files_in(folder: str) -> List[str]:
  """The non-hidden files directly in folder, sorted."""
  return [f for f in sorted(os.listdir(folder))
          if not _ignored(f) and os.path.isfile(os.path.join(folder, f))]


def _subfolders(root: str) -> Iterable[Tuple[str, str]]:
  """(name, path) of the non-hidden folders directly in root, sorted."""
  for d in sorted(os.listdir(root)):
    if not _ignored(d) and os.path.isdir(os.path.join(root, d)):
      yield d, os.path.join(root, d)


def _pair_role(name: str) -> Tuple[str, Optional[str]]:
  """(stem, "image" | "mask" | None) of a file of an image/mask pair layout."""
  stem, ext = os.path.splitext(name)
  ext = ext.lower()
  return stem, "image" if ext in IMAGE_EXTS else "mask" if ext in MASK_EXTS else None


def is_readable(path: str) -> bool:
  """Whether the file decodes completely (``crm_jax.io.imdecode``: a full decode)."""
  try:
    imdecode(read_bytes(path), path)
  except InputError:
    return False
  return True


def _match(entries: Sequence[Tuple[str, str, str]], roles: Sequence[str], report: ScanReport,
           check_readable: bool, what: str, layout: str) -> List[Tuple[str, Dict[str, str]]]:
  """(key, {role: absolute path}) of the keys that have one file for every role, sorted by key,
  from (key, role, relative path) entries; the rest goes to ``report``. FolderError if none."""
  found: Dict[str, Dict[str, List[str]]] = {}
  for key, role, rel in entries:
    found.setdefault(key, {}).setdefault(role, []).append(rel)
  report.unreadable = [] if check_readable else None
  out = []
  for key in sorted(found):
    files = {role: rels[0] for role, rels in found[key].items() if len(rels) == 1}
    report.duplicates.extend(r for rels in found[key].values() if len(rels) > 1 for r in rels)
    if len(files) < len(roles):
      report.unmatched.extend(files.values())
      continue
    bad = check_readable and [r for r in files.values()
                              if not is_readable(os.path.join(report.root, r))]
    if bad:
      report.unreadable.extend(bad)
      continue
    out.append((key, {r: os.path.join(report.root, rel) for r, rel in files.items()}))
  report.duplicates.sort()
  report.unmatched.sort()
  report.matched = len(out)
  if not out and not entries:
    raise FolderError(f"{what}: no image or mask files in {report.root}; expected {layout}")
  if not out:
    raise FolderError(f"{what}: nothing pairs up in {report.root} (expected {layout}). "
                      + report.summary())
  return out


def scan_fss1000(root: "str | os.PathLike[str]", *, check_readable: bool = False,
                 what: str = "FSS-1000") -> Tuple[List[Pair], ScanReport]:
  """Pairs of ``<root>/<class>/<k>.jpg`` and ``.png``, named ``<class>/<k>``, sorted by name."""
  root = check_folder(root, what)
  entries = [(f"{cls}/{stem}", role, os.path.join(cls, f))
             for cls, cls_dir in _subfolders(root) for f in _files_in(cls_dir)
             for stem, role in [_pair_role(f)] if role]
  report = ScanReport(root, "fss1000")
  out = _match(entries, ("image", "mask"), report, check_readable, what, FSS1000_LAYOUT)
  return [Pair(k, **f) for k, f in out], report


def scan_flat(root: "str | os.PathLike[str]", *, check_readable: bool = False,
              what: str = "dataset") -> Tuple[List[Pair], ScanReport]:
  """Pairs of ``<id>.jpg`` and ``<id>.png`` found anywhere under root, named ``<id>``, sorted."""
  root = check_folder(root, what)
  entries = []
  for folder, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not _ignored(d))
    rel = os.path.relpath(folder, root)
    for f in sorted(files):
      stem, role = _pair_role(f)
      if role and not _ignored(f):
        entries.append((stem, role, os.path.join("" if rel == "." else rel, f)))
  report = ScanReport(root, "flat")
  out = _match(entries, ("image", "mask"), report, check_readable, what, FLAT_LAYOUT)
  return [Pair(k, **f) for k, f in out], report


def big_entry(f: str) -> Optional[Tuple[str, str]]:
  """(object name, role) of a BIG file name ``<name>_<role>.<ext>``, or None."""
  stem, ext = os.path.splitext(f)
  for role in BIG_ROLES:
    if stem.endswith("_" + role) and len(stem) > len(role) + 1:
      exts = BIG_IMAGE_EXTS if role == "im" else MASK_EXTS
      return (stem[:-len(role) - 1], role) if ext.lower() in exts else None
  return None


def scan_big(root: "str | os.PathLike[str]", *, check_readable: bool = False,
             what: str = "BIG") -> Tuple[List[BigTriple], ScanReport]:
  """The complete ``<name>_im/_seg/_gt`` triples directly in root, sorted by name."""
  root = check_folder(root, what)
  report = ScanReport(root, "big")
  entries = [(*big_entry(f), f) for f in _files_in(root) if big_entry(f)]
  out = _match(entries, tuple(BIG_ROLES), report, check_readable, what, BIG_LAYOUT)
  return [BigTriple(name=k, image=f["im"], seg=f["seg"], gt=f["gt"]) for k, f in out], report


def big_split_folders(root: "str | os.PathLike[str]", what: str = "BIG") -> Dict[str, str]:
  """{split: folder} for every subfolder of root that holds BIG files (the archive: val, test)."""
  root = check_folder(root, what)
  splits = {}
  for d, path in _subfolders(root):
    if any(big_entry(f) for f in os.listdir(path) if not _ignored(f)):
      if not _SPLIT_NAME.match(d):
        raise FolderError(f"{what}: subfolder {path} holds BIG files but {d!r} is not a valid "
                          "split name (letters, digits and underscores only)")
      splits[d] = path
  if not splits:
    hint = (" The files lie directly in it: move them into a val/ or test/ subfolder."
            if any(big_entry(f) for f in os.listdir(root)) else "")
    raise FolderError(f"{what}: no subfolder of {root} holds BIG files; expected {root}/val/ "
                      f"and/or {root}/test/, each with {BIG_LAYOUT}.{hint}")
  return splits
