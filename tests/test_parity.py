"""Parity of the JAX port with the independent PyTorch reference, and conversion.

The reference is ``crm_jax/torch_reference.py`` (written from the published PyTorch
code's behaviour, not from the JAX code). Random weights with non-trivial BatchNorm statistics, eval mode,
float32, random inputs; logits agree within 1e-4.

    .venv/bin/python -m pytest -q tests/test_parity.py
"""

import functools
import json
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convert_torch_weights
from crm_jax import checkpoint as ckpt
from crm_jax import losses
from crm_jax.convert import convert_crm, convert_state_dict, verify_conversion
from crm_jax.io import InputError
from crm_jax.models.crm import CRM, RESNET50, SMALL, TINY
from crm_jax.ops import make_coord as jax_make_coord
from crm_jax.preprocess import prob_to_uint8
from crm_jax.plans import PLANS
from crm_jax.refine import Refiner
from crm_jax.torch_mapping import MappingError, expected_keys

try:
  import torch
  from crm_jax import torch_reference as ref
except ImportError:  # Every test here is then skipped (requires_torch).
  torch = ref = None

requires_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4
QUERY_FACTORS = (1, 2, 5, 16)
FULL_GRID_LIMIT = 60_000  # Larger query grids are checked on a covering sample.


# ----------------------------------------------------------------------------
# Shared models and helpers.
# ----------------------------------------------------------------------------

def _reference(config, seed):
  return ref.randomize_(ref.TorchCRM(**config.architecture()), seed).eval()


def _layer4_and_counters(keys):
  layer4 = [k for k in keys if k.startswith("module.feats.layer4.")]
  counters = [k for k in keys if k.endswith("num_batches_tracked")]
  return layer4, counters


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """SMALL reference saved like DataParallel, converted and loaded back.

  Returns a dict: ``net`` (torch), ``ckpt`` (.pth path), ``dir`` (converted),
  ``config``, ``variables``, ``log`` (converter output), ``warnings``.
  """
  root = tmp_path_factory.mktemp("conversion")
  net = _reference(SMALL, seed=0)
  path = str(root / "crm_small.pth")
  state = ref.save_like_dataparallel(net, path)
  out_dir = str(root / "converted")
  log = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    convert_crm(path, out_dir, log=log.append)
    config, variables = ckpt.load_model(out_dir)
  return dict(net=net, ckpt=path, dir=out_dir, state=state, config=config,
              variables=variables, log=log, warnings=[str(w.message) for w in caught])


@pytest.fixture(scope="module")
def resnet50():
  """The full published architecture, random weights, converted in memory."""
  net = _reference(RESNET50, seed=1)
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  config, variables, _ = convert_state_dict(state)
  return net, config, variables


@functools.lru_cache(maxsize=None)
def _jitted(config):
  """Jitted entry points of ``CRM(config)`` (few compilations per shape).

  ``network(v, x, coord, cell, rows, size)``: the encoder features, F, the
  end-to-end ``CRM.__call__`` logits and indices, and the fused path
  (``project`` + ``decode_grid``) on ``rows`` of the grid ``size``.
  ``queries(v, F, coord, cell, rows, size)``: the same two query paths on F.
  """
  model = CRM(config)

  def fused(v, feature_map, rows, size):
    projected = model.apply(v, feature_map, method=CRM.project)[0]
    return model.apply(v, projected, rows, size, method=CRM.decode_grid)

  def network(v, x, coord, cell, rows, size):
    feats = model.apply(v, x, method=lambda m, x: m.encoder(x))
    feature_map = model.apply(v, x, method=CRM.features)
    full = model.apply(v, x, coord, cell, return_indices=True)
    return feats, feature_map, full, fused(v, feature_map, rows, size)

  def queries(v, feature_map, coord, cell, rows, size):
    out = model.apply(v, feature_map, coord, cell, True,
                      method=lambda m, *a: m.implicit_decoder(*a))
    return out, fused(v, feature_map, rows, size)

  return (jax.jit(network, static_argnums=5), jax.jit(queries, static_argnums=5))


def _torch(x):
  return torch.from_numpy(np.ascontiguousarray(x))


def _queries(h, w, factor, rng):
  """Query coordinates ``[Q, 2]`` on the grid ``factor`` times finer than (h, w).

  The whole grid when it is small; otherwise every row and every column of
  it (one random partner each) plus 20000 random grid points. The nearest
  index along y depends on the row alone and along x on the column alone, so
  covering every row and column checks the indices of the whole grid.
  Returns ``(coord [Q, 2], cell [2], grid size)``.
  """
  big_h, big_w = factor * h, factor * w
  grid = ref.make_coord((big_h, big_w), flatten=False).numpy()
  if big_h * big_w <= FULL_GRID_LIMIT:
    coord = grid.reshape(-1, 2)
  else:
    rows, cols = np.arange(big_h), np.arange(big_w)
    coord = np.concatenate([
        grid[rows, rng.integers(0, big_w, big_h)],
        grid[rng.integers(0, big_h, big_w), cols],
        grid[rng.integers(0, big_h, 20000), rng.integers(0, big_w, 20000)],
    ])
  cell = np.asarray([2 / big_h, 2 / big_w], np.float32)
  return coord.astype(np.float32), cell, (big_h, big_w)


def _check_network(net, config, variables, size, seed):
  """Per-stage activations, logits, indices and the fused path vs the reference.

  The 1x query grid goes end to end through ``CRM.__call__``; the finer ones
  query the JAX feature map with the implicit decoder.
  """
  network, queries = _jitted(config)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(1,) + size + (4,)).astype(np.float32)
  x_t = _torch(x.transpose(0, 3, 1, 2))
  with torch.no_grad():
    t_stages = net.feats(x_t)
    t_feat = net.features(x_t)
  h, w = t_feat.shape[-2:]
  feature_map = None
  for factor in QUERY_FACTORS:
    coord, cell, (big_h, big_w) = _queries(h, w, factor, rng)
    cells = np.broadcast_to(cell, coord.shape).copy()
    # The fused path on whole rows: first, last and random ones (8, one compile).
    rows = np.unique(np.concatenate([[0, big_h - 1], rng.integers(0, big_h, 6)]))
    rows = np.resize(rows, 8).astype(np.int32)
    if feature_map is None:  # Factor 1: end to end.
      feats, feature_map, (logits, idx), fused = network(
          variables, x, coord[None], cells[None], rows, (big_h, big_w))
      for name, want in zip(("x1", "x2", "x3"), t_stages):
        np.testing.assert_allclose(np.asarray(feats[name]).transpose(0, 3, 1, 2),
                                   want.numpy(), atol=ATOL, err_msg=name)
      np.testing.assert_allclose(np.asarray(feature_map).transpose(0, 3, 1, 2),
                                 t_feat.numpy(), atol=ATOL, err_msg="F")
    else:
      (logits, idx), fused = queries(variables, feature_map, coord[None], cells[None],
                                     rows, (big_h, big_w))
    with torch.no_grad():
      t_logits, t_idx = net.query(t_feat, _torch(coord[None]), _torch(cells[None]),
                                  return_indices=True)
      grid = ref.make_coord((big_h, big_w), flatten=False)[torch.from_numpy(rows)]
      t_rows = net.query(t_feat, grid.reshape(1, -1, 2),
                         _torch(np.broadcast_to(cell, (1, rows.size * big_w, 2))))
    msg = f"input {size}, queries {factor}x finer ({big_h}x{big_w})"
    np.testing.assert_array_equal(np.asarray(idx), t_idx.numpy(), err_msg=msg)
    np.testing.assert_allclose(np.asarray(logits), t_logits.numpy(), atol=ATOL,
                               err_msg=msg)
    np.testing.assert_allclose(np.asarray(fused), t_rows.numpy().reshape(rows.size, big_w),
                               atol=ATOL, err_msg="fused, " + msg)
  return t_logits


# ----------------------------------------------------------------------------
# Key names and conversion.
# ----------------------------------------------------------------------------

@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("config", [RESNET50, SMALL, TINY], ids=["resnet50", "small", "tiny"])
def test_converter_keys_are_the_reference_keys(config):
  state = ref.TorchCRM(**config.architecture()).state_dict()
  used = {k: tuple(v.shape) for k, v in state.items()
          if not k.startswith("feats.layer4.") and not k.endswith("num_batches_tracked")}
  assert expected_keys(config) == used
  if config == RESNET50:  # The published checkpoint: 367 entries, 24.3 M numbers.
    assert len(state) == 367
    numbers = sum(v.numel() for k, v in state.items() if "num_batches" not in k)
    assert round(numbers / 1e6, 1) == 24.3


@pytest.mark.torch
@requires_torch
def test_conversion_round_trip(converted):
  assert converted["warnings"] == []
  assert converted["config"] == SMALL
  layer4, counters = _layer4_and_counters(converted["state"])
  assert layer4 and counters
  log = "\n".join(converted["log"])
  assert f"skipped {len(layer4)} layer4 entries" in log
  assert f"{len(counters)} num_batches_tracked buffers" in log
  # Leaves land where the rename says, transposed to the Flax layouts.
  state = converted["state"]
  params = converted["variables"]["params"]
  stats = converted["variables"]["batch_stats"]
  np.testing.assert_array_equal(
      params["encoder"]["layer2_0"]["conv2"]["kernel"],
      state["module.feats.layer2.0.conv2.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      stats["fusion"]["branch_x3"]["post_bn"]["var"],
      state["module.aspp_.bn1_1024.running_var"].numpy())
  np.testing.assert_array_equal(
      params["implicit_decoder"]["layers_2"]["kernel"],
      state["module.imnet.layers.4.weight"].numpy().T)
  diff = verify_conversion(converted["ckpt"], converted["dir"], seed=3, size=(37, 50))
  assert diff < ATOL


@pytest.mark.torch
@requires_torch
def test_cli_converts_and_verifies(converted, tmp_path):
  out = tmp_path / "cli_out"
  proc = subprocess.run(
      [sys.executable, "convert_torch_weights.py", converted["ckpt"], str(out), "--verify"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "skipped" in proc.stdout and "layer4" in proc.stdout
  match = re.search(r"JAX vs PyTorch = (\S+)", proc.stdout)
  assert match, proc.stdout
  assert float(match.group(1)) < ATOL
  config, _ = ckpt.load_model(str(out))
  assert config == SMALL


# ----------------------------------------------------------------------------
# Network parity.
# ----------------------------------------------------------------------------

@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("size", [(61, 47), (224, 224), (301, 419)])
def test_network_parity_small(converted, size):
  logits = _check_network(converted["net"], converted["config"],
                          converted["variables"], size, seed=sum(size))
  assert logits.std() > 0.1  # The logits vary: the comparison is not trivial.


@pytest.mark.torch
@requires_torch
def test_network_parity_resnet50(resnet50):
  net, config, variables = resnet50
  assert config == RESNET50
  logits = _check_network(net, config, variables, (61, 47), seed=7)
  assert logits.std() > 0.1


@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("shape", [(5, 7), (31, 24), (112, 210)])
def test_make_coord_matches_reference(shape):
  np.testing.assert_array_equal(np.asarray(jax_make_coord(shape)),
                                ref.make_coord(shape, flatten=False).numpy())


# ----------------------------------------------------------------------------
# The multi-scale refinement loop.
# ----------------------------------------------------------------------------

def _scene(h=106, w=154, seed=0):
  """A smooth random RGB image and a blob mask. 106x154 pads to 170x218:
  scale 0.25 gives 42.5 x 54.5, which Python's round takes to 42 x 54."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (h // 8 + 2, w // 8 + 2, 3))
  yy, xx = np.mgrid[0:h, 0:w] / 8.0
  image = coarse[yy.astype(int), xx.astype(int)] * 0.7 + rng.uniform(0, 76, (h, w, 3))
  yy, xx = np.mgrid[0:h, 0:w]
  radius = 30 + 6 * np.sin(np.arctan2(yy - h / 2, xx - w / 2) * 5)
  mask = (np.hypot(yy - h / 2, (xx - w / 2) * 0.8) < radius) * 255
  return image.astype(np.uint8), mask.astype(np.uint8)


@pytest.fixture(scope="module")
def refine_pair():
  """A SMALL reference whose output layer is calibrated on ``_scene()``.

  Random weights saturate the probabilities; the output layer is shifted and
  scaled so that the full-scale logits have median 0 and spread 3, so the
  refined maps span (0, 1). Returns ``(net, config, variables)``.
  """
  net = _reference(SMALL, seed=4)
  image, mask = _scene()
  with torch.no_grad():
    img, seg = ref.prepare_inputs(image, mask)
    feat = net.features(torch.cat([img, seg], dim=1))
    logits = net.query(feat, *ref.grid_queries(*img.shape[-2:]))
    last = net.imnet.layers[-1]
    gain = 3.0 / float(logits.std())
    last.weight.mul_(gain)
    last.bias.sub_(float(logits.median())).mul_(gain)
  config, variables, _ = convert_state_dict(
      {k: v.numpy() for k, v in net.state_dict().items()})
  return net, config, variables


@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("plan", PLANS)
def test_refiner_parity(refine_pair, plan):
  net, config, variables = refine_pair
  image, mask = _scene()
  got = Refiner(config, variables, plan=plan).refine_all_scales(image, mask)
  want = ref.refine_reference(net, image, mask)
  assert list(got) == list(want) == [0.125, 0.25, 0.5, 1.0]
  for s in want:
    assert got[s].shape == want[s].shape == mask.shape
    a, b = prob_to_uint8(got[s]).astype(int), prob_to_uint8(want[s]).astype(int)
    assert b.std() > 40, s  # Not a constant map.
    close = np.mean(np.abs(a - b) <= 1)
    assert close >= 0.999, (s, close, np.abs(a - b).max())
    np.testing.assert_allclose(got[s], want[s], atol=2e-4, err_msg=str(s))


@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("plan", PLANS)
def test_refiner_empty_mask_gives_zeros(refine_pair, plan):
  net, config, variables = refine_pair
  image, mask = _scene()
  empty = np.zeros_like(mask)
  got = Refiner(config, variables, plan=plan).refine_all_scales(image, empty)
  want = ref.refine_reference(net, image, empty)
  for s in (0.125, 0.25, 0.5, 1.0):
    assert not got[s].any() and not want[s].any()


@pytest.mark.torch
@requires_torch
def test_refiner_grey_and_rgba_equal_rgb(refine_pair):
  net, config, variables = refine_pair
  image, mask = _scene()
  refiner = Refiner(config, variables)
  scales = (0.25, 1.0)
  grey = image[:, :, 1]
  rgb_of_grey = np.repeat(grey[:, :, None], 3, axis=2)
  got = refiner.refine(grey, mask, scales)
  np.testing.assert_array_equal(got, refiner.refine(rgb_of_grey, mask, scales))
  want = ref.refine_reference(net, rgb_of_grey, mask, scales)[1.0]
  np.testing.assert_allclose(got, want, atol=1e-3)
  alpha = np.random.default_rng(1).integers(0, 256, mask.shape + (1,), dtype=np.uint8)
  rgba = np.concatenate([image, alpha], axis=2)
  np.testing.assert_array_equal(refiner.refine(rgba, mask, scales),
                                refiner.refine(image, mask, scales))


@pytest.mark.torch
@requires_torch
def test_refiner_size_mismatch_is_an_input_error(refine_pair):
  _, config, variables = refine_pair
  refiner = Refiner(config, variables)
  image, mask = _scene(60, 70)
  with pytest.raises(InputError, match="70x60 but mask is 69x60"):
    refiner.refine(image, mask[:, :69])


# ----------------------------------------------------------------------------
# Loss pieces.
# ----------------------------------------------------------------------------

@pytest.mark.torch
@requires_torch
def test_sobel_and_loss_match_reference():
  rng = np.random.default_rng(5)
  gt = rng.uniform(size=(3, 1, 17, 23)).astype(np.float32)
  gt[0] = (gt[0] > 0.5)  # One hard mask, two soft ones.
  logits = rng.normal(scale=3, size=gt.shape).astype(np.float32)
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(losses.sobel(nhwc(gt))).transpose(0, 3, 1, 2),
                             ref.sobel(_torch(gt)).numpy(), atol=1e-5)
  for weights in ((1.0, 0.5, 0.5, 2.0), (0.0, 1.0, 1.0, 5.0)):
    total, parts = losses.crm_loss(nhwc(logits), nhwc(gt), ce_weight=weights[0],
                                   l1_weight=weights[1], l2_weight=weights[2],
                                   grad_weight=weights[3])
    want_total, want_parts = ref.crm_loss_reference(_torch(logits), _torch(gt), *weights)
    assert float(abs(total - want_total.item())) < 1e-5
    for name, value in want_parts.items():
      assert abs(float(parts[name]) - value) < 1e-5, name


# ----------------------------------------------------------------------------
# Errors: one line naming the file and the key.
# ----------------------------------------------------------------------------

class _RunsCode:
  """Unpickling this object calls os.system (what a weights-only load must refuse)."""

  def __reduce__(self):
    return (os.system, ("echo unpickled",))


@pytest.fixture(scope="module")
def bad_checkpoints(converted, tmp_path_factory):
  """Broken checkpoint files: ``{name: (path, pattern the message must match)}``."""
  root = tmp_path_factory.mktemp("bad")
  good = converted["state"]
  files = {}

  def save(name, obj, pattern):
    path = str(root / f"{name}.pth")
    torch.save(obj, path)
    files[name] = (path, pattern)

  data = open(converted["ckpt"], "rb").read()
  truncated = str(root / "truncated.pth")
  with open(truncated, "wb") as f:
    f.write(data[: len(data) // 2])
  files["truncated"] = (truncated, "not a readable PyTorch checkpoint")
  junk = str(root / "junk.pth")
  with open(junk, "wb") as f:
    f.write(b"n" * 64)
  files["junk"] = (junk, re.escape("not a readable PyTorch checkpoint (Unsupported operand 110.)"))
  save("pickled", {"fc.weight": torch.zeros(2), "run": _RunsCode()},
       re.escape("refused: it holds Python objects besides tensors, which loading could run as "
                 "code (Trying to load unsupported GLOBAL posix.system whose module posix is "
                 "blocked.); only weights-only files are read"))
  save("classifier", {"fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)},
       "missing key 'feats.conv1.weight': not a CRM checkpoint")
  other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.Linear(8, 2))
  save("other_net", other.state_dict(), "not a CRM checkpoint")
  missing = dict(good)
  del missing["module.feats.layer2.0.bn2.running_var"]
  save("missing_key", missing, re.escape("missing 1 key(s): ['feats.layer2.0.bn2.running_var']"))
  shape = dict(good)
  shape["module.feats.layer1.0.conv2.weight"] = torch.zeros(16, 16, 3, 2)
  save("wrong_shape", shape, re.escape("feats.layer1.0.conv2.weight has shape [16, 16, 3, 2], "
                                       "expected [16, 16, 3, 3]"))
  extra = dict(good)
  extra["module.aspp_.aspp1_512.bn.weight"] = torch.zeros(3)
  save("extra_key", extra, re.escape("unexpected keys (not CRM): ['aspp_.aspp1_512.bn.weight']"))
  return files


@pytest.mark.torch
@requires_torch
@pytest.mark.parametrize("name", ["truncated", "junk", "pickled", "classifier", "other_net",
                                  "missing_key", "wrong_shape", "extra_key"])
def test_bad_checkpoint_errors(bad_checkpoints, tmp_path, capsys, name):
  path, pattern = bad_checkpoints[name]
  out = str(tmp_path / "out")
  with pytest.raises(MappingError, match=pattern) as info:
    convert_crm(path, out, log=lambda *_: None)
  assert str(info.value).startswith(path + ": ")
  assert "\n" not in str(info.value)
  assert not os.path.exists(out)
  assert convert_torch_weights.main([path, out]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {path}: ") and "\n" not in err


@pytest.mark.torch
@requires_torch
def test_cli_error_has_no_traceback(bad_checkpoints, tmp_path):
  path, _ = bad_checkpoints["wrong_shape"]
  proc = subprocess.run([sys.executable, "convert_torch_weights.py", path,
                         str(tmp_path / "out")], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and path in lines[0] and "conv2.weight" in lines[0]
  assert "Traceback" not in proc.stderr


@pytest.mark.torch
@requires_torch
def test_converted_dir_errors(converted, tmp_path):
  # A converted checkpoint whose config no longer fits its variables.
  broken = tmp_path / "broken"
  broken.mkdir()
  os.symlink(os.path.join(converted["dir"], ckpt.VARIABLES_DIR), broken / ckpt.VARIABLES_DIR)
  blob = json.load(open(os.path.join(converted["dir"], ckpt.CONFIG_FILE)))
  blob["model"] = TINY.to_dict()
  (broken / ckpt.CONFIG_FILE).write_text(json.dumps(blob))
  with pytest.raises(ckpt.CheckpointError, match=re.escape(str(broken))):
    ckpt.load_model(str(broken))
  # Verifying against the PyTorch file of another architecture.
  tiny_path = str(tmp_path / "tiny.pth")
  ref.save_like_dataparallel(_reference(TINY, seed=2), tiny_path)
  with pytest.raises(MappingError, match="does not load into the PyTorch reference"):
    verify_conversion(tiny_path, converted["dir"])
