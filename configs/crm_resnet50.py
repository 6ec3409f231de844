"""The published CRM training recipe (docs/training.md and docs/data.md).

    python train.py --config configs/crm_resnet50.py --workdir runs/crm_resnet50 \
        [--config.data_dir ~/tensorflow_datasets] [--config.init checkpoints/imagenet_init]

45,000 steps of a global batch of 12 crops of 224x224 (upstream: two GPUs, about a day). The
training sets must first be prepared with ``crm_jax.data.tfds_builders.prepare`` into ``data_dir``;
``config.init`` is the ImageNet initialisation written by
``python convert_torch_weights.py --imagenet resnet50-19c8e357.pth checkpoints/imagenet_init``.
Any field can be overridden on the command line as ``--config.FIELD=VALUE``.
"""

import ml_collections

from crm_jax import constants
from crm_jax.data import tfds_builders
from crm_jax.models import fusion


def get_config() -> ml_collections.ConfigDict:
  """The published recipe; every field is explained next to it."""
  c = ml_collections.ConfigDict()
  # Architecture: a preset name ('resnet50', 'small', 'tiny'; crm_jax.models.crm) or a dict of
  # crm_jax.models.crm.ModelConfig fields.
  c.model = 'resnet50'
  # Dropout of the fusion branches and head in training (the published 0.5).
  c.dropout_rate = fusion.DROPOUT_RATE

  # Length of the run in optimiser steps. May be raised when a run is resumed.
  c.num_steps = 45_000
  # GLOBAL batch size over all hosts and devices; must be a multiple of jax.device_count().
  c.batch_size = 12
  # Side of the square training crops; every pixel centre of a crop is queried (cell 2/crop).
  c.crop_size = 224

  # Adam with L2 weight decay added to the gradient (torch.optim.Adam), crm_jax.optim.
  c.learning_rate = 2.25e-4  # initial learning rate.
  c.weight_decay = 1e-4  # L2 coefficient, added to the gradient of every parameter.
  c.lr_milestones = (22_500, 37_500)  # 0-based steps from which the rate is multiplied ...
  c.lr_gamma = 0.1  # ... by this factor (MultiStepLR).
  c.adam_b1 = 0.9  # Adam beta1.
  c.adam_b2 = 0.999  # Adam beta2.
  c.adam_eps = 1e-8  # Adam epsilon.

  # Loss weights (crm_jax.losses.crm_loss); the published command's values.
  c.ce_weight = 1.0  # binary cross-entropy with logits against gt > 0.5.
  c.l1_weight = 0.5  # mean |p - gt|.
  c.l2_weight = 0.5  # mean (p - gt)^2.
  c.grad_weight = 2.0  # mean |sobel(gt) - sobel(p)|.

  # Data. 'tfds_mixture': the concatenation of the prepared TFDS sets named in tfds_sets
  # (every one must be prepared in data_dir); 'synthetic': crm_jax.data.synthetic.SyntheticSource.
  c.dataset = 'tfds_mixture'
  # The sets of the training mixture (short names of crm_jax.data.tfds_builders); the README of
  # the published code also names 'dut_omron', which may be added here when prepared.
  c.tfds_sets = tuple(n for n in tfds_builders.TRAINING_SETS if n != 'dut_omron')
  # Folder holding the prepared TFDS sets ('~' is expanded).
  c.data_dir = '~/tensorflow_datasets'
  # Synthetic source only: number of distinct pairs and their (square) side in pixels.
  c.synthetic_num_examples = 100_000
  c.synthetic_size = 320
  # Share of examples whose coarse seg is a low-resolution segmenter's mask
  # (crm_jax.data.synthesis.lowres_segmenter_mask of the whole image's gt, factor 8 or 16) instead
  # of the published synthesis; 0 is the published recipe.
  c.lowres_mask_fraction = 0.0
  # Share of examples whose coarse seg is blurred into a continuous mask (Gaussian, sigma 0.5-4
  # px; crm_jax.data.augment.SOFT_SEG_SIGMA_RANGE), like the seg of every scale after the first
  # in the multi-scale loop; 0 is the published recipe (binary segs only).
  c.soft_seg_fraction = 0.0
  # Share of examples whose coarse seg is the crop's gt through a low-resolution segmenter of
  # factor 2-4, blurred (crm_jax.data.augment.Options.fine_seg_fraction): right away from the
  # boundary, like the seg of the later scales of the loop; 0 is the published recipe.
  c.fine_seg_fraction = 0.0
  # (low, high) or None: every training pair is first resized by a factor drawn log-uniformly in
  # [low, high] (crm_jax.data.augment.random_rescale), so that objects and boundaries are seen at
  # the pixel sizes the multi-scale loop shows on small and large images; None is the published
  # recipe.
  c.rescale_range = ml_collections.config_dict.placeholder(tuple)
  # Increasing scales in (0, 1] or None: each step draws one, s, and the encoder reads the batch's
  # image and seg resized to round(crop_size * s) (align_corners bilinear, as the multi-scale loop
  # resizes) while every pixel of the crop is queried: the geometry of the loop's pass at scale s
  # (crm_jax.data.augment.Options.pass_scales); None is the published recipe (s = 1 only).
  c.pass_scales = ml_collections.config_dict.placeholder(tuple)
  # The min_side the exported model recommends to refinement (its config.json "refine" entry;
  # crm_jax.checkpoint.recommended_min_side): used where a user gives no --min-side. 0 is the
  # published loop.
  c.refine_min_side = 0
  # Data-loading worker processes per host (grain mp_prefetch); 0 loads in the main process.
  c.num_workers = 8

  # Seed of the initialisation, the dropout keys and the data order (example j of step t is a
  # pure function of (seed, t, j)).
  c.seed = 0

  # Logging and checkpointing (workdir layout: see crm_jax/training/workdir.py). Each must be
  # positive (image_every: 0 for no pictures).
  c.log_every = 100  # console line and TensorBoard scalars every this many steps.
  c.checkpoint_every = 2_500  # training checkpoint every this many steps (and at the end).
  c.keep_checkpoints = 3  # how many of the latest training checkpoints are kept.
  c.image_every = 2_500  # TensorBoard / PNG prediction examples every this many steps.

  # Validation during training (crm_jax/training/validation.py): every eval_every steps (0:
  # never) and at the end, the multi-scale loop on every object of eval_data with the current
  # weights, IoU and mBA per scale to TensorBoard and the console, the best step in
  # WORKDIR/validation.json. eval_data: a BIG-layout folder, 'tfds:NAME[:SPLIT]' (a prepared
  # TFDS set with seg/gt features, e.g. 'tfds:crm_big:test', in data_dir) or 'synthetic' (a
  # held-out synthetic set of eval_synthetic_num_examples pairs of eval_synthetic_size pixels,
  # made in memory, nothing written). Upstream validates nothing during training: off here.
  c.eval_every = 0
  c.eval_data = ml_collections.config_dict.placeholder(str)
  c.eval_scales = constants.SCALES  # evaluate.py's scales.
  c.eval_best_metric = 'mba'  # 'iou' or 'mba' at the finest scale picks the best step.
  c.eval_synthetic_num_examples = 8
  c.eval_synthetic_size = 384

  # The network's compute dtype in training: 'float32' (the published recipe) or 'bfloat16'
  # (encoder and fusion in bfloat16; parameters, optimiser state and loss stay float32).
  c.compute_dtype = 'float32'

  # BatchNorm in training (docs/training.md, "BatchNorm"; every BatchNorm updates its running
  # variance with the unbiased batch variance, as PyTorch). 'published': each device normalises
  # with its own batch statistics and device 0's running statistics are kept, as the published
  # nn.DataParallel training does (its SynchronizedBatchNorm2d never synchronises there; the same
  # as upstream when each device holds 6 crops, batch 12 on two devices). 'all': statistics
  # synchronised over every device and host (the corrected variant). Replaces sync_batch_norm
  # (True: 'all'; False: 'published').
  c.batch_norm_sync = 'published'

  # Initial weights: a crm_jax model checkpoint directory (convert_torch_weights.py), or None for
  # a fresh initialisation. Ignored when the workdir already holds a training checkpoint.
  c.init = ml_collections.config_dict.placeholder(str)
  return c
