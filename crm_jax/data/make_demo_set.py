"""Writes the bundled evaluation set (BIG layout) from the synthetic source.

    python -m crm_jax.data.make_demo_set --output crm_jax/assets/demo_big

Coarse masks: ``synthesis.lowres_segmenter_mask`` of the ground truth. Deterministic per seed.
"""

import argparse
import os

import cv2
import numpy as np

from crm_jax.data.synthesis import lowres_segmenter_mask
from crm_jax.data.synthetic import make_synthetic_pair
from crm_jax.outputs import write_image

DEFAULT_SIZES = ((1536, 2048), (1600, 2048), (1440, 1920))  # (H, W), 2K-class
DEFAULT_SEED = 2022
JPEG_QUALITY = 92


def make_demo_set(output: str, seed: int = DEFAULT_SEED, sizes=DEFAULT_SIZES) -> None:
  os.makedirs(output, exist_ok=True)
  for i, (h, w) in enumerate(sizes):
    rng = np.random.default_rng([seed, i])
    image, gt = make_synthetic_pair(h, w, rng)
    seg = lowres_segmenter_mask(gt)
    name = f"synthetic_{i:02d}"
    path = os.path.join(output, f"{name}_im.jpg")
    ok, buf = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    with open(path + ".tmp", "wb") as f:
      f.write(buf.tobytes())
    os.replace(path + ".tmp", path)
    write_image(os.path.join(output, f"{name}_gt.png"), gt)
    write_image(os.path.join(output, f"{name}_seg.png"), seg)
    print(f"wrote {name} ({w}x{h})")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True)
  parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
  args = parser.parse_args(argv)
  make_demo_set(args.output, args.seed)


if __name__ == "__main__":
  main()
