"""``make demo``: refine the bundled images with the bundled checkpoint.
The before/after IoU and mBA table and side-by-side pictures (image, coarse, refined, gt)."""

import argparse
import os
import sys

import cv2
import numpy as np

from crm_jax.bundled import DEMO_CHECKPOINT, DEMO_DATA
from crm_jax.cli.common import exit_status
from crm_jax.constants import BINARY_THRESHOLD, SCALES
from crm_jax.evaluation import evaluate, list_objects
from crm_jax.io import read_grey, read_image, read_mask
from crm_jax.outputs import write_image
from crm_jax.metrics import mask_path
from crm_jax.refine import enable_compilation_cache

PANEL_WIDTH = 640
COLOURS = {"coarse": (255, 64, 64), "refined": (64, 255, 64), "gt": (255, 255, 0)}


def boundary_overlay(image: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
  """The image with the mask's boundary drawn on it (RGB uint8)."""
  binary = (mask > BINARY_THRESHOLD).astype(np.uint8)
  contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
  out = image.copy()
  cv2.drawContours(out, contours, -1, colour, max(2, image.shape[1] // 400))
  return out


def labelled_row(panels, titles, width: int = PANEL_WIDTH) -> np.ndarray:
  """Panels of one size (RGB uint8), each resized to ``width`` px and titled, side by side."""
  size = (width, max(1, round(panels[0].shape[0] * width / panels[0].shape[1])))
  panels = [cv2.resize(p, size, interpolation=cv2.INTER_AREA) for p in panels]
  for p, title in zip(panels, titles):
    cv2.putText(p, title, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
  return np.concatenate(panels, axis=1)


def side_by_side(image, coarse, refined, gt) -> np.ndarray:
  """Four panels: image, coarse, refined, ground truth (boundaries overlaid)."""
  panels = [boundary_overlay(image, m, COLOURS[k])
            for k, m in (("coarse", coarse), ("refined", refined), ("gt", gt))]
  return labelled_row([image] + panels, ("image", "coarse", "refined", "ground truth"))


def run_demo(output: str = "demo_output", checkpoint: str = DEMO_CHECKPOINT,
             data: str = DEMO_DATA, progress: bool = True, overwrite: bool = False) -> dict:
  result = evaluate(data, checkpoint, output, SCALES, progress=progress, overwrite=overwrite)
  objects, _ = list_objects(data)
  pictures = []
  for obj in objects:
    refined_path = mask_path(output, obj.name, SCALES[-1])
    if not os.path.isfile(refined_path):
      continue
    path = os.path.join(output, f"compare_{obj.name}.png")
    write_image(path, side_by_side(read_image(obj.image), read_mask(obj.seg),
                                   read_grey(refined_path), read_mask(obj.gt)))
    pictures.append(path)
  print("\n".join(["side-by-side pictures (image | coarse | refined | ground truth):"]
                  + [f"  {p}" for p in pictures]))
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m crm_jax.cli.demo",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="demo_output")
  parser.add_argument("--overwrite", action="store_true",
                      help="--output holds masks of another model or settings (an older "
                           "version's demo): remove them and refine again")
  args = parser.parse_args(argv)
  enable_compilation_cache()
  return exit_status(lambda: run_demo(args.output, overwrite=args.overwrite))


if __name__ == "__main__":
  sys.exit(main())
