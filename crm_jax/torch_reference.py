"""An independent PyTorch CRM (float32, or float64 after ``.double()``), the yardstick of
``crm-convert --verify`` and the parity tests; written from docs/, importing nothing of crm_jax.
Published key names (``feats``, ``aspp_``, ``imnet``). NCHW; coordinates ``(y, x)``."""

import math
import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

TORCH_MISSING = ("the PyTorch reference (crm_jax.torch_reference) needs PyTorch: "
                 "pip install 'crm-jax[torch]' (torch==2.13.0)")

try:
  import torch
except ImportError:
  raise ImportError(TORCH_MISSING) from None
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # docs/model.md, inputs.
PAD, SCALES, CHUNK = 32, (0.125, 0.25, 0.5, 1.0), 802816  # docs/refinement.md.


class Bottleneck(nn.Module):
  """``conv1`` 1x1, ``conv2`` 3x3 (stride, dilation), ``conv3`` 1x1, optional ``downsample``."""

  def __init__(self, in_ch, width, expansion, stride, dilation, downsample):
    super().__init__()
    out_ch = width * expansion
    self.conv1, self.bn1 = nn.Conv2d(in_ch, width, 1, bias=False), nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3, self.bn3 = nn.Conv2d(width, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
    self.relu = nn.ReLU()
    self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                    nn.BatchNorm2d(out_ch)) if downsample else None

  def forward(self, x):
    y = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(self.bn3(self.conv3(y)) + shortcut)


class ResNetFeatures(nn.Module):
  """``feats``: ``[B, 4, H, W]`` -> (x1, x2, x3); also runs ``layer4`` (result unused)."""

  def __init__(self, stem_width, stage_sizes, stage_widths, expansion,
               layer4_blocks, layer4_width):
    super().__init__()
    self.conv1 = nn.Conv2d(4, stem_width, 7, stride=2, padding=3, bias=False)
    self.bn1, self.relu = nn.BatchNorm2d(stem_width), nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    in_ch = stem_width
    # Per layer: the first block's stride (its dilation is 1), the later blocks' dilation.
    plan = zip((1, 2, 1, 1), (1, 1, 2, 4), [*stage_sizes, layer4_blocks],
               [*stage_widths, layer4_width])
    for n, (stride, d, size, width) in enumerate(plan):
      if size:
        blocks = [Bottleneck(in_ch, width, expansion, stride, 1, True)]
        in_ch = width * expansion
        blocks += [Bottleneck(in_ch, width, expansion, 1, d, False) for _ in range(size - 1)]
        setattr(self, f"layer{n + 1}", nn.Sequential(*blocks))

  def forward(self, x):
    x1 = self.relu(self.bn1(self.conv1(x)))
    x2 = self.layer1(self.maxpool(x1))
    x3 = self.layer3(self.layer2(x2))
    if hasattr(self, "layer4"):
      self.layer4(x3)  # Computed as published (its BatchNorm statistics train); never used.
    return x1, x2, x3


class Fusion(nn.Module):
  """``aspp_`` (ASPP_no4level): branches on x1, x2, x3 resized to x1, then ``last_conv``."""

  NAMES = ("128", "256", "1024")

  def __init__(self, in_widths, widths, feature_dim, dropout_rate=0.5):
    super().__init__()
    for n, in_ch, width in zip(self.NAMES, in_widths, widths):
      setattr(self, f"aspp1_{n}", nn.Sequential(OrderedDict(
          atrous_conv=nn.Conv2d(in_ch, width, 1, bias=False), bn=nn.BatchNorm2d(width))))
      setattr(self, f"bn1_{n}", nn.BatchNorm2d(width))
    self.dropout = nn.Dropout(dropout_rate)
    self.last_conv = nn.Sequential(
        nn.Conv2d(sum(widths), feature_dim, 3, padding=1, bias=False),
        nn.BatchNorm2d(feature_dim), nn.ReLU(), nn.Dropout(dropout_rate))

  def forward(self, x1, x2, x3):
    a, b, c = (self.dropout(F.relu(getattr(self, f"bn1_{n}")(
        F.relu(getattr(self, f"aspp1_{n}")(x))))) for n, x in zip(self.NAMES, (x1, x2, x3)))
    b, c = (F.interpolate(t, size=a.shape[-2:], mode="bilinear", align_corners=True)
            for t in (b, c))
    return self.last_conv(torch.cat([a, b, c], dim=1))


def make_coord(shape: Sequence[int], flatten: bool = True) -> torch.Tensor:
  """Pixel centres ``-1 + 1/n + 2i/n``: ``[n0*n1, 2]`` (flatten) or ``[n0, n1, 2]``, ``(y, x)``."""
  seqs = [-1 + 1.0 / n + (2 * (1.0 / n)) * torch.arange(n).float() for n in shape]
  grid = torch.stack(torch.meshgrid(*seqs, indexing="ij"), dim=-1)
  return grid.reshape(-1, 2) if flatten else grid


SHIFTS = ((-1, -1), (-1, 1), (1, -1), (1, 1))  # (vy, vx), first sign outer.


class TorchCRM(nn.Module):
  """CRM with the published module names; arguments as ``ModelConfig``'s, plus the unused
  ``layer4``'s size (0 blocks: none; width default ``2 * stage_widths[-1]``)."""

  def __init__(self, stem_width=64, stage_sizes=(3, 4, 6), stage_widths=(64, 128, 256),
               expansion=4, fusion_widths=(64, 64, 128), feature_dim=256,
               decoder_hidden=(32, 32, 32, 32), dropout_rate=0.5, layer4_blocks=3,
               layer4_width: Optional[int] = None):
    super().__init__()
    self.feats = ResNetFeatures(stem_width, stage_sizes, stage_widths, expansion, layer4_blocks,
                                2 * stage_widths[-1] if layer4_width is None else layer4_width)
    in_widths = (stem_width, stage_widths[0] * expansion, stage_widths[2] * expansion)
    self.aspp_ = Fusion(in_widths, fusion_widths, feature_dim, dropout_rate)
    dims = [feature_dim + 6, *decoder_hidden]  # imnet.layers: Linear/ReLU pairs, Linear to 1.
    layers = [m for i, o in zip(dims, dims[1:]) for m in (nn.Linear(i, o), nn.ReLU())]
    self.imnet = nn.Sequential(OrderedDict(layers=nn.Sequential(*layers,
                                                                nn.Linear(dims[-1], 1))))

  def features(self, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, 4, H, W]`` -> F ``[B, feature_dim, h, w]``."""
    return self.aspp_(*self.feats(x))

  def query(self, feat: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor,
            return_indices: bool = False):
    """Logits ``[B, Q]`` at ``coord`` ``[B, Q, 2]`` (y, x) with ``cell`` ``[B, Q, 2]`` (and
    with ``return_indices`` the nearest (iy, ix) per shift, ``[B, Q, 4, 2]``)."""
    b, _, h, w = feat.shape
    feat_coord = make_coord((h, w), flatten=False).permute(2, 0, 1)[None]
    feat_coord = feat_coord.expand(b, 2, h, w).to(feat.device, feat.dtype)
    index_grid = torch.stack(torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(),
                                            indexing="ij"))[None]
    index_grid = index_grid.expand(b, 2, h, w).to(feat.device, feat.dtype)
    rel_cell = cell * cell.new_tensor([h, w])

    def sample(src, grid):  # grid_sample wants (x, y); returns [B, Q, C].
      out = F.grid_sample(src, grid.flip(-1).unsqueeze(1), mode="nearest",
                          align_corners=False)
      return out[:, :, 0, :].permute(0, 2, 1)

    preds, areas, indices = [], [], []
    for vy, vx in SHIFTS:
      c = coord + coord.new_tensor([vy * (1 / h) + 1e-6, vx * (1 / w) + 1e-6])
      c.clamp_(-1 + 1e-6, 1 - 1e-6)
      rel = (coord - sample(feat_coord, c)) * coord.new_tensor([h, w])
      preds.append(self.imnet(torch.cat([sample(feat, c), rel, coord, rel_cell], dim=-1))[..., 0])
      areas.append(torch.abs(rel[:, :, 0] * rel[:, :, 1]) + 1e-9)
      if return_indices:
        indices.append(sample(index_grid, c).round().long())
    total = torch.stack(areas).sum(dim=0)
    out = sum(p * (a / total) for p, a in zip(preds, areas[::-1]))
    return (out, torch.stack(indices, dim=2)) if return_indices else out

  def forward(self, x, coord, cell):
    return self.query(self.features(x), coord, cell)


def config_from_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, object]:
  """``TorchCRM`` keyword arguments read off a state dict's shapes (``module.`` prefix or not)."""
  state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}

  def blocks(n):
    return 1 + max([int(m.group(1)) for m in map(
        re.compile(rf"feats\.layer{n}\.(\d+)\.").match, state) if m], default=-1)

  def out(key):
    return state[key].shape[0]

  widths = [out(f"feats.layer{n}.0.conv1.weight") for n in (1, 2, 3)]
  hidden = []
  while f"imnet.layers.{2 * len(hidden)}.weight" in state:
    hidden.append(out(f"imnet.layers.{2 * len(hidden)}.weight"))
  l4 = blocks(4)
  return dict(
      stem_width=out("feats.conv1.weight"), stage_sizes=tuple(blocks(n) for n in (1, 2, 3)),
      stage_widths=tuple(widths), expansion=out("feats.layer1.0.conv3.weight") // widths[0],
      fusion_widths=tuple(out(f"aspp_.aspp1_{n}.atrous_conv.weight") for n in Fusion.NAMES),
      feature_dim=out("aspp_.last_conv.0.weight"), decoder_hidden=tuple(hidden[:-1]),
      layer4_blocks=l4, layer4_width=out("feats.layer4.0.conv1.weight") if l4 else None)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
  """Random weights and non-trivial BatchNorm parameters and statistics, in place."""
  g = torch.Generator().manual_seed(seed)

  def uniform(shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=g)

  for name, m in model.named_modules():
    if isinstance(m, nn.Conv2d):
      fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
      m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
    elif isinstance(m, nn.BatchNorm2d):
      n = m.num_features
      last = name.endswith("bn3") or name.endswith("downsample.1")
      m.weight.copy_(uniform(n, 0.1, 0.4) if last else uniform(n, 0.5, 1.5))
      m.bias.copy_(torch.randn(n, generator=g) * 0.2)
      m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
      m.running_var.copy_(uniform(n, 0.5, 2.0))
      m.num_batches_tracked.fill_(int(torch.randint(1, 50000, (1,), generator=g)))
    elif isinstance(m, nn.Linear):
      bound = math.sqrt(6.0 / m.in_features) * (4.0 if m.out_features == 1 else 1.0)
      m.weight.copy_(uniform(m.weight.shape, -bound, bound))
      m.bias.copy_(uniform(m.bias.shape, -0.5, 0.5))
  return model


def save_like_dataparallel(model: nn.Module, path: str) -> Dict[str, torch.Tensor]:
  """Saves ``{'module.' + key: tensor}`` (as ``nn.DataParallel`` would); returns it."""
  state = {"module." + k: v.detach().clone() for k, v in model.state_dict().items()}
  torch.save(state, path)
  return state


# The multi-scale test loop (docs/refinement.md).

def prepare_inputs(image: np.ndarray, mask: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
  """RGB uint8 ``[H, W, 3]``, grey uint8 ``[H, W]`` -> normalised, reflect-padded image
  ``[1, 3, H', W']`` and seg ``[1, 1, H', W']`` in [-1, 1]."""
  img = torch.from_numpy(np.ascontiguousarray(image)).float().permute(2, 0, 1) / 255
  img = (img - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
  seg = (torch.from_numpy(np.ascontiguousarray(mask)).float()[None] / 255 - 0.5) / 0.5
  return tuple(F.pad(t[None], (PAD, PAD, PAD, PAD), mode="reflect") for t in (img, seg))


def grid_queries(big_h: int, big_w: int) -> Tuple[torch.Tensor, torch.Tensor]:
  """Every pixel centre of ``(H, W)``: coord and cell ``[1, H*W, 2]``."""
  return make_coord((big_h, big_w))[None], torch.tensor([2 / big_h, 2 / big_w]).repeat(
      1, big_h * big_w, 1)


@torch.no_grad()
def refine_reference(model: TorchCRM, image: np.ndarray, mask: np.ndarray,
                     scales: Sequence[float] = SCALES,
                     chunk: int = CHUNK) -> Dict[float, np.ndarray]:
  """The published multi-scale loop on RGB uint8 ``[H, W, 3]`` and grey uint8 ``[H, W]``, on the
  model's device: ``{s: prob [H, W] float32}`` after each scale."""
  model.eval()
  device = next(model.parameters()).device
  img, seg = (t.to(device) for t in prepare_inputs(image, mask))
  big_h, big_w = img.shape[-2:]
  coord, cell = (t.to(device) for t in grid_queries(big_h, big_w))
  out = {}
  for s in scales:
    size = (round(big_h * s), round(big_w * s))
    im_s, seg_s = (F.interpolate(t, size=size, mode="bilinear", align_corners=True)
                   for t in (img, seg))
    if torch.sum(seg_s + 1) < 2:
      prob = torch.zeros(big_h * big_w, device=device)
    else:
      feat = model.features(torch.cat([im_s, seg_s], dim=1))
      parts = [model.query(feat, coord[:, i:i + chunk], cell[:, i:i + chunk])
               for i in range(0, coord.shape[1], chunk)]
      prob = torch.sigmoid(torch.cat(parts, dim=1))[0]
    prob = prob.view(big_h, big_w)
    out[s] = prob[PAD:-PAD, PAD:-PAD].cpu().numpy().astype(np.float32).copy()
    seg = ((prob - 0.5) * 2)[None, None]
  return out


# The training loss and step (docs/training.md).

def sobel(x: torch.Tensor) -> torch.Tensor:
  """Smoothed Sobel magnitude of ``x`` ``[B, 1, H, W]``, same shape."""
  x = F.avg_pool2d(x, 3, stride=1, padding=1)  # Padding counted (default).
  kx = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]], dtype=x.dtype) / 4
  gx, gy = (F.conv2d(x, k.reshape(1, 1, 3, 3), padding=1) for k in (kx, kx.t()))
  return torch.sqrt(gx * gx + gy * gy + 1e-4)


def crm_loss_reference(logit: torch.Tensor, gt: torch.Tensor, ce_w=1.0, l1_w=0.5,
                       l2_w=0.5, grad_w=2.0) -> Tuple[torch.Tensor, Dict[str, float]]:
  """The CRM loss on ``logit`` and ``gt`` ``[B, 1, H, W]``: (total, parts); published weights."""
  p = torch.sigmoid(logit)
  parts = {"ce": F.binary_cross_entropy_with_logits(logit, (gt > 0.5).to(logit.dtype)),
           "l1": F.l1_loss(p, gt), "l2": F.mse_loss(p, gt),
           "grad": F.l1_loss(sobel(p), sobel(gt))}
  total = (ce_w * parts["ce"] + l1_w * parts["l1"] + l2_w * parts["l2"]
           + grad_w * parts["grad"])
  return total, {k: float(v.detach()) for k, v in parts.items()}


def make_optimizer(model: nn.Module, lr: float = 2.25e-4, weight_decay: float = 1e-4,
                   milestones: Sequence[int] = (22500, 37500), gamma: float = 0.1,
                   betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
  """``(Adam with L2 weight decay, MultiStepLR stepped once per iteration)``, as published."""
  optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps,
                               weight_decay=weight_decay)
  return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma)


def data_parallel_forward(model: TorchCRM, x: torch.Tensor, coord: torch.Tensor,
                          cell: torch.Tensor, num_devices: int = 1):
  """``model(x, coord, cell)`` as ``nn.DataParallel`` runs it on ``num_devices`` GPUs
  (docs/training.md, "BatchNorm"): ``(logits [B, Q], each replica's buffers after it)``."""
  chunks = list(zip(x.chunk(num_devices), coord.chunk(num_devices), cell.chunk(num_devices)))
  # Replicas copy the buffers as they were before the step; replica 0 updates the model's own.
  buffers = [{n: b.detach().clone() for n, b in model.named_buffers()} for _ in chunks]
  outputs = [model(*chunks[0])]
  buffers[0] = {n: b.detach().clone() for n, b in model.named_buffers()}
  outputs += [torch.func.functional_call(model, replica_buffers, chunk)
              for chunk, replica_buffers in zip(chunks[1:], buffers[1:])]
  return torch.cat(outputs), buffers


def train_step_reference(model: TorchCRM, optimizer, scheduler, image: torch.Tensor,
                         seg: torch.Tensor, gt: torch.Tensor, num_devices: int = 1,
                         weights: Optional[Mapping[str, float]] = None):
  """One published ``train.py`` iteration on ``image`` ``[B, 3, S, S]``, ``seg`` and ``gt``
  ``[B, 1, S, S]``: ``(loss parts, every parameter's gradient, the replicas' buffers)``."""
  model.train()
  b, _, size, _ = gt.shape
  coord, cell = (t.expand(b, -1, -1).to(image.dtype) for t in grid_queries(size, size))
  logits, buffers = data_parallel_forward(model, torch.cat([image, seg], dim=1), coord, cell,
                                          num_devices)
  total, parts = crm_loss_reference(logits.view(b, 1, size, size), gt, **dict(weights or {}))
  parts["total"] = float(total.detach())
  optimizer.zero_grad()
  total.backward()
  grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
           for n, p in model.named_parameters()}
  optimizer.step()
  scheduler.step()
  return parts, grads, buffers
