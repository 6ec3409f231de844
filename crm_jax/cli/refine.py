"""``crm-refine``: one image (``--image --mask --output OUT.png``) or a folder of images with their
coarse masks (``--images --masks --output DIR``) on every local device and host; the work is
``crm_jax.Refiner`` and ``crm_jax.folder_refine.refine_folder`` (docs/refining.md)."""

import argparse
import os
import sys
from typing import Optional, Sequence, Tuple

from crm_jax import checkpoint as ckpt
from crm_jax import io
from crm_jax import outputs
from crm_jax.bundled import DEMO_CHECKPOINT
from crm_jax.cli.common import add_run_flags, exit_status
from crm_jax.folder_refine import read_pair, refine_folder
from crm_jax.labels import IGNORE, classes_to_refine, write_labels
from crm_jax.preprocess import prob_to_uint8
from crm_jax.refine import Refiner, enable_compilation_cache
from crm_jax.scales import check_min_side, check_scales, small_image_advice, small_image_note


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="crm-refine",
      description="Refine one coarse mask (--image --mask --output OUT.png), or every image of a "
                  "folder with its mask from another folder (--images --masks --output DIR) on "
                  "every local device and host.")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--image", help="one image")
  source.add_argument("--images", help="folder of images (folder mode; pairing: "
                                       "docs/refining.md)")
  p.add_argument("--mask", help="the coarse mask of --image (encodings: docs/refining.md)")
  p.add_argument("--masks", help="folder of coarse masks <name><suffix>.png (folder mode)")
  p.add_argument("--labels", help="instead of --mask/--masks: a label map of class ids (PNG: "
                                  "grey 8- or 16-bit, or palette), or with --images a folder of "
                                  "them; every class is refined and the output is a label map "
                                  "(docs/labels.md)")
  p.add_argument("--ignore", type=int, default=IGNORE,
                 help=f"with --labels: the id of pixels that stay as they are and take part in no "
                      f"class (default {IGNORE}; -1: none)")
  p.add_argument("--mask-suffix", default="",
                 help="folder mode: the mask of IMAGES/<name>.jpg is MASKS/<name><suffix>.png "
                      "(default: no suffix)")
  p.add_argument("--output", required=True,
                 help="PNG of the refined mask (0-255); folder mode: the output folder")
  p.add_argument("--orientation", choices=io.ORIENTATIONS, default="stored",
                 help="EXIF orientation of images and masks: stored (default, as the published "
                      "code: ignored, with a warning line per file) or exif (read as viewers "
                      "show them; the output is in that orientation); docs/faults_and_files.md")
  add_run_flags(p, checkpoint_help="model checkpoint directory (default: the bundled small one, "
                                   "trained on synthetic shapes and composites of real "
                                   "photographs)",
                batch_help="folder mode: pairs of one size bucket refined as one batch (fused "
                           "plan)")
  return p


def _model(args) -> Tuple[str, int]:
  """The checkpoint and ``min_side`` of a run (defaults: the bundled one, its recommendation);
  one ``note:`` line on stderr says which defaults were taken, where they matter."""
  path = DEMO_CHECKPOINT if args.checkpoint is None else args.checkpoint
  min_side, min_side_note = ckpt.resolve_min_side(args.min_side, path)
  notes = [] if min_side_note is None else [min_side_note]
  if args.checkpoint is None:
    notes.insert(0, f"no --checkpoint given: using the bundled small checkpoint ({path}), "
                 "a small model trained on synthetic shapes and composites of real photographs; "
                 "for the published accuracy convert the published weights (docs/big.md)")
  if notes:
    print("note: " + "; ".join(notes), file=sys.stderr)
  return path, min_side


def _refine_one(args) -> None:
  """One image; the output is checked first, never an input, replaced only with --overwrite."""
  scales = check_scales(args.scales)
  if args.min_side is not None:
    check_min_side(args.min_side)
  source = args.mask or args.labels
  outputs.check_output_file(args.output, inputs=(args.image, source))
  if os.path.exists(args.output) and not args.overwrite:
    raise io.InputError(f"{args.output}: already exists; pass --overwrite to replace it")
  outputs.remove_leftovers(os.path.dirname(os.path.abspath(args.output)))
  image, mask = read_pair(args.image, source, args.orientation, labels=bool(args.labels))
  ignore = None if args.ignore < 0 else args.ignore
  if args.labels:
    classes_to_refine(mask.labels, None, ignore, args.labels)
  check_scales(scales, image.shape[:2])
  path, min_side = _model(args)
  note = None if min_side else small_image_note(scales, image.shape[:2])
  if note is not None:
    print(f"warning: {args.image} is {note}; {small_image_advice(scales, image.shape[:2])}",
          file=sys.stderr)
  if args.export:
    refiner = Refiner.from_export(args.export, checkpoint=path, min_side=min_side,
                                  warn_small=False)
  else:
    refiner = Refiner.from_checkpoint(path, dtype=args.dtype, plan=args.plan,
                                      min_side=min_side, warn_small=False)
  if args.labels:
    mask.labels = refiner.refine_labels(image, mask.labels, ignore=ignore, scales=scales)
    write_labels(args.output, mask)
  else:
    outputs.write_image(args.output, prob_to_uint8(refiner.refine(image, mask, scales)))
  print(f"wrote {args.output}")


def _refine_folder(args) -> None:
  path, min_side = _model(args)
  refine_folder(args.images, args.masks or args.labels, args.output, path,
                suffix=args.mask_suffix, scales=args.scales, min_side=min_side,
                dtype=args.dtype, plan=args.plan, batch_size=args.batch_size,
                devices=args.devices, overwrite=args.overwrite, progress=not args.no_progress,
                export=args.export, orientation=args.orientation, labels=bool(args.labels),
                ignore=None if args.ignore < 0 else args.ignore)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """0, or 2 after one ``error:`` line (folder mode: only when nothing could be refined)."""
  p = parser()
  args = p.parse_args(argv)
  if [args.mask, args.masks, args.labels].count(None) != 2:
    p.error("give one of --mask (with --image), --masks (with --images) or --labels")
  if args.image is not None and args.masks is not None:
    p.error("--image needs --mask or --labels (--masks goes with --images)")
  if args.images is not None and args.mask is not None:
    p.error("--images needs --masks or --labels (--mask goes with --image)")
  io.show_warnings_as_lines()
  enable_compilation_cache()
  return exit_status(lambda: (_refine_one if args.image is not None else _refine_folder)(args))


if __name__ == "__main__":
  sys.exit(main())
