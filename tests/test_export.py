"""``crm_jax.export``: the fused plan's programs serialized, loaded and run on the CPU.

The serialized programs are the fused plan's own (``plans.fused_program``), lowered for the CPU
beside ``cuda`` and ``tpu``; run through ``plans.refine_fused``'s loop they give the same
probabilities as the normal fused path, bit for bit.
"""

import json
import os

import jax
import numpy as np
import pytest

from crm_jax import checkpoint as ckpt
from crm_jax import plans
from crm_jax.export import (ExportError, export_fused, load_fused, refine_exported)
from crm_jax.geometry import bucket_shape
from crm_jax.models import CRM, TINY, init_variables
from crm_jax.preprocess import normalize_image, normalize_seg

SCALES = (0.5, 1.0)
PAD = 32


def _pairs(sizes, seed=0):
  """Normalised, reflect-padded pairs, as ``Refiner`` makes them."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in sizes:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 5: 4 * w // 5] = 255
    p = ((PAD, PAD), (PAD, PAD))
    out.append((np.pad(normalize_image(image), p + ((0, 0),), mode="reflect"),
                np.pad(normalize_seg(mask), p, mode="reflect")))
  return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  variables = init_variables(CRM(TINY), jax.random.PRNGKey(3))
  rng = np.random.default_rng(5)
  params = dict(variables["params"])  # a sharper decoder: maps far from constant
  params["implicit_decoder"] = jax.tree_util.tree_map(lambda a: a * 3.0,
                                                      params["implicit_decoder"])
  variables = {"params": params,
               "batch_stats": jax.tree_util.tree_map(
                   lambda a: np.asarray(rng.uniform(0.5, 1.5, a.shape), np.float32),
                   variables["batch_stats"])}
  return ckpt.save_model(str(tmp_path_factory.mktemp("model") / "tiny"), variables, TINY)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exported_programs_equal_the_fused_path(model_dir, tmp_path, dtype):
  sizes = [(30, 22), (27, 20), (31, 21)]  # one bucket: a batch of 2, then of 1
  pairs = _pairs(sizes)
  bucket = bucket_shape(pairs[0][0].shape[:2])
  assert {bucket_shape(p[0].shape[:2]) for p in pairs} == {bucket}
  out = export_fused(model_dir, str(tmp_path / "export"), [bucket], SCALES, dtype,
                     batch_sizes=(1, 2))
  manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
  config, variables = ckpt.load_model(model_dir)
  assert manifest["fingerprint"] == ckpt.fingerprint(config, variables)
  assert (manifest["buckets"], manifest["scales"], manifest["dtype"], manifest["platforms"]) == (
      [list(bucket)], list(SCALES), dtype, ["cpu", "cuda", "tpu"])
  assert len(manifest["programs"]) == len(SCALES) * 2
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # written atomically

  exported = load_fused(out)
  exported.check_variables(config, variables)
  compute = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(jax.numpy.dtype(dtype)),
                                   variables)
  images, segs = [p[0] for p in pairs], [p[1] for p in pairs]
  got = refine_exported(exported, compute, images, segs, bucket_steps=4)
  ref = plans.refine_fused(config, compute, images, segs, SCALES, manifest["queries"], 4,
                           (1, 2))
  assert len(got) == len(ref) == len(pairs)
  for g, r in zip(got, ref):
    assert list(g) == list(r) == list(SCALES)
    assert min(np.std(p) for p in r.values()) > 1e-3  # non-trivial maps
    for s in SCALES:
      np.testing.assert_array_equal(g[s], r[s])


def test_export_refuses_what_it_does_not_hold(model_dir, tmp_path):
  pairs = _pairs([(30, 22)])
  bucket = bucket_shape(pairs[0][0].shape[:2])
  out = export_fused(model_dir, str(tmp_path / "export"), [bucket], SCALES, platforms=("cpu",))
  with pytest.raises(FileExistsError):
    export_fused(model_dir, out, [bucket], SCALES, platforms=("cpu",))
  exported = load_fused(out)
  config, variables = ckpt.load_model(model_dir)
  other = jax.tree_util.tree_map(lambda a: np.asarray(a) + 1, variables)
  with pytest.raises(ExportError, match="not these variables"):
    exported.check_variables(config, other)
  with pytest.raises(ExportError, match=r"no program for bucket .* scale 0.25"):
    exported.program(config, bucket, 0.25, 1.0, 1)
  with pytest.raises(ExportError, match="largest 1.0"):
    exported.program(config, bucket, 0.5, 0.5, 1)
  with pytest.raises(ExportError, match="batch 2"):
    exported.program(config, bucket, 0.5, 1.0, 2)
  blob = os.path.join(out, exported.manifest["programs"][0]["file"])
  with open(blob, "ab") as f:
    f.write(b"x")
  with pytest.raises(ExportError, match="damaged"):
    load_fused(out)


def test_crm_export_then_evaluate_from_it_gives_the_fused_results(tmp_path, capsys):
  """``crm-export --data`` on a small BIG folder, then ``crm-evaluate --export``: the same masks
  (bytes) and metrics as ``crm-evaluate --plan fused`` with the checkpoint alone; the manifest
  lists the platforms; a checkpoint other than the export's is refused in one line."""
  from crm_jax.cli import evaluate as evaluate_cli
  from crm_jax.cli import export as export_cli
  from tests.big_objects import make_world
  data, ckpt_dir = make_world(tmp_path, {"o1": (64, 72), "o2": (80, 60)}, seed=5)
  out = tmp_path / "export"
  assert export_cli.main([ckpt_dir, str(out), "--data", data, "--scales", *map(str, SCALES),
                          "--platforms", "cpu", "cuda", "tpu"]) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
  common = ["--data", data, "--checkpoint", ckpt_dir, "--scales", *map(str, SCALES),
            "--no-progress", "--min-side", "0"]
  assert evaluate_cli.main(common + ["--output", str(tmp_path / "a"), "--plan", "fused"]) == 0
  assert evaluate_cli.main(common + ["--output", str(tmp_path / "b"), "--export", str(out)]) == 0
  masks = sorted(f for f in os.listdir(tmp_path / "a") if f.endswith("_mask.png"))
  assert masks and masks == sorted(f for f in os.listdir(tmp_path / "b")
                                   if f.endswith("_mask.png"))
  for f in masks:
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
  got = [json.loads((tmp_path / d / "metrics.json").read_text())["scales"] for d in "ab"]
  assert got[0] == got[1]
  other = ckpt.save_model(str(tmp_path / "other"),
                          init_variables(CRM(TINY), jax.random.PRNGKey(9)),
                          TINY)
  capsys.readouterr()
  assert evaluate_cli.main(["--data", data, "--checkpoint", other, "--output",
                            str(tmp_path / "c"), "--export", str(out), "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ")
  assert "exported with the checkpoint" in err[0]
