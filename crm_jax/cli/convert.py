"""``crm-convert`` (``convert_torch_weights.py`` in a checkout): PyTorch weights in and out
(``crm_jax.convert``; docs/model.md): ``crm-convert [--imagenet | --to-torch] SOURCE TARGET``."""

import argparse
import sys
from typing import Optional, Sequence

from crm_jax import convert
from crm_jax.checkpoint import CheckpointError
from crm_jax.torch_mapping import MappingError


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="crm-convert",
      description="Converts PyTorch weights into a crm-jax model checkpoint, or (--to-torch) a "
                  "crm-jax model into a PyTorch state_dict in the published layout.")
  p.add_argument("source", metavar="SOURCE",
                 help="PyTorch .pth file (--to-torch: a crm-jax model checkpoint or workdir)")
  p.add_argument("target", metavar="TARGET",
                 help="crm-jax model checkpoint directory to write (--to-torch: the .pth file)")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--imagenet", action="store_true",
                    help="SOURCE is torchvision's ImageNet ResNet-50")
  mode.add_argument("--to-torch", action="store_true",
                    help="write SOURCE (a crm-jax model) as a PyTorch state_dict TARGET")
  p.add_argument("--seed", type=int, default=0,
                 help="--imagenet: seed of the fresh fusion/decoder weights")
  p.add_argument("--verify", action="store_true",
                 help="compare JAX and PyTorch logits on random inputs (needs PyTorch)")
  p.add_argument("--overwrite", action="store_true", help="replace TARGET if it exists")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Returns the exit status (2 and one ``error:`` line on bad input)."""
  args = parser().parse_args(argv)
  try:
    if args.imagenet:
      convert.convert_imagenet(args.source, args.target, args.seed, args.overwrite)
    elif args.to_torch:
      convert.export_torch(args.source, args.target, overwrite=args.overwrite)
    else:
      convert.convert_crm(args.source, args.target, args.overwrite)
      if args.verify:
        diff = convert.verify_conversion(args.source, args.target)
        print(f"verify: largest |logit difference| JAX vs PyTorch = {diff:.3g}")
  except (MappingError, CheckpointError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
