"""Tests of the dataset-folder scanning and the TF-free TFDS builders (tiny fake archives)."""

import os
import pickle
import sys

import warnings

import cv2
import numpy as np
import pytest

from crm_jax import io
from crm_jax.data import folders
from crm_jax.data import tfds_builders as tb

H, W = 20, 30


def _rand_image(rng, channels=3):
  shape = (H, W, channels) if channels > 1 else (H, W)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _rand_mask(rng):
  return ((rng.random((H, W)) > 0.5) * 255).astype(np.uint8)


def _write(path, img):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(str(path), img)
  return str(path)


def _expected_image(path):
  """What the builders must return for an image file: OpenCV's decoding, as RGB."""
  img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if img.ndim == 2:
    img = np.repeat(img[:, :, None], 3, axis=2)
  return np.ascontiguousarray(img[:, :, 2::-1])


def _expected_mask(path):
  """The mask as ``crm_jax.io.read_mask`` reads it (the one rule for every reader)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", io.MaskWarning)
    return io.read_mask(path)


def _by_name(source):
  return {ex["name"]: ex for ex in source}


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
  """Fake extracted archives; returns {set: (folder, {name: {feature: file}})}."""
  root = tmp_path_factory.mktemp("archives")
  rng = np.random.default_rng(0)
  out = {}

  # FSS-1000: <class>/<k>.jpg + .png. One colour (BGR) mask and one grey JPEG image.
  fss = root / "fewshot_data"
  files = {}
  for cls in ("abacus", "zebra"):
    for k in (1, 2):
      img = _rand_image(rng, 1 if (cls, k) == ("zebra", 2) else 3)
      mask = _rand_mask(rng)
      if (cls, k) == ("abacus", 2):
        mask = np.stack([mask, mask // 2, 255 - mask], axis=2)
      files[f"{cls}/{k}"] = {"image": _write(fss / cls / f"{k}.jpg", img),
                             "mask": _write(fss / cls / f"{k}.png", mask)}
  _write(fss / "zebra" / "3.jpg", _rand_image(rng))  # no mask: left out
  (fss / "zebra" / ".DS_Store").write_bytes(b"junk")
  out["fss1000"] = (str(fss), files)

  # DUTS-TR, as the archive: DUTS-TR-Image/*.jpg + DUTS-TR-Mask/*.png, plus one unmatched
  # image and one unmatched mask.
  duts = root / "DUTS-TR"
  files = {}
  for i in range(3):
    name = f"ILSVRC2012_test_{i:08d}"
    files[name] = {"image": _write(duts / "DUTS-TR-Image" / f"{name}.jpg", _rand_image(rng)),
                   "mask": _write(duts / "DUTS-TR-Mask" / f"{name}.png", _rand_mask(rng))}
  _write(duts / "DUTS-TR-Image" / "only_image.jpg", _rand_image(rng))
  _write(duts / "DUTS-TR-Mask" / "only_mask.png", _rand_mask(rng))
  _write(duts / "__MACOSX" / "DUTS-TR-Image" / "x.jpg", _rand_image(rng))  # ignored
  out["duts_tr"] = (str(duts), files)

  # ECSSD as a flat folder of <id>.jpg + <id>.png, one 16-bit mask.
  ecssd = root / "ECSSD"
  files = {}
  for i in range(2):
    mask = _rand_mask(rng)
    if i == 1:
      mask = mask.astype(np.uint16) * 257
    files[f"{i:04d}"] = {"image": _write(ecssd / f"{i:04d}.jpg", _rand_image(rng)),
                         "mask": _write(ecssd / f"{i:04d}.png", mask)}
  out["ecssd"] = (str(ecssd), files)

  # BIG: val/ and test/ with <name>_im.jpg|png, _seg.png, _gt.png; one RGBA PNG image and an
  # incomplete triple.
  big = root / "BIG"
  files = {}
  for split, names in (("val", ("a", "b")), ("test", ("c",))):
    for name in names:
      if name == "b":
        im = _write(big / split / f"{name}_im.png", _rand_image(rng, 4))
      else:
        im = _write(big / split / f"{name}_im.jpg", _rand_image(rng))
      files[(split, name)] = {"image": im,
                              "seg": _write(big / split / f"{name}_seg.png", _rand_mask(rng)),
                              "gt": _write(big / split / f"{name}_gt.png", _rand_mask(rng))}
  _write(big / "test" / "d_im.jpg", _rand_image(rng))
  _write(big / "test" / "d_gt.png", _rand_mask(rng))
  out["big"] = (str(big), files)
  return out


@pytest.fixture(scope="module")
def prepared(archives, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builders = {name: tb.prepare(name, folder, data_dir) for name, (folder, _) in archives.items()}
  return data_dir, builders


# ---------------------------------------------------------------------------------------------
# Folder scanning.


def test_scan_fss1000(archives):
  folder, files = archives["fss1000"]
  pairs, report = folders.scan_fss1000(folder)
  assert [p.name for p in pairs] == sorted(files)
  assert all(p.image == files[p.name]["image"] and p.mask == files[p.name]["mask"] for p in pairs)
  assert report.matched == 4 and report.unmatched == [os.path.join("zebra", "3.jpg")]
  assert report.unreadable is None


def test_scan_flat_with_image_and_mask_subfolders(archives):
  folder, files = archives["duts_tr"]
  pairs, report = folders.scan_flat(folder, what="DUTS-TR")
  assert [p.name for p in pairs] == sorted(files)
  assert all(p.image == files[p.name]["image"] and p.mask == files[p.name]["mask"] for p in pairs)
  assert report.matched == 3 and report.num_unmatched == 2
  assert report.unmatched == [os.path.join("DUTS-TR-Image", "only_image.jpg"),
                              os.path.join("DUTS-TR-Mask", "only_mask.png")]
  assert "2 unmatched" in report.summary()


def test_scan_flat_folder_duplicates_and_unreadable(tmp_path):
  rng = np.random.default_rng(1)
  _write(tmp_path / "a.jpg", _rand_image(rng))
  _write(tmp_path / "a.png", _rand_mask(rng))
  _write(tmp_path / "b.jpg", _rand_image(rng))
  (tmp_path / "b.png").write_bytes(b"not a png")
  _write(tmp_path / "c.jpg", _rand_image(rng))
  _write(tmp_path / "sub" / "c.jpg", _rand_image(rng))
  _write(tmp_path / "c.png", _rand_mask(rng))
  pairs, report = folders.scan_flat(tmp_path)
  assert [p.name for p in pairs] == ["a", "b"]  # unreadable files are only found when checked
  assert report.duplicates == ["c.jpg", os.path.join("sub", "c.jpg")]
  assert report.unmatched == ["c.png"]
  pairs, report = folders.scan_flat(tmp_path, check_readable=True)
  assert [p.name for p in pairs] == ["a"] and report.unreadable == ["b.png"]
  assert report.matched == 1


def test_scan_big_and_splits(archives):
  folder, files = archives["big"]
  assert folders.big_split_folders(folder) == {"test": os.path.join(folder, "test"),
                                               "val": os.path.join(folder, "val")}
  triples, report = folders.scan_big(os.path.join(folder, "test"))
  assert [t.name for t in triples] == ["c"]
  assert report.unmatched == ["d_gt.png", "d_im.jpg"]
  triples, _ = folders.scan_big(os.path.join(folder, "val"))
  assert [(t.name, t.image) for t in triples] == [("a", files[("val", "a")]["image"]),
                                                   ("b", files[("val", "b")]["image"])]


def test_folder_errors(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope"):
    folders.scan_flat(missing)
  with pytest.raises(folders.FolderError, match="empty"):
    folders.scan_fss1000(tmp_path)
  _write(tmp_path / "x.jpg", _rand_image(np.random.default_rng(2)))
  with pytest.raises(folders.FolderError, match="nothing pairs up"):
    folders.scan_flat(tmp_path)
  with pytest.raises(NotADirectoryError, match="x.jpg"):
    folders.scan_flat(tmp_path / "x.jpg")
  (tmp_path / "y.txt").write_text("z")
  with pytest.raises(folders.FolderError, match="no image or mask files"):
    folders.scan_big(tmp_path)
  with pytest.raises(folders.FolderError, match="val/"):
    folders.big_split_folders(tmp_path)


# ---------------------------------------------------------------------------------------------
# TFDS builders.


def test_prepare_writes_array_record_and_reports(prepared):
  data_dir, builders = prepared
  for name, b in builders.items():
    assert b.name == "crm_" + name and b.is_prepared() and tb.is_prepared(name, data_dir)
    assert os.path.samefile(tb.prepared_path(name, data_dir), b.data_dir)
    assert b.info.file_format.value == "array_record"
    assert os.listdir(b.data_dir) and any(".array_record-" in f for f in os.listdir(b.data_dir))
  assert builders["duts_tr"].reports["train"].num_unmatched == 2
  assert builders["duts_tr"].info.splits["train"].num_examples == 3
  assert builders["fss1000"].info.splits["train"].num_examples == 4
  assert sorted(builders["big"].info.splits) == ["test", "val"]
  assert builders["big"].reports["test"].num_unmatched == 2


@pytest.mark.parametrize("name", ["fss1000", "duts_tr", "ecssd"])
def test_training_sets_read_back_exactly(prepared, archives, name):
  data_dir, _ = prepared
  _, files = archives[name]
  source = tb.load_source(name, data_dir)
  assert len(source) == len(files)
  items = _by_name(source)
  assert sorted(items) == sorted(files)
  for n, ex in items.items():
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (H, W, 3)
    assert ex["mask"].dtype == np.uint8 and ex["mask"].shape == (H, W)
    # JPEG: equal to OpenCV's decoding of the same file; PNG: equal to what was written.
    np.testing.assert_array_equal(ex["image"], _expected_image(files[n]["image"]))
    np.testing.assert_array_equal(ex["mask"], _expected_mask(files[n]["mask"]))


def test_png_masks_are_exact(prepared, archives):
  data_dir, _ = prepared
  items = _by_name(tb.load_source("duts_tr", data_dir))
  for n, f in archives["duts_tr"][1].items():
    written = cv2.imread(f["mask"], cv2.IMREAD_UNCHANGED)
    assert written.ndim == 2 and set(np.unique(written)) <= {0, 255}
    np.testing.assert_array_equal(items[n]["mask"], written)


def test_big_reads_back_exactly(prepared, archives):
  data_dir, _ = prepared
  _, files = archives["big"]
  for split in ("val", "test"):
    items = _by_name(tb.load_source("big", data_dir, split))
    assert sorted(items) == sorted(n for s, n in files if s == split)
    for n, ex in items.items():
      f = files[(split, n)]
      np.testing.assert_array_equal(ex["image"], _expected_image(f["image"]))
      np.testing.assert_array_equal(ex["seg"], cv2.imread(f["seg"], cv2.IMREAD_UNCHANGED))
      np.testing.assert_array_equal(ex["gt"], cv2.imread(f["gt"], cv2.IMREAD_UNCHANGED))


def test_plain_files_are_stored_byte_for_byte(prepared, archives):
  data_dir, builders = prepared
  raw = builders["duts_tr"].as_data_source(
      split="train", decoders={"image": tb.tfds.decode.SkipDecoding(),
                               "mask": tb.tfds.decode.SkipDecoding()})
  files = archives["duts_tr"][1]
  for i in range(len(raw)):
    ex = raw[i]
    f = files[ex["name"].decode()]
    for k in ("image", "mask"):
      with open(f[k], "rb") as fh:
        assert ex[k] == fh.read()


def test_unreadable_files_are_left_out_and_reported(tmp_path):
  rng = np.random.default_rng(4)
  src = tmp_path / "MSRA10K_Imgs_GT" / "Imgs"
  for i in range(3):
    _write(src / f"{i}.jpg", _rand_image(rng))
    _write(src / f"{i}.png", _rand_mask(rng))
  (src / "1.png").write_bytes(b"\x89PNG truncated")
  b = tb.prepare("msra10k", tmp_path / "MSRA10K_Imgs_GT", tmp_path / "out")
  report = b.reports["train"]
  assert report.matched == 2 and report.unreadable == [os.path.join("Imgs", "1.png")]
  assert [ex["name"] for ex in tb.load_source("msra10k", tmp_path / "out")] in (["0", "2"],
                                                                               ["2", "0"])


def test_tfds_own_decoding_gives_declared_shapes(prepared, archives):
  """RGBA images, colour and 16-bit masks were normalised, so TFDS's default decoding agrees."""
  data_dir, builders = prepared
  for name, split, mask_keys in (("fss1000", "train", ("mask",)), ("ecssd", "train", ("mask",)),
                                 ("big", "val", ("seg", "gt"))):
    raw = builders[name].as_data_source(split=split)
    ours = tb.load_source(name, data_dir, split)
    assert len(raw) == len(ours)
    for i in range(len(raw)):
      a, b = raw[i], ours[i]
      assert a["name"].decode() == b["name"]
      np.testing.assert_array_equal(a["image"], b["image"])
      for k in mask_keys:
        assert a[k].shape == (H, W, 1)
        np.testing.assert_array_equal(a[k][:, :, 0], b[k])


def test_mixture(prepared, archives):
  data_dir, _ = prepared
  sources = {n: tb.load_source(n, data_dir) for n in ("fss1000", "duts_tr", "ecssd")}
  mix = tb.MixtureSource(sources)
  assert len(mix) == 4 + 3 + 2 == sum(len(s) for s in sources.values())
  assert mix.locate(0) == (0, 0) and mix.locate(4) == (1, 0) and mix.locate(8) == (2, 1)
  assert mix.locate(-1) == (2, 1)
  np.testing.assert_array_equal(mix[5]["image"], sources["duts_tr"][1]["image"])
  np.testing.assert_array_equal(mix[-2]["mask"], sources["ecssd"][0]["mask"])
  assert [ex["name"] for ex in mix.__getitems__([0, 7])] == [sources["fss1000"][0]["name"],
                                                              sources["ecssd"][0]["name"]]
  for bad in (9, -10):
    with pytest.raises(IndexError):
      mix[bad]
  # All names from all sets, once each.
  names = [ex["name"] for ex in mix]
  assert sorted(names) == sorted(n for s in ("fss1000", "duts_tr", "ecssd")
                                 for n in archives[s][1])
  # Whichever sets are prepared, in the order given.
  auto = tb.training_mixture(data_dir)
  assert auto.names == ["fss1000", "duts_tr", "ecssd"] and len(auto) == 9
  assert len(tb.MixtureSource([sources["ecssd"], sources["ecssd"]])) == 4
  with pytest.raises(ValueError):
    tb.MixtureSource([])


def test_sources_pickle(prepared):
  data_dir, _ = prepared
  mix = tb.MixtureSource([tb.load_source("ecssd", data_dir),
                          tb.load_source("big", data_dir, "val")])
  copy = pickle.loads(pickle.dumps(mix))
  assert len(copy) == len(mix)
  for i in range(len(mix)):
    np.testing.assert_array_equal(copy[i]["image"], mix[i]["image"])


def test_reuse_and_overwrite(prepared, archives):
  data_dir, _ = prepared
  b = tb.prepare("ecssd", archives["ecssd"][0], data_dir)
  assert b.is_prepared() and b.reports == {}
  b = tb.prepare("ecssd", archives["ecssd"][0], data_dir, overwrite=True)
  assert b.reports["train"].matched == 2 and len(tb.load_source("ecssd", data_dir)) == 2


def test_clear_errors(tmp_path, prepared):
  data_dir, _ = prepared
  with pytest.raises(FileNotFoundError, match="missing_folder"):
    tb.prepare("duts_tr", tmp_path / "missing_folder", tmp_path / "out")
  (tmp_path / "empty").mkdir()
  with pytest.raises(folders.FolderError, match="empty"):
    tb.prepare("msra10k", tmp_path / "empty", tmp_path / "out")
  (tmp_path / "flatbig").mkdir()
  _write(tmp_path / "flatbig" / "a_im.jpg", _rand_image(np.random.default_rng(3)))
  with pytest.raises(folders.FolderError, match="val/"):
    tb.prepare("big", tmp_path / "flatbig", tmp_path / "out")
  assert not tb.is_prepared("big", tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    tb.load_source("dut_omron", data_dir)
  with pytest.raises(ValueError, match="no split 'train'"):
    tb.load_source("big", data_dir)
  with pytest.raises(ValueError, match="unknown dataset"):
    tb.prepare("coco", tmp_path, tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="none of"):
    tb.training_mixture(tmp_path / "out")


def test_no_tensorflow(prepared):
  assert "tensorflow" not in sys.modules


def test_one_builder_per_table_row():
  """Each DATASETS row is a registered TFDS builder carrying that row's metadata."""
  assert [ds.short for ds in tb.DATASETS] == list(tb.BUILDERS)
  assert set(tb.TRAINING_SETS) | {"big"} == set(tb.BUILDERS)
  for ds in tb.DATASETS:
    cls = tb.builder_class(ds.short)
    assert cls is tb.builder_class("crm_" + ds.short) is tb.tfds.builder_cls("crm_" + ds.short)
    assert cls.name == "crm_" + ds.short and cls.DATASET is ds
    assert cls.MANUAL_DOWNLOAD_INSTRUCTIONS == ds.instructions and "manual_dir" in ds.instructions
    assert cls.DISPLAY_NAME == ds.display and cls.__doc__ == ds.summary
