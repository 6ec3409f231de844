"""JPEG decoding rate: ``crm_jax.io.decode_image`` against plain ``cv2.imdecode``, in threads.

    python benchmarks/decode.py [--size 2048x1536] [--images 40] [--rounds 7] [--threads 1 2]

Encodes a few smooth random pictures (blurred, upscaled noise) as JPEGs in memory
(``cv2.imencode``, quality 90) and repeats them to a list of ``--images``. For each thread count,
a ``ThreadPoolExecutor`` decodes the whole list from memory with ``io.decode_image`` (RGB, damage
refused) and with ``cv2.imdecode(..., IMREAD_UNCHANGED)`` (BGR, nothing checked), the two
interleaved over ``--rounds`` rounds after one warm-up round. Prints the median images/s of
each and their ratio io/cv2.
"""

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crm_jax import io  # noqa: E402

PICTURES = 4  # distinct pictures, repeated to fill the list


def make_jpegs(width: int, height: int, count: int, quality: int = 90):
  """``count`` JPEG byte strings of ``PICTURES`` smooth random ``width`` x ``height`` pictures."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(min(PICTURES, count)):
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    img = cv2.GaussianBlur(cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC),
                           (0, 0), 3)
    ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    out.append(buf.tobytes())
  return [out[i % len(out)] for i in range(count)]


def _cv2(data: bytes) -> np.ndarray:
  return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def rates(jpegs, threads: int, rounds: int):
  """Median images/s of ``io.decode_image`` and of ``cv2.imdecode`` over ``rounds`` rounds."""
  decoders = {'io': io.decode_image, 'cv2': _cv2}
  seen = {k: [] for k in decoders}
  with ThreadPoolExecutor(threads) as pool:
    for r in range(rounds + 1):  # round 0 warms up
      for key, decode in decoders.items():
        start = time.perf_counter()
        for _ in pool.map(decode, jpegs):
          pass
        if r:
          seen[key].append(len(jpegs) / (time.perf_counter() - start))
  return {k: statistics.median(v) for k, v in seen.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='2048x1536', help='WxH of the pictures')
  parser.add_argument('--images', type=int, default=40, help='JPEGs decoded per round')
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
  args = parser.parse_args(argv)
  width, height = (int(v) for v in args.size.split('x'))
  jpegs = make_jpegs(width, height, args.images)
  size = sum(map(len, jpegs[:PICTURES])) / min(PICTURES, len(jpegs)) / 1e3
  print(f'{width}x{height} JPEG, quality 90, {size:.0f} kB each, {args.images} images per round, '
        f'{args.rounds} rounds (median), {os.cpu_count()} CPU(s)')
  for threads in args.threads:
    r = rates(jpegs, threads, args.rounds)
    print(f'{threads} thread(s): io.decode_image {r["io"]:7.1f} img/s, cv2.imdecode '
          f'{r["cv2"]:7.1f} img/s, io/cv2 {r["io"] / r["cv2"]:.2f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
