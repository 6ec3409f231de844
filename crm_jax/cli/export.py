"""``crm-export``: the fused plan's programs of a checkpoint, serialized for chosen image sizes
and platforms (``jax.export``; docs/benchmarks.md), run by ``crm-refine ... --export OUT_DIR``:
``crm-export CKPT OUT_DIR (--data IMAGES | --sizes 3840x2160 ...) [--platforms cuda tpu]``."""

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

from crm_jax import export as export_lib
from crm_jax import io
from crm_jax.cli.common import exit_status
from crm_jax.constants import REFLECT_PAD, SCALES
from crm_jax.geometry import BUCKET_STEPS, bucket_shape
from crm_jax.plans import BATCH_LADDER
from crm_jax.refine import DTYPES


def _size(text: str) -> Tuple[int, int]:
  """``WxH`` -> ``(H, W)``."""
  try:
    w, h = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 3840x2160")
  if w <= 2 * REFLECT_PAD or h <= 2 * REFLECT_PAD:
    raise argparse.ArgumentTypeError(f"{text!r}: both sides must exceed {2 * REFLECT_PAD}")
  return h, w


def _folder_sizes(folder: str) -> List[Tuple[int, int]]:
  """The ``(H, W)`` of every image file directly in ``folder``, from its header."""
  if not os.path.isdir(folder):
    raise io.InputError(f"{folder}: no such folder (--data)")
  paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if not n.startswith(".")
           and n.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"))]
  sizes = [s for s in map(io.file_image_size, filter(os.path.isfile, paths)) if s is not None]
  if not sizes:
    raise io.InputError(f"{folder}: no image whose size its header gives (--data)")
  return sizes


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="crm-export", description=__doc__.splitlines()[0])
  p.add_argument("checkpoint", metavar="CKPT", help="crm-jax model checkpoint (or workdir)")
  p.add_argument("out_dir", metavar="OUT_DIR", help="the export folder to write")
  sizes = p.add_mutually_exclusive_group(required=True)
  sizes.add_argument("--sizes", type=_size, nargs="+", metavar="WxH",
                     help="image sizes to export for (their size buckets)")
  sizes.add_argument("--data", metavar="DIR",
                     help="export for the size of every image in DIR (a BIG folder or images)")
  p.add_argument("--platforms", nargs="+", default=list(export_lib.DEFAULT_PLATFORMS),
                 choices=("cpu", "cuda", "rocm", "tpu"),
                 help="platforms the programs lower for (default: %(default)s)")
  p.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
  p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[1],
                 choices=BATCH_LADDER, help="batch rungs to export (default: 1)")
  p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parser().parse_args(argv)

  def run():
    sizes = args.sizes or _folder_sizes(args.data)
    buckets = sorted({bucket_shape((h + 2 * REFLECT_PAD, w + 2 * REFLECT_PAD), BUCKET_STEPS)
                      for h, w in sizes})
    export_lib.export_fused(args.checkpoint, args.out_dir, buckets, args.scales, args.dtype,
                            args.platforms, batch_sizes=args.batch_sizes,
                            overwrite=args.overwrite)
    print(f"wrote {args.out_dir}: {len(buckets)} bucket(s) x {len(args.scales)} scale(s) x "
          f"{len(args.batch_sizes)} batch size(s), {args.dtype}, for "
          f"{', '.join(args.platforms)}")

  return exit_status(run)


if __name__ == "__main__":
  sys.exit(main())
