"""The documentation's links: every relative link in README.md and docs/*.md names a file that
exists, and every ``#anchor`` a heading of that file; the README stays one page (at most 150
lines). No JAX: this runs in the fast tier."""

import collections
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 150
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(path):
  """The lines outside fenced code blocks, with their numbers."""
  in_fence = False
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if FENCE.match(line):
        in_fence = not in_fence
        continue
      if not in_fence:
        yield number, line


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: the rendered text lower-cased, punctuation other than '-' and
  '_' dropped, spaces to '-'."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
  text = re.sub(r"<[^>]+>", "", text).strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(path):
  """Every heading anchor of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
  seen = collections.Counter()
  out = set()
  for _, line in prose_lines(path):
    m = HEADING.match(line)
    if not m:
      continue
    base = slug(m.group(2))
    name = base if not seen[base] else f"{base}-{seen[base]}"
    seen[base] += 1
    out.add(name)
  return out


def links(path):
  for number, line in prose_lines(path):
    text = INLINE_CODE.sub("", line)
    for m in list(LINK.finditer(text)) + list(HTML_LINK.finditer(text)):
      yield number, m.group(1)


def test_slug_follows_github():
  assert slug("Small images and `min_side`") == "small-images-and-min_side"
  assert slug("What differs from the published code, and why") == (
      "what-differs-from-the-published-code-and-why")
  assert slug("Training throughput and bfloat16, measured") == (
      "training-throughput-and-bfloat16-measured")


def test_there_are_pages():
  names = {os.path.basename(p) for p in DOCS}
  assert {"README.md", "refining.md", "architecture.md", "testing.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
  bad = []
  for number, target in links(path):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
      continue
    file_part, _, anchor = target.partition("#")
    where = (os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part
             else path)
    if not os.path.exists(where):
      bad.append(f"line {number}: {target}: no file {os.path.relpath(where, ROOT)}")
      continue
    if anchor:
      if not where.endswith(".md") or os.path.isdir(where):
        bad.append(f"line {number}: {target}: an anchor into a file that is not Markdown")
      elif anchor not in anchors(where):
        bad.append(f"line {number}: {target}: no heading '#{anchor}' in "
                   f"{os.path.relpath(where, ROOT)}")
  assert not bad, "\n".join(bad)


def test_readme_is_one_page():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    count = sum(1 for _ in f)
  assert count <= README_MAX_LINES, f"README.md has {count} lines (at most {README_MAX_LINES})"
