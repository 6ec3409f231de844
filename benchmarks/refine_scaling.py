"""Refinement throughput of ``evaluate.py`` on 1, 2 and 4 devices and on 2 processes.

    python benchmarks/refine_scaling.py [--objects 16] [--config tiny] [--devices 1 2 4] \
        [--processes 2]

Writes a BIG-layout folder of ``--objects`` synthetic objects (images of 96-128 pixels, each
side) and a randomly initialised checkpoint of ``--config`` (``tiny`` or ``small``) to a
temporary folder, then runs ``evaluate.py --scales 0.5 1.0`` as a subprocess per setting:
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` for N devices in one process, and for
``--processes P`` P processes of one device each (jax.distributed on 127.0.0.1). Each setting
runs twice into fresh output folders, sharing a persistent compilation cache: the first run
fills the cache, the second is timed. The figure is objects per second of refinement
(``refined / refine_seconds`` of ``metrics.json``; loading the checkpoint and the metrics are
left out, loading cached compilations is in).

On the CPU, forced host devices (and local processes) share the machine's cores: the figure
says how well the work is spread over devices and processes and what the scheduling costs, not
what more chips would give. On an accelerator host, ``--devices`` counts real chips (then leave
the XLA flag out: ``--no-force``).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_world(root: str, objects: int, config_name: str):
  import cv2
  import jax
  import numpy as np

  from crm_jax.checkpoint import save_model
  from crm_jax.data.synthesis import lowres_segmenter_mask
  from crm_jax.data.synthetic import make_synthetic_pair
  from crm_jax.models.crm import CRM, SMALL, TINY, init_variables

  data = os.path.join(root, "data")
  os.makedirs(data)
  rng = np.random.default_rng(0)
  for i in range(objects):
    h, w = (int(x) for x in rng.integers(96, 129, size=2))
    image, gt = make_synthetic_pair(h, w, rng)
    seg = lowres_segmenter_mask(gt, rng)
    cv2.imwrite(os.path.join(data, f"b{i:03d}_im.jpg"), image[:, :, ::-1])
    cv2.imwrite(os.path.join(data, f"b{i:03d}_seg.png"), seg)
    cv2.imwrite(os.path.join(data, f"b{i:03d}_gt.png"), gt)
  config = {"tiny": TINY, "small": SMALL}[config_name]
  ckpt = save_model(os.path.join(root, "ckpt"),
                    init_variables(CRM(config), jax.random.key(0)), config)
  return data, ckpt


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(data: str, ckpt: str, out: str, devices: int, processes: int, env: dict,
        force: bool) -> dict:
  """One evaluate.py run (``processes`` of them at once, ``devices`` each: forced host devices
  when ``force``); the metrics.json it wrote."""
  cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--data", data, "--checkpoint",
         ckpt, "--output", out, "--scales", "0.5", "1.0", "--no-progress", "--devices",
         str(devices)]
  port = _free_port()
  procs = []
  for pid in range(processes):
    penv = dict(env)
    if force:
      penv["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if processes > 1:
      penv.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                  JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=penv, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  for p in procs:
    text = p.communicate()[0]
    if p.returncode != 0:
      raise SystemExit(f"evaluate.py failed:\n{text[-3000:]}")
  with open(os.path.join(out, "metrics.json")) as f:
    return json.load(f)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--objects", type=int, default=16)
  parser.add_argument("--config", choices=("tiny", "small"), default="tiny")
  parser.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4])
  parser.add_argument("--processes", type=int, nargs="*", default=[2])
  parser.add_argument("--no-force", action="store_true",
                      help="real devices: do not force the host device count")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="refine_scaling_") as root:
    data, ckpt = make_world(root, args.objects, args.config)
    env = dict(os.environ, CRM_JAX_CACHE_DIR=os.path.join(root, "xla_cache"),
               PYTHONUNBUFFERED="1")
    if not args.no_force:
      env["JAX_PLATFORMS"] = "cpu"
    settings = [(n, 1) for n in args.devices] + [(1, p) for p in args.processes]
    print(f"{args.objects} objects of 96-128 px, {args.config} model, scales 0.5 1.0")
    print(f"{'processes':>9} {'devices/process':>15} {'objects/s':>10} {'s/object':>9}")
    for devices, processes in settings:
      for attempt in ("warm-up", "timed"):
        out = os.path.join(root, f"out_{devices}x{processes}_{attempt}")
        blob = run(data, ckpt, out, devices, processes, env, not args.no_force)
      rate = blob["refined"] / blob["refine_seconds"]
      print(f"{processes:>9} {devices:>15} {rate:>10.2f} {1 / rate:>9.3f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
