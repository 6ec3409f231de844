"""crm-jax -> PyTorch export: the inverse mapping, the ``.pth`` writer and ``export_torch``.

The yardstick is the independent PyTorch reference (``crm_jax/torch_reference.py``): a
randomised reference state dict survives PyTorch -> crm-jax -> PyTorch bit for bit, the exported
file loads into the reference with ``strict=True`` from ``torch.load(weights_only=True)``, and
the exported bundled checkpoint refines in PyTorch as crm-jax refines.

    .venv/bin/python -m pytest -q tests/test_to_torch.py
"""

import os
import sys

import cv2
import numpy as np
import pytest

from crm_jax import checkpoint as ckpt
from crm_jax.bundled import DEMO_CHECKPOINT, DEMO_DATA
from crm_jax.convert import convert_state_dict, export_torch
from crm_jax.io import read_image, read_mask
from crm_jax.models.crm import RESNET50, SMALL, TINY
from crm_jax.preprocess import prob_to_uint8
from crm_jax.refine import Refiner
from crm_jax.torch_mapping import (MappingError, PREFIX, flax_to_torch, save_torch_state_dict,
                                   strip_prefix, torch_to_flax)

try:
  import torch
  from crm_jax import torch_reference as ref
except ImportError:  # Every test here is then skipped (requires_torch).
  torch = ref = None

requires_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
LAYER4 = PREFIX + "feats.layer4."
COUNTER = "num_batches_tracked"


def _random_state(config, seed, count):
  """A randomised reference's state dict, ``module.``-prefixed numpy arrays, with every
  ``num_batches_tracked`` set to ``count``."""
  net = ref.randomize_(ref.TorchCRM(**config.architecture()), seed)
  state = {}
  for key, value in net.state_dict().items():
    if key.endswith(COUNTER):
      value = torch.full_like(value, count)
    state[PREFIX + key] = value.numpy().copy()
  return state


def _load_reference(state):
  """The reference network sized by ``state`` (prefixed numpy or tensors), loaded strictly."""
  state = {k: torch.as_tensor(v) for k, v in strip_prefix(state).items()}
  net = ref.TorchCRM(**ref.config_from_state_dict(state))
  net.load_state_dict(state, strict=True)
  return net.eval()


def _same_tensors(a, b):
  """Keys, dtypes, shapes and bytes equal; returns the keys that differ."""
  assert set(a) == set(b), sorted(set(a) ^ set(b))[:8]
  return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
          or np.ascontiguousarray(a[k]).tobytes() != np.ascontiguousarray(b[k]).tobytes()]


# ----------------------------------------------------------------------------
# The inverse mapping.
# ----------------------------------------------------------------------------

@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("config", [RESNET50, SMALL, TINY], ids=["resnet50", "small", "tiny"])
def test_round_trip_is_bit_equal(config):
  count = 1000 + sum(config.stage_sizes)  # A known, non-zero counter to pass through.
  state = _random_state(config, seed=len(config.decoder_hidden) + config.stem_width, count=count)
  variables, skipped = torch_to_flax(state)
  back = flax_to_torch(variables, config, num_batches_tracked=count)
  # Every entry of the published layout comes back, under its published name and dtype.
  assert list(back) == list(dict.fromkeys(back)) and set(back) == set(state)
  assert all(k.startswith(PREFIX) for k in back)
  used = [k for k in state if not k.startswith(LAYER4)]
  differ = _same_tensors({k: state[k] for k in used}, {k: back[k] for k in used})
  assert not differ, f"{len(differ)} tensors differ: {differ[:6]}"
  assert sorted(skipped) == sorted(k[len(PREFIX):] for k in state
                                   if k.startswith(LAYER4) or k.endswith(COUNTER))
  # layer4 (not in the Flax model) comes back as placeholders of the right shapes and dtypes:
  # zero convs, BatchNorms as PyTorch initialises them, the counter passed in.
  fresh = {PREFIX + k: v.numpy() for k, v in
           ref.TorchCRM(**config.architecture()).state_dict().items()}
  layer4 = [k for k in state if k.startswith(LAYER4)]
  assert layer4
  for key in layer4:
    assert back[key].dtype == state[key].dtype and back[key].shape == state[key].shape, key
    if key.endswith(".weight") and back[key].ndim == 4:
      assert not back[key].any(), key
    elif key.endswith(COUNTER):
      assert back[key] == count
    else:
      np.testing.assert_array_equal(back[key], fresh[key], err_msg=key)
  # The counter is every BatchNorm's, and a different one is passed through too.
  again = flax_to_torch(variables, config, num_batches_tracked=count + 1)
  assert _same_tensors(back, again) == [k for k in back if k.endswith(COUNTER)]


@pytest.mark.torch
@requires_torch
def test_flax_to_torch_refuses_what_does_not_fit():
  state = _random_state(TINY, seed=0, count=0)
  variables, _ = torch_to_flax(state)
  with pytest.raises(MappingError, match="the model needs"):
    flax_to_torch(variables, SMALL)
  del variables["params"]["fusion"]["last_conv"]
  with pytest.raises(MappingError, match="variables do not match the model: missing"):
    flax_to_torch(variables, TINY)
  for bad in (-1, 1.5, True, "7"):
    with pytest.raises(MappingError, match="num_batches_tracked must be"):
      flax_to_torch(variables, TINY, num_batches_tracked=bad)


# ----------------------------------------------------------------------------
# The file: plain tensors, strict loading, atomic writing.
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
  """A randomised SMALL reference and its crm-jax checkpoint (with a training step in meta)."""
  root = tmp_path_factory.mktemp("to_torch")
  state = _random_state(SMALL, seed=11, count=0)
  variables, _ = torch_to_flax(state)
  steps = 4321
  path = ckpt.save_model(str(root / "small"), variables, SMALL, meta={"step": steps})
  return dict(root=root, state=state, dir=path, steps=steps)


@pytest.mark.torch
@requires_torch
def test_exported_file_loads_strictly_and_computes_the_same(small_checkpoint, tmp_path):
  out = str(tmp_path / "crm_small.pth")
  lines = []
  returned = export_torch(small_checkpoint["dir"], out, log=lines.append)
  assert len(lines) == 1 and out in lines[0]
  loaded = torch.load(out, map_location="cpu", weights_only=True)
  assert type(loaded) is dict and list(loaded) == list(returned)
  assert all(type(v) is torch.Tensor for v in loaded.values())
  differ = _same_tensors({k: v.numpy() for k, v in loaded.items()}, returned)
  assert not differ, differ[:6]
  # Converted back, the file gives the checkpoint's variables bit for bit.
  config, variables = ckpt.load_model(small_checkpoint["dir"])
  config_back, variables_back, _ = convert_state_dict({k: v.numpy() for k, v in loaded.items()})
  assert config_back == config
  assert ckpt.fingerprint(config_back, variables_back) == ckpt.fingerprint(config, variables)
  counters = {int(v) for k, v in loaded.items() if k.endswith(COUNTER)}
  assert counters == {small_checkpoint["steps"]}  # meta["step"] of the checkpoint.
  source = small_checkpoint["state"]
  assert set(loaded) == set(source)
  exported = _load_reference(loaded)
  # Also the reference built from the config alone (layer4 sized as published).
  ref.TorchCRM(**SMALL.architecture()).load_state_dict(strip_prefix(loaded), strict=True)
  # The exported network computes what the source network computes, on random inputs.
  original = _load_reference(source)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(size=(1, 4, 45, 58)).astype(np.float32))
  coord = torch.from_numpy(rng.uniform(-1, 1, size=(1, 500, 2)).astype(np.float32))
  cell = torch.full_like(coord, 2 / 45)
  with torch.no_grad():
    want = original(x, coord, cell)
    got = exported(x, coord, cell)
  assert float(want.std()) > 0.1
  torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.torch
@requires_torch
def test_export_refuses_to_overwrite_and_counts_zero_without_a_step(small_checkpoint,
                                                                    tmp_path):
  out = str(tmp_path / "out.pth")
  export_torch(small_checkpoint["dir"], out, log=lambda *_: None)
  before = open(out, "rb").read()
  with pytest.raises(FileExistsError, match=out):
    export_torch(small_checkpoint["dir"], out, log=lambda *_: None)
  assert open(out, "rb").read() == before
  # A checkpoint without meta["step"] (converted weights): counters 0.
  config, variables = ckpt.load_model(small_checkpoint["dir"])
  no_step = ckpt.save_model(str(tmp_path / "no_step"), variables, config, meta={})
  state = export_torch(no_step, out, overwrite=True, log=lambda *_: None)
  assert {int(v) for k, v in state.items() if k.endswith(COUNTER)} == {0}
  loaded = torch.load(out, weights_only=True)
  assert {int(v) for k, v in loaded.items() if k.endswith(COUNTER)} == {0}
  with pytest.raises(ckpt.CheckpointError, match=str(tmp_path)):
    export_torch(small_checkpoint["dir"], str(tmp_path), log=lambda *_: None)


def _leftovers(folder):
  return sorted(f for f in os.listdir(folder) if ".tmp-" in f)


@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("serialisation failed")],
                         ids=["oserror", "runtimeerror"])
def test_write_is_atomic(small_checkpoint, tmp_path, monkeypatch, error):
  state = small_checkpoint["state"]
  real_save = torch.save

  def failing_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 a partial archive")
    f.flush()
    raise error

  monkeypatch.setattr(torch, "save", failing_save)
  target = tmp_path / "new.pth"
  with pytest.raises(ckpt.CheckpointError) as info:
    save_torch_state_dict(str(target), state)
  message = str(info.value)
  assert message.startswith(f"{target}: cannot be written") and "\n" not in message
  assert not target.exists() and _leftovers(tmp_path) == []
  # Over an existing file: the old file stays as it was.
  monkeypatch.setattr(torch, "save", real_save)
  save_torch_state_dict(str(target), state)
  before = target.read_bytes()
  monkeypatch.setattr(torch, "save", failing_save)
  with pytest.raises(ckpt.CheckpointError, match=str(target)):
    save_torch_state_dict(str(target), {k: v * 0 for k, v in state.items()}, overwrite=True)
  assert target.read_bytes() == before and _leftovers(tmp_path) == []


@pytest.mark.torch
@requires_torch
def test_writer_errors_are_one_line(tmp_path, monkeypatch):
  path = str(tmp_path / "x.pth")
  with pytest.raises(MappingError, match=f"{path}: a is not a numeric array"):
    save_torch_state_dict(path, {"a": np.array([object()])})
  with pytest.raises(MappingError, match="keys must be strings"):
    save_torch_state_dict(path, {1: np.zeros(2)})
  assert not os.path.exists(path) and _leftovers(tmp_path) == []
  monkeypatch.setitem(sys.modules, "torch", None)  # PyTorch absent.
  with pytest.raises(MappingError, match=f"{path}: writing PyTorch checkpoints needs torch"):
    save_torch_state_dict(path, {"a": np.zeros(2)})


# ----------------------------------------------------------------------------
# The exported bundled checkpoint refines in PyTorch as crm-jax refines.
# ----------------------------------------------------------------------------

def _demo_pair(width=256):
  image = read_image(os.path.join(DEMO_DATA, "synthetic_00_im.jpg"))
  mask = read_mask(os.path.join(DEMO_DATA, "synthetic_00_seg.png"))
  h = round(image.shape[0] * width / image.shape[1])
  image = cv2.resize(image, (width, h), interpolation=cv2.INTER_AREA)
  mask = cv2.resize(mask, (width, h), interpolation=cv2.INTER_AREA)
  return image, mask


@pytest.mark.torch
@requires_torch
def test_exported_bundled_checkpoint_refines_like_crm_jax(tmp_path):
  out = str(tmp_path / "crm_small.pth")
  export_torch(DEMO_CHECKPOINT, out, log=lambda *_: None)
  net = _load_reference(torch.load(out, map_location="cpu", weights_only=True))
  image, mask = _demo_pair()
  want = ref.refine_reference(net, image, mask)
  got = Refiner.from_checkpoint(DEMO_CHECKPOINT, min_side=0).refine_all_scales(image, mask)
  assert list(got) == list(want) == list(ref.SCALES)
  for s in want:
    a, b = prob_to_uint8(got[s]).astype(int), prob_to_uint8(want[s]).astype(int)
    assert a.shape == b.shape == mask.shape
    assert b.std() > 40, s  # A real mask, not a constant map.
    diff = np.abs(a - b)
    close = float(np.mean(diff <= 1))
    print(f"scale {s}: worst {diff.max()} grey levels, {100 * close:.4f} % within 1")
    assert close >= 0.999, (s, close, diff.max())
