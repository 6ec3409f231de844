"""Converts PyTorch weights into a crm-jax model checkpoint.

    python convert_torch_weights.py CKPT.pth OUT_DIR [--verify]
        a published CRM checkpoint (e.g. model_45705) -> OUT_DIR
    python convert_torch_weights.py --imagenet resnet50-19c8e357.pth OUT_DIR
        torchvision's ImageNet ResNet-50 -> an initial CRM checkpoint for train.py --init

``--verify`` runs the PyTorch reference (tests/torch_reference.py) and the JAX
model on random inputs and prints the largest logit difference.
"""

import argparse
import sys

from crm_jax.checkpoint import CheckpointError
from crm_jax.convert import convert_crm, convert_imagenet, verify_conversion
from crm_jax.torch_mapping import MappingError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("checkpoint", help="PyTorch .pth file")
  parser.add_argument("out_dir", help="crm-jax model checkpoint directory to write")
  parser.add_argument("--imagenet", action="store_true",
                      help="the input is torchvision's ImageNet ResNet-50")
  parser.add_argument("--seed", type=int, default=0,
                      help="--imagenet: seed of the fresh fusion/decoder weights")
  parser.add_argument("--verify", action="store_true",
                      help="compare JAX and PyTorch logits on random inputs")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    if args.imagenet:
      convert_imagenet(args.checkpoint, args.out_dir, args.seed, args.overwrite)
    else:
      convert_crm(args.checkpoint, args.out_dir, args.overwrite)
      if args.verify:
        diff = verify_conversion(args.checkpoint, args.out_dir)
        print(f"verify: largest |logit difference| JAX vs PyTorch = {diff:.3g}")
  except (MappingError, CheckpointError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
