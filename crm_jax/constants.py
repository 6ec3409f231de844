"""The constants of CRM, imported from here by every module (what each means: docs/, below)."""

# Inputs (docs/model.md).
IMAGE_MEAN = (0.485, 0.456, 0.406)  # RGB, applied after /255.
IMAGE_STD = (0.229, 0.224, 0.225)
SEG_MEAN = 0.5  # seg/255 -> (x - 0.5) / 0.5, in [-1, 1].
SEG_STD = 0.5

# BatchNorm (docs/model.md; PyTorch eps; PyTorch momentum 0.1 == Flax momentum 0.9).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# Alignment and local ensemble (docs/decoder.md).
SHIFT_EPS = 1e-6  # added to shifted queries, and the clamp margin.
AREA_EPS = 1e-9  # added to each ensemble area.
DECODER_SHIFTS = ((-1, -1), (-1, 1), (1, -1), (1, 1))  # (vy, vx), first sign outer.

# The multi-scale test procedure (docs/refinement.md).
SCALES = (0.125, 0.25, 0.5, 1.0)
REFLECT_PAD = 32  # pixels added on every side before refinement, cropped after.
EMPTY_SEG_SUM = 2.0  # seg in [-1, 1] is "empty" when sum(seg + 1) < 2.

# Metrics (docs/metrics.md).
BINARY_THRESHOLD = 128  # grey > 128 is foreground.
SMALL_SEG_GREY_SUM = 32 * 32  # input seg grey sum below this: refined := input seg.
MBA_NUM_RADII = 5
MBA_MIN_RADIUS = 1  # r_i = 1 + int((r_max - 1) / 5 * i), i = 0..4.
MBA_RADIUS_DIVISOR = 300  # r_max = (W + H) / 300.

# Training (docs/training.md).
SOBEL_EPS = 1e-4
TRAIN_SEG_THRESHOLD = 0.5  # on the [-1, 1] seg (a quirk: prob > 0.75).
TRAIN_PROB_THRESHOLD = 0.5
TRAIN_GT_THRESHOLD = 0.5
