"""Issue 10: whole datasets on every local device and every host (crm_jax.dataset_run), and the
folder mode of ``crm-refine`` (crm_jax.folder_refine).

The session has four forced host devices (conftest.py). TINY model, images of 64-120 pixels,
scales (0.5, 1.0). The multi-process tests start ``evaluate.py`` twice with jax.distributed on
127.0.0.1 (gloo CPU collectives), as train.py's tests do.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import cv2
import jax
import numpy as np
import pytest

from crm_jax import evaluation, folder_refine, io, parallel
from crm_jax.cli import refine as refine_cli
from crm_jax.io import InputError, read_image, read_mask
from crm_jax.preprocess import prob_to_uint8
from crm_jax.refine import Refiner
from tests.big_objects import make_world, object_triple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = (0.5, 1.0)
SCALE_ARGS = ["--scales", "0.5", "1.0"]
# Eight objects of different sizes (H, W); the largest is not first by name.
SIZES = {"o1": (64, 72), "o2": (120, 100), "o3": (72, 64), "o4": (96, 112), "o5": (80, 80),
         "o6": (64, 120), "o7": (104, 88), "o8": (70, 66)}
# Fields of metrics.json that depend on the run (time, how the work was spread), not the masks.
RUN_FIELDS = {"seconds", "refine_seconds", "seconds_per_object", "object_seconds", "hosts",
              "refined", "already_complete"}


def _quiet(_msg):
  pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A BIG-layout folder of eight objects and a TINY checkpoint."""
  root = tmp_path_factory.mktemp("multidevice")
  data, ckpt = make_world(root, SIZES, seed=1)
  return {"root": root, "data": data, "ckpt": ckpt}


def _files(folder):
  return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def _masks(folder):
  return {f: b for f, b in _files(folder).items() if f.endswith(".png")}


def _without_run_fields(blob):
  return {k: v for k, v in blob.items() if k not in RUN_FIELDS}


# ---------------------------------------------------------------------------------------------
# The schedule (pure).


def _items(pixels):
  return [parallel.Item(f"j{i}", None, (p, 1)) for i, p in enumerate(pixels)]


def test_batches_are_largest_first_and_of_one_bucket():
  items = _items([10, 50, 30, 50, 20])
  bucket = {(10, 1): "a", (50, 1): "b", (30, 1): "a", (20, 1): "a"}.get
  assert [[it.name for it in b] for b in parallel.share(items, index=0, count=1)] == [
      ["j1"], ["j3"], ["j2"], ["j4"], ["j0"]]
  batches = parallel.share(items, 2, bucket, index=0, count=1)
  assert [[it.name for it in b] for b in batches] == [["j1", "j3"], ["j2", "j4"], ["j0"]]


def test_shares_balance_pixels_and_cover_every_batch_once():
  items = _items([100, 90, 40, 30, 20, 10, 5])
  shares = [parallel.share(items, index=k, count=2) for k in (0, 1)]
  names = [[b[0].name for b in s] for s in shares]
  assert names == [["j0", "j3", "j4"], ["j1", "j2", "j5", "j6"]]
  assert sorted(sum(names, [])) == sorted(it.name for it in items)
  loads = [sum(b[0].pixels for b in s) for s in shares]
  assert abs(loads[0] - loads[1]) <= max(it.pixels for it in items)
  assert parallel.share(items, index=2, count=3) == parallel.share(items, index=2, count=3)


def test_sizes_from_headers(tmp_path):
  img = np.zeros((37, 53, 3), np.uint8)
  for ext in (".png", ".jpg"):
    path = str(tmp_path / f"a{ext}")
    assert cv2.imwrite(path, img)
    assert io.file_image_size(path) == (37, 53)
  (tmp_path / "bad.jpg").write_bytes(b"not an image")
  assert io.file_image_size(str(tmp_path / "bad.jpg")) is None


# ---------------------------------------------------------------------------------------------
# Every local device.


def test_four_devices_equal_one_device(world, tmp_path):
  assert jax.local_device_count() == 4
  results = {}
  for n in (1, 4):
    out = str(tmp_path / f"dev{n}")
    results[n] = evaluation.evaluate(world["data"], world["ckpt"], out, SCALES, progress=False,
                                     log=_quiet, devices=n)
  assert _masks(tmp_path / "dev1") == _masks(tmp_path / "dev4")  # byte for byte
  blobs = [json.load(open(tmp_path / f"dev{n}" / "metrics.json")) for n in (1, 4)]
  assert _without_run_fields(blobs[0]) == _without_run_fields(blobs[1])
  assert blobs[1]["hosts"] == [dict(blobs[1]["hosts"][0], process=0, devices=4, refined=8,
                                    failed=0)]
  assert sorted(blobs[1]["object_seconds"]) == sorted(SIZES)
  assert all(s > 0 for s in blobs[1]["object_seconds"].values())
  assert results[4]["num_images"] == 8
  with pytest.raises(InputError, match="--devices 5"):
    evaluation.evaluate(world["data"], world["ckpt"], str(tmp_path / "dev5"), SCALES,
                        progress=False, log=_quiet, devices=5)


def test_batches_of_one_bucket_on_two_devices_equal_one_device(world, tmp_path):
  """--batch-size 2 with the fused plan: the same batches (made before the work is spread) on
  two devices as on one, so the same bytes."""
  buckets = [Refiner.from_checkpoint(world["ckpt"]).bucket_of(hw) for hw in SIZES.values()]
  assert len(set(buckets)) < len(buckets)  # real batches of two happen
  for n in (1, 2):
    evaluation.evaluate(world["data"], world["ckpt"], str(tmp_path / f"dev{n}"), SCALES,
                        progress=False, log=_quiet, devices=n, plan="fused", batch_size=2)
  assert _masks(tmp_path / "dev1") == _masks(tmp_path / "dev2")
  assert json.load(open(tmp_path / "dev2" / "metrics.json"))["num_images"] == 8


# ---------------------------------------------------------------------------------------------
# Folder mode.


@pytest.fixture(scope="module")
def folders(world):
  """IMAGES/MASKS of any segmenter: three good pairs (mask suffix _m), an image without a mask,
  a mask without an image, a corrupt image, a mask of another size, a text file."""
  root = world["root"] / "folder_mode"
  images, masks = root / "images", root / "masks"
  images.mkdir(parents=True)
  masks.mkdir()
  rng = np.random.default_rng(2)
  pairs = {}
  for name, ext, (h, w) in (("a", ".jpg", (64, 80)), ("b", ".png", (100, 90)),
                            ("c", ".JPEG", (72, 120))):
    image, seg, _ = object_triple(h, w, rng)
    assert cv2.imwrite(str(images / f"{name}{ext}"), image[:, :, ::-1])
    assert cv2.imwrite(str(masks / f"{name}_m.png"), seg)
    pairs[name] = (read_image(str(images / f"{name}{ext}")), seg)
  image, seg, _ = object_triple(64, 64, rng)
  assert cv2.imwrite(str(images / "lonely.jpg"), image[:, :, ::-1])  # no mask
  assert cv2.imwrite(str(masks / "orphan_m.png"), seg)  # no image
  (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
  assert cv2.imwrite(str(masks / "broken_m.png"), seg)
  assert cv2.imwrite(str(images / "sized.png"), image[:, :, ::-1])
  assert cv2.imwrite(str(masks / "sized_m.png"), seg[:60, :50])  # another size
  (images / "notes.txt").write_text("not an image")
  return {"images": str(images), "masks": str(masks), "pairs": pairs}


def _refine_main(folders, world, out, *extra):
  return refine_cli.main(["--images", folders["images"], "--masks", folders["masks"],
                          "--output", str(out), "--mask-suffix", "_m", "--checkpoint",
                          world["ckpt"], "--no-progress", *SCALE_ARGS, *extra])


def test_pairing_rules(tmp_path):
  images, masks = tmp_path / "i", tmp_path / "m"
  images.mkdir()
  masks.mkdir()
  for f in ("x.jpg", "x.png", "y.Jpg", "z.webp", ".hidden.jpg", "readme.md"):
    (images / f).write_bytes(b"")
  for f in ("x.png", "y.png", "z.png", "w.png", "y_mask.png"):
    (masks / f).write_bytes(b"")
  pairs, problems = folder_refine.pair_folders(str(images), str(masks))
  assert [(p.name, os.path.basename(p.image), p.output) for p in pairs] == [
      ("y", "y.Jpg", "y.png"), ("z", "z.webp", "z.png")]
  text = "\n".join(problems)
  assert len(problems) == 4, text
  assert "x: ambiguous" in text and "readme.md: not an image" in text
  assert "w.png: no image w.*" in text and "y_mask.png: no image y_mask.*" in text
  pairs, problems = folder_refine.pair_folders(str(images), str(masks), "_mask")
  assert [(p.name, p.output) for p in pairs] == [("y", "y_mask.png")]
  assert sum("not a mask name <name>_mask.png" in p for p in problems) == 4
  with pytest.raises(InputError, match="no image pairs"):
    folder_refine.pair_folders(str(images), str(tmp_path / "m"), "_none")
  with pytest.raises(InputError, match="no such folder"):
    folder_refine.pair_folders(str(tmp_path / "missing"), str(masks))


def test_folder_mode_refines_reports_and_resumes(world, folders, tmp_path, capsys):
  out = tmp_path / "out"
  assert _refine_main(folders, world, out, "--devices", "2") == 0
  captured = capsys.readouterr()
  outputs = _files(out)
  assert set(outputs) == {"a_m.png", "b_m.png", "c_m.png", "manifest.json", "summary.json"}
  refiner = Refiner.from_checkpoint(world["ckpt"])
  for name, (image, seg) in folders["pairs"].items():
    expected = prob_to_uint8(refiner.refine(image, seg, SCALES))
    assert np.array_equal(read_mask(str(out / f"{name}_m.png")), expected), name
  lines = [l for l in captured.out.splitlines() if l.startswith("skipped ")]
  assert len(lines) == 5, captured.out
  for words in ("lonely.jpg: no mask", "orphan_m.png: no image orphan.*", "broken",
                "sized_m.png: mask is 50x60", "notes.txt: not an image"):
    assert sum(words in l for l in lines) == 1, (words, lines)
  assert "refined 3 of 5 pair(s)" in captured.out and "5 file(s) or pair(s) not refined" in \
      captured.out
  summary = json.load(open(out / "summary.json"))
  assert summary["refined"] == 3 and summary["already_complete"] == 0
  assert len(summary["skipped"]) == 5 and sorted(summary["object_seconds"]) == ["a", "b", "c"]
  assert summary["hosts"][0]["devices"] == 2
  # Resume: nothing to do; then one output lost: only it is refined, to the same bytes.
  assert _refine_main(folders, world, out) == 0
  assert json.load(open(out / "summary.json"))["already_complete"] == 3
  os.remove(out / "b_m.png")
  assert _refine_main(folders, world, out) == 0
  summary = json.load(open(out / "summary.json"))
  assert summary["refined"] == 1 and summary["already_complete"] == 2
  assert {f: b for f, b in _files(out).items() if f.endswith(".png")} == \
      {f: b for f, b in outputs.items() if f.endswith(".png")}
  # Other settings are refused in one line, unless --overwrite.
  capsys.readouterr()
  code = refine_cli.main(["--images", folders["images"], "--masks", folders["masks"],
                          "--output", str(out), "--mask-suffix", "_m", "--checkpoint",
                          world["ckpt"], "--no-progress", "--scales", "1.0"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "scales" in err[0] and "--overwrite" in err[0]
  assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_folder_mode_exits_nonzero_only_when_nothing_is_refined(world, folders, tmp_path,
                                                                capsys):
  images, masks = tmp_path / "i", tmp_path / "m"
  images.mkdir()
  masks.mkdir()
  (images / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  assert cv2.imwrite(str(masks / "bad.png"), np.zeros((64, 64), np.uint8))
  code = refine_cli.main(["--images", str(images), "--masks", str(masks), "--output",
                          str(tmp_path / "out"), "--checkpoint", world["ckpt"], "--no-progress",
                          *SCALE_ARGS])
  captured = capsys.readouterr()
  assert code == 2 and "Traceback" not in captured.err
  assert captured.err.strip().splitlines()[-1].startswith("error: ") and \
      "nothing could be refined" in captured.err
  # --image and --images exclude each other; the output may not lie in an input folder.
  with pytest.raises(SystemExit) as e:
    refine_cli.main(["--image", "x.jpg", "--images", str(images), "--output", "o"])
  assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
  code = refine_cli.main(["--images", folders["images"], "--masks", folders["masks"], "--output",
                          os.path.join(folders["masks"], "out"), "--checkpoint", world["ckpt"]])
  assert code == 2 and "input folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Every host: two processes.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _evaluate_cmd(world, out):
  return [sys.executable, os.path.join(REPO, "evaluate.py"), "--data", world["data"],
          "--checkpoint", world["ckpt"], "--output", str(out), "--no-progress", *SCALE_ARGS]


def _env(**extra):
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
              JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)


def _start_two(world, out, **extra):
  port = _free_port()
  return [subprocess.Popen(_evaluate_cmd(world, out), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                    JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid), **extra))
          for pid in (0, 1)]


def _wait(procs, timeout=500):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return outs


_ALLGATHER_SCRIPT = """
import json, sys
import jax
from crm_jax import distributed
distributed.maybe_initialize_distributed()
index = jax.process_index()
value = {"process": index, "text": "\u00e9" * (3000 * (index + 1))}
by_store = distributed.allgather(value)
client = distributed.coordination_client()
distributed.coordination_client = lambda: None  # as on a JAX without the private client
by_collective = distributed.allgather(value)
with open(sys.argv[1] + str(index), "w") as f:  # not stdout: a full pipe would
  json.dump({"store": by_store, "collective": by_collective,  # block the exit barrier
             "had_client": client is not None}, f)
"""


def test_allgather_through_the_store_and_through_a_collective_agree(tmp_path):
  """distributed.allgather gives every process's value, in process order, on both of its paths:
  the coordination service's key-value store (JAX 0.10/0.11's private client) and the public
  collective that replaces it where a JAX has no such client."""
  port = _free_port()
  prefix = str(tmp_path / "gathered_")
  procs = [subprocess.Popen([sys.executable, "-c", _ALLGATHER_SCRIPT, prefix], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)))
           for pid in (0, 1)]
  try:
    results = [p.communicate(timeout=200) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  expected = [{"process": i, "text": "\u00e9" * (3000 * (i + 1))} for i in (0, 1)]
  for i, (p, (_, err)) in enumerate(zip(procs, results)):
    assert p.returncode == 0, err[-3000:]
    with open(prefix + str(i)) as f:
      got = json.load(f)
    assert got["had_client"]
    assert got["store"] == expected and got["collective"] == expected


@pytest.fixture(scope="module")
def one_process(world):
  """The reference: one process, two devices (the XLA flags of the two-process runs)."""
  out = world["root"] / "one_process"
  proc = subprocess.run(_evaluate_cmd(world, out), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def test_two_processes_equal_one_process(world, one_process, tmp_path):
  out = tmp_path / "two"
  outs = _wait(_start_two(world, out))
  assert all("Traceback" not in o for o in outs), outs
  assert "process 0 (2 device(s)): refined" in outs[0] and "process 1" in outs[0], outs[0]
  assert _masks(out) == _masks(one_process)
  blob = json.load(open(out / "metrics.json"))
  assert _without_run_fields(blob) == _without_run_fields(
      json.load(open(one_process / "metrics.json")))
  assert [h["process"] for h in blob["hosts"]] == [0, 1]
  assert sum(h["refined"] for h in blob["hosts"]) == 8 and all(
      h["refined"] > 0 for h in blob["hosts"])
  assert sorted(blob["object_seconds"]) == sorted(SIZES)


def _wait_for_first_mask(out, procs, timeout=400):
  """Returns once a mask of the run into `out` is written (both processes still running)."""
  deadline = time.time() + timeout
  while not any(f.endswith("_mask.png") for f in
                (os.listdir(out) if os.path.isdir(out) else [])):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.02)


def test_killed_process_then_both_restarted_complete_the_run(world, one_process, tmp_path):
  out = tmp_path / "killed"
  procs = _start_two(world, out)
  try:
    _wait_for_first_mask(out, procs)
    procs[1].send_signal(signal.SIGKILL)  # one host dies mid-run ...
    procs[1].wait()
    procs[0].send_signal(signal.SIGKILL)  # ... and the job with it
    procs[0].wait()
  finally:
    _wait(procs, timeout=10)
  complete = [n for n in SIZES if os.path.isfile(out / f"{n}_gt.png")]
  assert len(complete) < len(SIZES) and not os.path.exists(out / "metrics.json")
  outs = _wait(_start_two(world, out))
  for p, o in zip(procs, outs):
    assert "Traceback" not in o, o[-3000:]
  assert _masks(out) == _masks(one_process)
  assert not [f for f in os.listdir(out) if ".tmp-" in f]
  blob = json.load(open(out / "metrics.json"))
  assert _without_run_fields(blob) == _without_run_fields(
      json.load(open(one_process / "metrics.json")))
  assert blob["already_complete"] == len(complete)
  assert blob["refined"] == len(SIZES) - len(complete)


def test_two_processes_in_folder_mode_equal_one_process(world, folders, tmp_path):
  """crm-refine --images on two processes: each its share of the pairs, the same bytes as one
  process, one summary.json by process 0 counting both."""
  cmd = lambda out: [sys.executable, "-m", "crm_jax.cli.refine", "--images", folders["images"],  # noqa: E731
                     "--masks", folders["masks"], "--output", str(out), "--mask-suffix", "_m",
                     "--checkpoint", world["ckpt"], "--no-progress", *SCALE_ARGS]
  one = subprocess.run(cmd(tmp_path / "one"), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=500)
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(cmd(tmp_path / "two"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)))
           for pid in (0, 1)]
  outs = _wait(procs)
  assert [p.returncode for p in procs] == [0, 0], outs
  pngs = lambda d: {f: b for f, b in _files(d).items() if f.endswith(".png")}  # noqa: E731
  assert pngs(tmp_path / "two") == pngs(tmp_path / "one") and len(pngs(tmp_path / "one")) == 3
  summary = json.load(open(tmp_path / "two" / "summary.json"))
  assert summary["refined"] == 3 and [h["process"] for h in summary["hosts"]] == [0, 1]
  assert all(h["refined"] > 0 for h in summary["hosts"])


@pytest.mark.parametrize("lost", [0, 1])
def test_a_process_whose_peer_dies_ends_in_bounded_time(world, tmp_path, lost):
  """One process of a two-process run is killed mid-run (the coordinator's process or the
  other): the survivor does not wait forever in a collective or the shutdown barrier; it exits
  non-zero within about JAX_HEARTBEAT_TIMEOUT_SECONDS, saying which task was lost or that the
  coordination service went away."""
  heartbeat = 10
  out = tmp_path / "lost"
  procs = _start_two(world, out, JAX_HEARTBEAT_TIMEOUT_SECONDS=str(heartbeat))
  try:
    _wait_for_first_mask(out, procs)
    procs[lost].send_signal(signal.SIGKILL)
    procs[lost].wait()
    killed = time.time()
    survivor = procs[1 - lost]
    try:
      text = survivor.communicate(timeout=heartbeat * 6)[0]
    except subprocess.TimeoutExpired:
      survivor.kill()
      pytest.fail(f"process {1 - lost} still running {heartbeat * 6} s after its peer died: "
                  f"{survivor.communicate()[0][-3000:]}")
    waited = time.time() - killed
  finally:
    _wait(procs, timeout=10)
  print(f"process {1 - lost} ended {waited:.1f} s after its peer, status {survivor.returncode}")
  assert survivor.returncode != 0, text[-3000:]
  assert any(w in text for w in ("task died", "unhealthy", "heartbeat")), text[-3000:]


@pytest.mark.parametrize("bad", [{"JAX_NUM_PROCESSES": "two"},
                                 {"JAX_HEARTBEAT_TIMEOUT_SECONDS": "0"},
                                 {"JAX_HEARTBEAT_TIMEOUT_SECONDS": "ten"},
                                 {"JAX_LOCAL_DEVICE_IDS": "0,x"}])
def test_bad_multi_process_variables_are_one_input_error(monkeypatch, bad):
  """Checked before JAX is touched: the run never starts with a variable it cannot read."""
  from crm_jax import distributed
  from crm_jax.io import InputError
  env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "0", **bad}
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda **kw: pytest.fail(f"initialize called with {kw}"))
  with pytest.raises(InputError, match="JAX_HEARTBEAT_TIMEOUT_SECONDS to a positive one"):
    distributed.maybe_initialize_distributed()
