"""The refinement benchmarks run end to end at a tiny size (their figures are not asserted)."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch = pytest.importorskip("torch")  # the benchmarks compare against the PyTorch reference


def _run(script, *args):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args],
                        cwd=REPO, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_refine_speed_device_check_at_a_tiny_size():
  out = _run("refine_speed.py", "--device-check", "--config", "tiny", "--sizes", "96x80",
             "--images-per-size", "2", "--batch-shape", "64x48", "--batch-pairs", "3",
             "--scales", "0.5", "1.0")
  line = next(l for l in out.splitlines() if l.startswith("96x80:"))
  for part in ("float32 first", "bfloat16 first", "torch first", "torch/jax float32",
               "torch/jax bfloat16"):
    assert part in line
  assert len(re.findall(r"refine_batch 64x48 (float32|bfloat16): [0-9.]+ pairs/s", out)) == 2


def test_profile_stages_at_a_tiny_size():
  out = _run("profile_stages.py", "--config", "tiny", "--size", "96x80", "--scales", "0.5",
             "1.0")
  stages = {l.split("|")[1].strip() for l in out.splitlines() if l.startswith("| ")}
  assert {"stem", "layer1", "layer2", "layer3", "branches", "fusion head", "queries",
          "total"} <= stages


def test_decode_at_a_tiny_size():
  out = _run("decode.py", "--size", "96x64", "--images", "6", "--rounds", "2")
  lines = [l for l in out.splitlines() if l.startswith(("1 thread", "2 thread"))]
  assert len(lines) == 2, out
  for line in lines:
    assert re.search(r"io\.decode_image +[0-9.]+ img/s, cv2\.imdecode +[0-9.]+ img/s, "
                     r"io/cv2 [0-9.]+$", line), line
