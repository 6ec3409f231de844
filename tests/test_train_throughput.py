"""benchmarks/train_throughput.py runs at a tiny size and reports both sides and their ratio."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_throughput_script_at_a_tiny_size(dtype):
  pytest.importorskip('torch')
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'train_throughput.py'), '--model',
         'tiny', '--batch', '4', '--crop', '32', '--steps', '2', '--warmup', '1', '--dtype',
         dtype, '--torch-layer4-blocks', '1']
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  jax_ips = re.search(r'^crm-jax: ([\d.]+) images/s \(([\d.]+) s/step\)', out.stdout, re.M)
  torch_ips = re.search(r'^PyTorch \S+: ([\d.]+) images/s \(([\d.]+) s/step', out.stdout, re.M)
  ratio = re.search(r'^ratio crm-jax / PyTorch: ([\d.]+)x', out.stdout, re.M)
  assert jax_ips and torch_ips and ratio, out.stdout
  assert f'{dtype};' in out.stdout
  for m in (jax_ips, torch_ips):  # images/s is the batch over the seconds per step
    assert float(m.group(1)) == pytest.approx(4 / float(m.group(2)), rel=0.02)
  assert float(ratio.group(1)) == pytest.approx(
      float(torch_ips.group(2)) / float(jax_ips.group(2)), rel=0.05)
