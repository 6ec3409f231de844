"""End-to-end tests of evaluate.py / crm_jax.evaluation on a tiny BIG-style folder (TINY model):
the published layout, resume, bad inputs, and issue 13's provenance (manifest), mask encodings,
output checks and a run killed mid-write."""

import json
import os
import shutil
import signal
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

import evaluate as evaluate_cli
from crm_jax import dataset_run, evaluation, metrics
from crm_jax.checkpoint import fingerprint, load_model, save_model
from crm_jax.constants import SCALES
from crm_jax.io import InputError, read_grey, read_image, read_mask
from crm_jax.models.crm import CRM, TINY, init_variables
from crm_jax.preprocess import prob_to_uint8
from crm_jax.refine import Refiner
from tests.big_objects import make_world

pytestmark = pytest.mark.slow  # one subprocess run and a few JAX compilations: about a minute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"obj_a": (80, 100), "obj_b": (96, 120), "obj_c": (120, 140)}  # H, W
KEYS = [metrics.scale_key(s) for s in SCALES]


def _quiet(_msg):
  pass


def _copy_object(src, dst, name, new_name=None):
  new_name = new_name or name
  for f in os.listdir(src):
    if f.startswith(name + "_"):
      shutil.copy(os.path.join(src, f), os.path.join(dst, new_name + f[len(name):]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The data folder, a TINY checkpoint, and one run of evaluate.py as a subprocess."""
  root = tmp_path_factory.mktemp("evaluate")
  data, ckpt = make_world(root, SIZES, seed=0)
  out = root / "out_cli"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "evaluate.py"), "--data", str(data), "--checkpoint",
       ckpt, "--output", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600)
  return {"root": root, "data": data, "ckpt": ckpt, "out": str(out), "proc": proc}


@pytest.fixture(scope="module")
def refiner(world):
  return Refiner.from_checkpoint(world["ckpt"])


class CountingRefiner:
  """A Refiner that counts its calls (everything else, the model included, is the inner one's)."""

  def __init__(self, inner):
    self.inner = inner
    self.calls = 0

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def refine_batch_all_scales(self, images, masks, scales, keep=None):
    self.calls += len(images)  # pairs refined (a dataset run refines batches)
    return self.inner.refine_batch_all_scales(images, masks, scales, keep)


def _copytree(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_cli_run_writes_the_published_layout(world, refiner):
  proc = world["proc"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "new IoU" in proc.stdout and "refined 3 object(s)" in proc.stdout
  assert "objects" in proc.stderr  # the progress bar
  out = world["out"]
  expected = {"metrics.json", "manifest.json"}
  for name in SIZES:
    expected |= {f"{k}_{name}_mask.png" for k in KEYS}
    expected |= {f"{name}_{kind}.png" for kind in ("im", "seg", "gt")}
  assert set(os.listdir(out)) == expected
  for name, (h, w) in SIZES.items():
    image = read_image(os.path.join(world["data"], f"{name}_im.jpg"))
    seg = read_mask(os.path.join(world["data"], f"{name}_seg.png"))
    gt = read_mask(os.path.join(world["data"], f"{name}_gt.png"))
    assert np.array_equal(read_image(os.path.join(out, f"{name}_im.png")), image)
    assert np.array_equal(read_mask(os.path.join(out, f"{name}_seg.png")), seg)
    assert np.array_equal(read_mask(os.path.join(out, f"{name}_gt.png")), gt)
    probs = refiner.refine_all_scales(image, seg, SCALES)
    for s, k in zip(SCALES, KEYS):
      mask = read_mask(os.path.join(out, f"{k}_{name}_mask.png"))
      assert mask.shape == (h, w)  # cropped back to the original size
      diff = np.abs(mask.astype(int) - prob_to_uint8(probs[s]).astype(int))
      assert diff.max() <= 1
  blob = json.load(open(os.path.join(out, "metrics.json")))
  assert list(blob["scales"]) == KEYS
  assert blob["num_images"] == 3 and blob["skipped"] == []
  # Where the masks came from: the model's content, the scales, dtype and plan.
  config, variables = load_model(world["ckpt"])
  manifest = json.load(open(os.path.join(out, "manifest.json")))
  assert blob["model"] == manifest
  assert manifest["fingerprint"] == fingerprint(config, variables) == fingerprint(
      refiner.config, refiner.variables)
  assert manifest["scales"] == KEYS and manifest["dtype"] == "float32"
  assert manifest["plan"] == getattr(refiner, "plan", dataset_run.DEFAULT_PLAN)
  assert manifest["min_side"] == 0
  # The default loop on small images: one line for the run, not one per object.
  small = [l for l in proc.stdout.splitlines() if "small images" in l]
  assert len(small) == 1 and small[0].startswith("warning: 3 of 3 object(s) are small images")
  assert manifest["checkpoint"] == world["ckpt"]
  assert blob["seconds"] > 0
  for k in KEYS:
    m = blob["scales"][k]
    assert {"iou", "mba", "old_iou", "old_mba"} <= set(m)
    assert all(0 <= m[x] <= 1 for x in ("iou", "mba", "old_iou", "old_mba"))


def test_metrics_json_equals_metrics_only(world, tmp_path):
  out = _copytree(world["out"], tmp_path / "out")
  cli = json.load(open(os.path.join(out, "metrics.json")))
  assert evaluate_cli.main(["--metrics-only", "--output", out, "--no-progress"]) == 0
  again = json.load(open(os.path.join(out, "metrics.json")))
  assert again["scales"] == cli["scales"]
  assert again["num_images"] == cli["num_images"] == 3
  # And the library function returns what it wrote.
  res = evaluation.evaluate(None, None, out, metrics_only=True, progress=False, log=_quiet)
  assert res["scales"] == cli["scales"]


def test_resume_skips_complete_objects(world, refiner, tmp_path):
  out = _copytree(world["out"], tmp_path / "out")
  cli = json.load(open(os.path.join(out, "metrics.json")))
  before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
  # An interrupted run: obj_b has only some of its files.
  os.remove(os.path.join(out, "obj_b_gt.png"))
  os.remove(os.path.join(out, "1.0_obj_b_mask.png"))
  counting = CountingRefiner(refiner)
  logged = []
  res = evaluation.evaluate(world["data"], None, out, progress=False, log=logged.append,
                            refiner=counting)
  assert counting.calls == 1
  assert res["refined"] == 1 and res["already_complete"] == 2
  assert any("2 object(s) already complete" in m for m in logged)
  assert res["scales"] == cli["scales"]
  for f in before:
    if f != "metrics.json":
      assert open(os.path.join(out, f), "rb").read() == before[f], f
  # Everything complete: no refinement; the same model saved elsewhere has the same fingerprint.
  moved = shutil.copytree(world["ckpt"], tmp_path / "moved_ckpt")
  res = evaluation.evaluate(world["data"], str(moved), out, progress=False, log=_quiet)
  assert res["refined"] == 0 and res["already_complete"] == 3
  assert res["scales"] == cli["scales"]
  assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
  # A missing checkpoint is an error, not a silent reuse of the masks.
  code = evaluate_cli.main(["--data", world["data"], "--checkpoint", str(tmp_path / "none"),
                            "--output", out, "--no-progress"])
  assert code == 2


def test_bad_inputs_are_reported_and_skipped(world, tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  d = str(data)
  _copy_object(world["data"], d, "obj_a")
  _copy_object(world["data"], d, "obj_a", "no_gt")
  os.remove(os.path.join(d, "no_gt_gt.png"))
  _copy_object(world["data"], d, "obj_a", "no_seg")
  os.remove(os.path.join(d, "no_seg_seg.png"))
  _copy_object(world["data"], d, "obj_a", "mismatch")
  cv2.imwrite(os.path.join(d, "mismatch_gt.png"), np.zeros((50, 60), np.uint8))
  _copy_object(world["data"], d, "obj_a", "corrupt")
  with open(os.path.join(d, "corrupt_im.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff this is not a JPEG")
  _copy_object(world["data"], d, "obj_a", "cut")
  whole = open(os.path.join(d, "cut_im.jpg"), "rb").read()
  with open(os.path.join(d, "cut_im.jpg"), "wb") as f:
    f.write(whole[:len(whole) * 2 // 3])  # truncated: OpenCV's imread would decode it half grey
  _copy_object(world["data"], d, "obj_a", "cutgt")
  whole = open(os.path.join(d, "cutgt_gt.png"), "rb").read()
  with open(os.path.join(d, "cutgt_gt.png"), "wb") as f:
    f.write(whole[:len(whole) - 20])
  _copy_object(world["data"], d, "obj_a", "tiny")
  for f in ("tiny_seg.png", "tiny_gt.png"):
    cv2.imwrite(os.path.join(d, f), np.full((20, 30), 255, np.uint8))
  cv2.imwrite(os.path.join(d, "tiny_im.jpg"), np.zeros((20, 30, 3), np.uint8))
  _copy_object(world["data"], d, "obj_a", "twice")
  shutil.copy(os.path.join(d, "twice_im.jpg"), os.path.join(d, "twice_im.png"))
  out = str(tmp_path / "out")
  code = evaluate_cli.main(["--data", d, "--checkpoint", world["ckpt"], "--output", out,
                            "--no-progress"])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  text = captured.out + captured.err
  lines = text.splitlines()

  def line_of(name):
    hits = [l for l in lines if l.startswith(f"skipped {name}:")]
    assert len(hits) == 1, (name, text)
    return hits[0]

  assert "no_gt_gt.png" in line_of("no_gt") and "missing" in line_of("no_gt")
  assert "no_seg_seg.png" in line_of("no_seg")
  assert "60x50" in line_of("mismatch") and "mismatch_gt.png" in line_of("mismatch")
  assert "corrupt_im.jpg" in line_of("corrupt") and "corrupt JPEG" in line_of("corrupt")
  assert "cut_im.jpg" in line_of("cut") and "truncated" in line_of("cut")
  assert "cutgt_gt.png" in line_of("cutgt") and "truncated PNG" in line_of("cutgt")
  assert "30x20" in line_of("tiny") and "32 pixels" in line_of("tiny")
  assert "ambiguous" in line_of("twice") and "twice_im.png" in line_of("twice")
  assert "Traceback" not in text
  blob = json.load(open(os.path.join(out, "metrics.json")))
  assert blob["num_images"] == 1
  assert sorted(s.split(":")[0] for s in blob["skipped"]) == [
      "corrupt", "cut", "cutgt", "mismatch", "no_gt", "no_seg", "tiny", "twice"]
  assert "1 object(s) evaluated, 8 skipped" in text
  assert sorted(f for f in os.listdir(out) if f.endswith("_gt.png")) == ["obj_a_gt.png"]


def test_nothing_to_evaluate_exits_nonzero(world, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  out = str(tmp_path / "out")
  ck = world["ckpt"]
  cases = [
      (["--data", str(empty), "--checkpoint", ck, "--output", out], "empty"),
      (["--data", str(tmp_path / "nope"), "--checkpoint", ck, "--output", out], "does not exist"),
      (["--metrics-only", "--output", str(empty)], "nothing could be evaluated"),
      (["--metrics-only", "--output", str(tmp_path / "nope")], "no such folder"),
  ]
  lonely = tmp_path / "lonely"
  lonely.mkdir()
  _copy_object(world["data"], str(lonely), "obj_a")
  os.remove(lonely / "obj_a_gt.png")
  cases.append((["--data", str(lonely), "--checkpoint", ck, "--output", out], "obj_a_im.jpg"))
  bad = tmp_path / "all_bad"
  bad.mkdir()
  _copy_object(world["data"], str(bad), "obj_a")
  (bad / "obj_a_im.jpg").write_bytes(b"garbage")
  cases.append((["--data", str(bad), "--checkpoint", ck, "--output", out],
                "nothing could be evaluated"))
  no_masks = tmp_path / "no_masks"
  no_masks.mkdir()
  for f in ("obj_a_gt.png", "obj_a_seg.png"):
    shutil.copy(os.path.join(world["out"], f), no_masks / f)
  cases.append((["--metrics-only", "--output", str(no_masks)],
                "none of 1 object(s) has a usable gt, seg and mask"))
  for argv, words in cases:
    code = evaluate_cli.main(argv + ["--no-progress"])
    err = capsys.readouterr().err
    assert code != 0, argv
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last, (argv, err)
    assert "Traceback" not in err


def test_tfds_dataset_by_name(world, refiner, tmp_path, capsys):
  from crm_jax.data import tfds_builders as tb
  manual = tmp_path / "BIG"
  (manual / "val").mkdir(parents=True)
  for name in SIZES:
    _copy_object(world["data"], str(manual / "val"), name)
  data_dir = str(tmp_path / "tfds")
  tb.prepare("big", str(manual), data_dir)
  out = str(tmp_path / "out")
  res = evaluation.evaluate("crm_big", None, out, progress=False, log=_quiet,
                            tfds_data_dir=data_dir, refiner=refiner)
  cli_out = world["out"]
  assert sorted(os.listdir(out)) == sorted(os.listdir(cli_out))
  for f in os.listdir(out):
    if f.endswith(".png"):
      a, b = (cv2.imread(os.path.join(d, f), cv2.IMREAD_UNCHANGED) for d in (out, cli_out))
      assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1, f
  cli = json.load(open(os.path.join(cli_out, "metrics.json")))
  assert res["num_images"] == 3
  for k in KEYS:
    for x in ("iou", "mba", "old_iou", "old_mba"):
      assert res["scales"][k][x] == pytest.approx(cli["scales"][k][x], abs=1e-3)
  # Resumed by name: nothing left to do.
  code = evaluate_cli.main(["--data", "crm_big", "--tfds-data-dir", data_dir, "--split", "val",
                            "--checkpoint", world["ckpt"], "--output", out,
                            "--no-progress"])
  assert code == 0
  assert "3 already complete" in capsys.readouterr().out
  for argv, words in (
      (["--data", "crm_big", "--tfds-data-dir", data_dir, "--split", "test"], "no split 'test'"),
      (["--data", "crm_nope", "--tfds-data-dir", data_dir], "unknown dataset"),
      (["--data", "crm_ecssd", "--tfds-data-dir", data_dir], "not prepared"),
  ):
    code = evaluate_cli.main(argv + ["--checkpoint", world["ckpt"], "--output", out,
                                     "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and words in err, (argv, err)


# ---------------------------------------------------------------------------------------------
# Issue 13.


def test_outputs_of_another_model_or_settings_are_refused(world, refiner, tmp_path):
  """Point 1: a rerun into an output made by another model or settings refuses, or re-refines
  everything with --overwrite; resume reuses masks of the same model and settings only."""
  out = _copytree(world["out"], tmp_path / "out")
  before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
  killed_save = tmp_path / "other.tmp-999999999-abc"  # what a killed save_model leaves
  (killed_save / "variables").mkdir(parents=True)
  other = save_model(str(tmp_path / "other"), init_variables(CRM(TINY), jax.random.key(1)), TINY)
  assert not killed_save.exists()
  # The fingerprint follows the content: one changed number changes it.
  config, variables = load_model(world["ckpt"])
  changed = jax.tree_util.tree_map(np.array, variables)
  leaf = jax.tree_util.tree_leaves(changed)[3]
  leaf.flat[0] += 1e-3
  assert fingerprint(config, changed) != fingerprint(config, variables)
  for argv, words in ((["--checkpoint", other], "fingerprint"),
                      (["--checkpoint", world["ckpt"], "--scales", "0.5", "1.0"], "scales")):
    code = evaluate_cli.main(["--data", world["data"], "--output", out, "--no-progress"] + argv)
    assert code == 2
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
  with pytest.raises(InputError) as e:
    evaluation.evaluate(world["data"], other, out, progress=False, log=_quiet)
  msg = str(e.value)
  assert "\n" not in msg and out in msg and "--overwrite" in msg and world["ckpt"] in msg
  # Outputs without a manifest (another program, an older version) are not trusted either.
  no_manifest = _copytree(world["out"], tmp_path / "no_manifest")
  os.remove(os.path.join(no_manifest, "manifest.json"))
  with pytest.raises(InputError, match="no manifest.json"):
    evaluation.evaluate(world["data"], None, no_manifest, progress=False, log=_quiet,
                        refiner=refiner)
  # --overwrite: every object refined again by the other model; the stale object is gone.
  shutil.copy(os.path.join(out, "obj_a_gt.png"), os.path.join(out, "stale_gt.png"))
  code = evaluate_cli.main(["--data", world["data"], "--output", out, "--no-progress",
                            "--checkpoint", other, "--overwrite"])
  assert code == 0
  blob = json.load(open(os.path.join(out, "metrics.json")))
  assert blob["refined"] == 3 and blob["already_complete"] == 0
  assert blob["model"]["fingerprint"] == fingerprint(*load_model(other))
  assert blob["model"]["fingerprint"] != before_fingerprint(before)
  assert not os.path.exists(os.path.join(out, "stale_gt.png"))
  changed = [f for f in before if f.endswith("_mask.png")
             and open(os.path.join(out, f), "rb").read() != before[f]]
  assert changed  # the other model's masks, not the old ones
  # And --metrics-only reports the manifest of the masks it scores.
  assert evaluation.evaluate(None, None, out, metrics_only=True, progress=False,
                             log=_quiet)["model"] == blob["model"]


def before_fingerprint(files):
  return json.loads(files["manifest.json"])["fingerprint"]


def test_mask_encodings_of_inputs_and_ground_truths(world, refiner, tmp_path):
  """Point 2: a 0/1 ground truth and a palette coarse mask score as their 0/255 versions."""
  data = tmp_path / "data"
  data.mkdir()
  _copy_object(world["data"], str(data), "obj_a")
  gt = read_mask(str(data / "obj_a_gt.png"))
  assert set(np.unique(gt)) <= {0, 255}
  cv2.imwrite(str(data / "obj_a_gt.png"), (gt > 128).astype(np.uint8))  # 0/1
  seg = read_mask(str(data / "obj_a_seg.png"))
  cv2.imwrite(str(data / "obj_a_seg.png"), np.dstack([np.zeros_like(seg)] * 2 + [seg]))  # red
  out = str(tmp_path / "out")
  logged = []
  res = evaluation.evaluate(str(data), None, out, progress=False, log=logged.append,
                            refiner=refiner)
  assert res["num_images"] == 1
  assert np.array_equal(read_mask(os.path.join(out, "obj_a_gt.png")), gt)
  warned = [m for m in logged if m.startswith("warning: ") and "small images" not in m]
  assert len(warned) == 1 and "obj_a_seg.png" in warned[0] and "colour mask" in warned[0]
  reference = metrics.evaluate_folder(world["out"], SCALES, names=["obj_a"])
  for k in KEYS:
    assert res["scales"][k]["old_iou"] == pytest.approx(reference["scales"][k]["old_iou"])
    assert res["scales"][k]["iou"] == pytest.approx(reference["scales"][k]["iou"], abs=1e-3)


def test_output_problems_are_one_line_before_any_work(world, tmp_path, capsys):
  """Points 5 and 7: an unusable --output, or one that is (inside) --data, is refused in one
  line before the checkpoint is loaded; the inputs are untouched."""
  data = _copytree(world["data"], tmp_path / "data")
  before = sorted(os.listdir(data))
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  missing_ckpt = str(tmp_path / "no_ckpt")
  for out, words in ((data, "input folder"), (os.path.join(data, "out"), "input folder"),
                     (str(a_file), "is a file"), (str(a_file / "out"), "a_file")):
    code = evaluate_cli.main(["--data", data, "--checkpoint", missing_ckpt, "--output", out,
                              "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and words in line and "no_ckpt" not in line, (out, err)
  assert sorted(os.listdir(data)) == before and not os.path.exists(os.path.join(data, "out"))


_KILLED_EVALUATE = """
import os, signal, sys
import evaluate
real_replace, calls = os.replace, [0]
def replace(src, dst):
  calls[0] += 1
  if calls[0] == int(sys.argv[1]):
    os.kill(os.getpid(), signal.SIGKILL)  # killed with a written temporary file, before its rename
  return real_replace(src, dst)
os.replace = replace
sys.exit(evaluate.main(sys.argv[2:]))
"""


def test_killed_run_resumes_and_its_leftovers_are_removed(world, refiner, tmp_path):
  """Point 8 (and the resume guarantee): a run killed in the middle of writing obj_b's masks
  leaves a temporary file; the next run removes it, keeps obj_c and refines the rest."""
  out = str(tmp_path / "out")
  # One device, largest first. Renames: 1 the manifest, 2-8 obj_c's four masks and three
  # copies, 9 obj_b's first mask.
  proc = subprocess.run(
      [sys.executable, "-c", _KILLED_EVALUATE, "10", "--data", world["data"], "--checkpoint",
       world["ckpt"], "--output", out, "--no-progress", "--devices", "1"], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO), capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert len([f for f in os.listdir(out) if f.startswith(".tmp-")]) == 1
  assert metrics.is_complete(out, "obj_c", SCALES)
  assert not metrics.is_complete(out, "obj_b", SCALES)
  counting = CountingRefiner(refiner)
  res = evaluation.evaluate(world["data"], world["ckpt"], out, progress=False, log=_quiet,
                            refiner=counting)
  assert counting.calls == 2 and res["already_complete"] == 1 and res["refined"] == 2
  assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
  cli = json.load(open(os.path.join(world["out"], "metrics.json")))
  for k in KEYS:
    for x in ("iou", "mba", "old_iou", "old_mba"):
      assert res["scales"][k][x] == pytest.approx(cli["scales"][k][x], abs=1e-3)


def test_save_model_output_errors_are_one_line(world, tmp_path):
  """Point 5 for checkpoints (converter and training export): an output that is a file, or lies
  under a file, is a CheckpointError naming it, not a traceback about a temporary folder."""
  from crm_jax.checkpoint import CheckpointError
  config, variables = load_model(world["ckpt"])
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  for path, words in ((a_file, "is a file"), (a_file / "model", "cannot be written")):
    with pytest.raises(CheckpointError) as e:
      save_model(str(path), variables, config, overwrite=True)
    assert str(e.value).startswith(str(path)) and words in str(e.value)
  assert a_file.read_text() == "x"


def test_batches_by_bucket_equal_one_by_one(world, tmp_path):
  """--batch-size groups objects by bucket (two of the three share one); the fused plan's batches
  give the same masks as one object at a time, to float rounding (a batched convolution may sum
  in another order: at most one grey level, on a few pixels), and the same metrics."""
  fused = Refiner.from_checkpoint(world["ckpt"], plan="fused")
  buckets = [fused.bucket_of(hw) for hw in SIZES.values()]
  assert len(set(buckets)) < len(buckets)  # a real batch happens
  outs = {}
  for batch in (1, 3):
    out = str(tmp_path / f"batch{batch}")
    outs[batch] = evaluation.evaluate(world["data"], None, out, refiner=fused, progress=False,
                                      log=_quiet, batch_size=batch)
  for name in SIZES:
    for k in KEYS:
      a = read_grey(os.path.join(tmp_path, "batch1", f"{k}_{name}_mask.png")).astype(int)
      b = read_grey(os.path.join(tmp_path, "batch3", f"{k}_{name}_mask.png")).astype(int)
      assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 1e-3, (name, k)
  for k in KEYS:
    for field in ("iou", "mba"):
      assert outs[1]["scales"][k][field] == pytest.approx(outs[3]["scales"][k][field], abs=1e-3)
  assert outs[3]["model"]["plan"] == "fused"
  with pytest.raises(InputError, match="batch size 0"):
    evaluation.evaluate(world["data"], None, str(tmp_path / "b0"), refiner=fused, log=_quiet,
                        batch_size=0)


def test_min_side_is_recorded_and_outputs_of_another_are_refused(world, refiner, tmp_path,
                                                                 capsys):
  """--min-side reaches the Refiner and the manifest; an output folder made with another
  min_side is refused (or refined again with --overwrite); a manifest written before min_side
  existed counts as 0 and still resumes."""
  from crm_jax.preprocess import mask_to_prob
  from crm_jax.scales import scales_to_run
  min_side = 12  # obj_a (80 px high) loses scale 0.125; obj_b and obj_c keep every scale
  kept = {name: scales_to_run(SCALES, hw, min_side) for name, hw in SIZES.items()}
  assert kept["obj_a"] == SCALES[1:] and kept["obj_b"] == kept["obj_c"] == SCALES
  out = str(tmp_path / "out")
  logged = []
  res = evaluation.evaluate(world["data"], world["ckpt"], out, progress=False,
                            log=logged.append, devices=1, min_side=min_side)
  assert res["refined"] == 3 and res["model"]["min_side"] == min_side
  assert json.load(open(os.path.join(out, "manifest.json")))["min_side"] == min_side
  assert not [m for m in logged if "small images" in m]
  # A checkpoint recommending that min_side (the same model) gives it by default, in one note
  # line, and the folder is complete for it.
  config, variables = load_model(world["ckpt"])
  advised = save_model(str(tmp_path / "advised"), variables, config,
                       meta={"refine": {"min_side": min_side}})
  logged = []
  res = evaluation.evaluate(world["data"], advised, out, progress=False, log=logged.append,
                            devices=1)
  assert res["already_complete"] == 3 and res["model"]["min_side"] == min_side
  notes = [m for m in logged if m.startswith("note:")]
  assert len(notes) == 1 and f"{advised} recommends min_side {min_side}" in notes[0]
  seg = read_mask(os.path.join(world["data"], "obj_a_seg.png"))
  image = read_image(os.path.join(world["data"], "obj_a_im.jpg"))
  # Scale 0.125 of obj_a: the coarse mask, unrefined; the others: the kept scales' loop.
  assert np.array_equal(read_grey(os.path.join(out, "0.125_obj_a_mask.png")),
                        prob_to_uint8(mask_to_prob(seg)))
  probs = refiner.refine_all_scales(image, seg, kept["obj_a"])
  for s in kept["obj_a"]:
    mask = read_grey(os.path.join(out, f"{metrics.scale_key(s)}_obj_a_mask.png")).astype(int)
    assert np.abs(mask - prob_to_uint8(probs[s]).astype(int)).max() <= 1, s
  for name in ("obj_b", "obj_c"):  # every scale kept: the masks of the default run
    for k in KEYS:
      a, b = (read_grey(os.path.join(d, f"{k}_{name}_mask.png")).astype(int)
              for d in (out, world["out"]))
      assert np.abs(a - b).max() <= 1, (name, k)
  # Another min_side (the default 0) is refused in one line; nothing changes.
  before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
  base = ["--data", world["data"], "--checkpoint", world["ckpt"], "--no-progress",
          "--devices", "1"]
  code = evaluate_cli.main(base + ["--output", out])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "min_side 12 instead of 0" in err[0], err
  assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
  code = evaluate_cli.main(base + ["--output", out, "--min-side", "-3"])
  assert code == 2 and "min side -3" in capsys.readouterr().err
  # --overwrite: refined again with every scale.
  assert evaluate_cli.main(base + ["--output", out, "--overwrite"]) == 0
  blob = json.load(open(os.path.join(out, "metrics.json")))
  assert blob["refined"] == 3 and blob["model"]["min_side"] == 0
  a, b = (read_grey(os.path.join(d, "0.125_obj_a_mask.png")) for d in (out, world["out"]))
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
  # A manifest from before min_side existed: resumes as min_side 0, refuses --min-side 12.
  old = _copytree(world["out"], tmp_path / "old")
  manifest = json.load(open(os.path.join(old, "manifest.json")))
  del manifest["min_side"]
  dataset_run.write_json(os.path.join(old, "manifest.json"), manifest)
  counting = CountingRefiner(refiner)
  res = evaluation.evaluate(world["data"], None, old, progress=False, log=_quiet,
                            refiner=counting)
  assert counting.calls == 0 and res["already_complete"] == 3
  with pytest.raises(InputError, match="min_side 0 instead of 12"):
    evaluation.evaluate(world["data"], world["ckpt"], old, progress=False, log=_quiet,
                        devices=1, min_side=min_side)
