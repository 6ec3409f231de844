"""Console lines, a progress bar and TensorBoard (tensorboardX) on process 0; example pictures."""

from __future__ import annotations

import functools
import os
import sys
from typing import Dict, List

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX
from tensorboardX.proto.summary_pb2 import Summary
from tqdm import tqdm

from crm_jax import losses
from crm_jax.constants import IMAGE_MEAN, IMAGE_STD
from crm_jax.data.augment import loop_resize
from crm_jax.models.crm import CRM, ModelConfig
from crm_jax.training.step import queries
from crm_jax.training.workdir import TENSORBOARD_DIR

NUM_EXAMPLE_IMAGES = 4  # rows of the example-prediction picture.
_LOSS_PARTS = ('total', 'ce', 'l1', 'l2', 'grad', 'grad_norm', 'param_norm')
_COUNTS = ('seg_intersection', 'seg_union', 'pred_intersection', 'pred_union')


class Logger:
  """Console lines, tqdm and TensorBoard on process 0; silent elsewhere."""

  def __init__(self, workdir: str, start: int, total: int, enabled: bool):
    self.writer = self.bar = None
    if enabled:
      self.writer = tensorboardX.SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR))
      self.bar = tqdm(total=total, initial=start, desc='train', unit='step', dynamic_ncols=True,
                      file=sys.stderr, mininterval=1.0)

  def line(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text, file=sys.stdout)

  def advance(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def scalars(self, step: int, values: Dict[str, float]) -> None:
    if self.writer is not None:
      for k, v in values.items():
        self.writer.add_scalar(k, v, step)
      self.writer.flush()

  def image(self, step: int, tag: str, picture: np.ndarray) -> None:
    """An RGB uint8 ``[H, W, 3]`` picture as a TensorBoard image (PNG-encoded by OpenCV)."""
    if self.writer is not None:
      ok, png = cv2.imencode('.png', np.ascontiguousarray(picture[:, :, ::-1]))
      if not ok:
        return
      image = Summary.Image(height=picture.shape[0], width=picture.shape[1], colorspace=3,
                            encoded_image_string=png.tobytes())
      self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]),
                                          step)
      self.writer.flush()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()


def fetch_window(window) -> list:
  """The replicated metrics of the steps in ``window`` as host dicts (one transfer)."""
  return [{k: np.asarray(v[0]) for k, v in m.items()} for m in jax.device_get(window)]


def summarize(window: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
  """Means of the loss parts, IoUs from the summed counts, last lr, over host metrics."""
  out = {k: float(np.mean([m[k] for m in window])) for k in _LOSS_PARTS}
  counts = {k: np.sum([m[k] for m in window]) for k in _COUNTS}
  out.update({k: float(v) for k, v in losses.iou_from_counts(counts).items()})
  out['lr'] = float(window[-1]['lr'])
  return out


def format_train_line(done: int, num_steps: int, s: Dict[str, float], rate: float) -> str:
  return (f'step {done}/{num_steps}: loss {s["total"]:.4f} (ce {s["ce"]:.4f} l1 {s["l1"]:.4f}'
          f' l2 {s["l2"]:.4f} grad {s["grad"]:.4f}) lr {s["lr"]:.3g} IoU seg '
          f'{s["seg_iou"]:.4f} pred {s["pred_iou"]:.4f} | {rate:.2f} steps/s')


@functools.lru_cache(maxsize=4)
def _predict_fn(model_cfg: ModelConfig):
  model = CRM(model_cfg)

  @functools.partial(jax.jit, static_argnums=3)
  def predict(variables, image, seg, s):
    b = image.shape[0]
    coord, cell = queries(s, b)
    logits = model.apply(variables, jnp.concatenate([image, seg], -1), coord, cell)
    return jax.nn.sigmoid(logits.reshape(b, s, s, 1))

  return predict


def example_picture(model_cfg: ModelConfig, variables, batch: Dict[str, np.ndarray]) -> np.ndarray:
  """Rows of [image | coarse seg | prediction (eval mode) | gt], RGB uint8 ``[n*S, 4*S, 3]``."""
  n = min(NUM_EXAMPLE_IMAGES, batch['image'].shape[0])
  image, seg, gt = batch['image'][:n], batch['seg'][:n], batch['gt'][:n]
  s = gt.shape[1]  # image and seg are smaller under a pass scale < 1
  prob = np.asarray(_predict_fn(model_cfg)(variables, image, seg, s))
  image, seg = loop_resize(image, (s, s)), loop_resize(seg, (s, s))
  rgb = image * np.asarray(IMAGE_STD, np.float32) + np.asarray(IMAGE_MEAN, np.float32)
  grey = lambda m: np.repeat(np.clip(m, 0, 1), 3, axis=-1)
  panels = [np.clip(rgb, 0, 1), grey((seg + 1) / 2), grey(prob), grey(gt)]
  rows = np.concatenate(panels, axis=2)  # [n, S, 4S, 3]
  return (rows.reshape(-1, rows.shape[2], 3) * 255 + 0.5).astype(np.uint8)
