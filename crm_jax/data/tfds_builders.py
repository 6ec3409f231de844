"""TFDS builders (``BUILDERS``: short name -> class, TFDS name ``crm_<short>``) of CRM's training
sets (a 'train' split of ``{'image', 'mask', 'name'}``) and BIG (a split per subfolder of
``{'image', 'seg', 'gt', 'name'}``), prepared without TensorFlow into array_record (docs/data.md).
"""

from __future__ import annotations

import bisect
import dataclasses
import inspect
import os
import pathlib
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence, Tuple, Union

from absl import logging
import cv2
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from crm_jax.data import folders, source_index
from crm_jax import io as image_io
from crm_jax.io import InputError, as_rgb, decode_mask, img_bgr_to_rgb

PathLike = Union[str, "os.PathLike[str]"]

DATA_VERSION = "1.0.0"
TRAINING_SETS = ("fss1000", "duts_tr", "duts_te", "ecssd", "msra10k", "dut_omron")
TFDS_PREFIX = "crm_"
_STORED_AS_IS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG and PNG magic


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
  """Encoded bytes -> RGB uint8 ``[H, W, 3]`` (grey replicated, alpha dropped, 16 bit scaled)."""
  return as_rgb(img_bgr_to_rgb(image_io.imdecode(data, name)), name)


def _storable(data: bytes, name: str, is_mask: bool) -> bytes:
  """The bytes to store: ``data`` for an 8-bit grey (or, for an image, RGB) JPEG or PNG, else a
  PNG of ``decode_mask`` / ``decode_image``."""
  img = image_io.imdecode(data, name)
  if (data.startswith(_STORED_AS_IS) and img.dtype == np.uint8
      and (img.ndim == 2 or (not is_mask and img.shape[2] == 3))):
    return data
  img = decode_mask(data, name) if is_mask else decode_image(data, name)[:, :, ::-1]
  ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
  if not ok:
    raise InputError(f"{name}: could not be encoded as PNG")
  return buf.tobytes()


class _CrmBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """``FILES``: file feature (a scanned sample's field) -> is a mask; ``reports``: split -> scan."""

  VERSION = tfds.core.Version(DATA_VERSION)
  RELEASE_NOTES = {DATA_VERSION: "Original files, normalised to JPEG/PNG of the declared channels."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 would need the `importlib_resources` backport (not installed) to find it.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.reports: Dict[str, folders.ScanReport] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    features = {k: tfds.features.Image(shape=(None, None, 1 if is_mask else 3), dtype=np.uint8)
                for k, is_mask in self.FILES.items()}
    return tfds.core.DatasetInfo(
        builder=self, description=self.DATASET.description, homepage=self.DATASET.homepage,
        features=tfds.features.FeaturesDict({**features, "name": tfds.features.Text()}))

  def _split(self, split: str, label: str, scanned: Tuple[list, folders.ScanReport]):
    """Logs and keeps the scan report of ``split``; gives its example generator."""
    samples, report = scanned
    logging.info("%s: %s", label, report.summary())
    self.reports[split] = report
    return self._generate_examples(samples, report)

  def _generate_examples(self, samples, report: folders.ScanReport):
    """(name, {file feature: stored bytes, 'name'}) per sample; unreadable ones are left out,
    logged and counted in ``report``."""
    for sample in samples:
      ex = {}
      try:
        for feature, is_mask in self.FILES.items():
          path = getattr(sample, feature)
          ex[feature] = _storable(pathlib.Path(path).read_bytes(), path, is_mask)
      except (OSError, InputError) as e:
        logging.warning("%s: left out %s: %s", self.name, sample.name, e)
        report.unreadable = (report.unreadable or []) + [os.path.relpath(path, report.root)]
        report.matched -= 1
        continue
      yield sample.name, {**ex, "name": sample.name}


class _PairsBuilder(_CrmBuilder, skip_registration=True):
  FILES = {"image": False, "mask": True}

  def _split_generators(self, dl_manager):
    scanned = self.DATASET.scan(os.fspath(dl_manager.manual_dir), what=self.DISPLAY_NAME)
    return {"train": self._split("train", self.name, scanned)}


class _BigBuilder(_CrmBuilder, skip_registration=True):
  FILES = {"image": False, "seg": True, "gt": True}

  def _split_generators(self, dl_manager):
    splits = folders.big_split_folders(os.fspath(dl_manager.manual_dir))
    return {s: self._split(s, f"{self.name} {s}", folders.scan_big(f, what=f"BIG {s}"))
            for s, f in splits.items()}


@dataclasses.dataclass(frozen=True)
class DataSet:
  """One row of ``DATASETS``: ``summary`` becomes the builder's docstring, ``instructions`` its
  ``MANUAL_DOWNLOAD_INSTRUCTIONS``; pairs sets are scanned by ``scan``."""
  short: str
  display: str
  summary: str
  description: str
  homepage: str
  instructions: str
  base: type = _PairsBuilder
  scan: Callable[..., Tuple[list, folders.ScanReport]] = folders.scan_flat


def _flat(short: str, display: str, summary: str, description: str, homepage: str,
          example: str) -> DataSet:
  """A flat salient-object set, ``<id>.jpg`` + ``<id>.png`` (``example``: the archive's layout)."""
  return DataSet(short, display, summary, description, homepage, f"""\
Download and extract the {display} archive ({homepage}) and pass its folder as manual_dir.
Images are `<id>.jpg`, masks grey `<id>.png`, paired by `<id>` anywhere under the folder: either
all in one folder, or images and masks in subfolders as in the original archive, e.g.
  {example}
Unpaired files are left out (and counted); hidden files and __MACOSX are ignored.
""")


_DUTS = "http://saliencydetection.net/duts/"
DATASETS: Tuple[DataSet, ...] = (
    DataSet(
        "fss1000", "FSS-1000",
        "FSS-1000 (Wei et al., CVPR 2020): 1000 classes x 10 image/mask pairs.",
        "FSS-1000 few-shot segmentation images and masks, as CRM trains on them.",
        "https://github.com/HKUSTCV/FSS-1000",
        """\
Download and extract FSS-1000 (fewshot_data.zip, https://github.com/HKUSTCV/FSS-1000) and pass the
folder holding the class folders as manual_dir:
  <manual_dir>/<class>/<k>.jpg   image
  <manual_dir>/<class>/<k>.png   grey mask
Samples are named `<class>/<k>`; unpaired files are left out (and counted).
""", scan=folders.scan_fss1000),
    _flat("duts_tr", "DUTS-TR", "DUTS-TR (Wang et al., CVPR 2017): 10,553 salient-object images.",
          "DUTS-TR salient-object images and masks.", _DUTS,
          "<manual_dir>/DUTS-TR-Image/<id>.jpg + <manual_dir>/DUTS-TR-Mask/<id>.png"),
    _flat("duts_te", "DUTS-TE",
          "DUTS-TE (Wang et al., CVPR 2017): 5,019 salient-object images (a training set for CRM).",
          "DUTS-TE salient-object images and masks (used for training, as upstream).", _DUTS,
          "<manual_dir>/DUTS-TE-Image/<id>.jpg + <manual_dir>/DUTS-TE-Mask/<id>.png"),
    _flat("ecssd", "ECSSD", "ECSSD (Yan et al., CVPR 2013): 1,000 salient-object images.",
          "ECSSD salient-object images and masks.",
          "https://www.cse.cuhk.edu.hk/leojia/projects/hsaliency/dataset.html",
          "<manual_dir>/images/<id>.jpg + <manual_dir>/ground_truth_mask/<id>.png"),
    _flat("msra10k", "MSRA-10K",
          "MSRA-10K (Cheng et al., TPAMI 2015): 10,000 salient-object images.",
          "MSRA-10K salient-object images and masks.", "https://mmcheng.net/msra10k/",
          "<manual_dir>/Imgs/<id>.jpg + <manual_dir>/Imgs/<id>.png (MSRA10K_Imgs_GT.zip)"),
    _flat("dut_omron", "DUT-OMRON",
          "DUT-OMRON (Yang et al., CVPR 2013): 5,168 salient-object images.",
          "DUT-OMRON salient-object images and pixel-wise masks.",
          "http://saliencydetection.net/dut-omron/",
          "<manual_dir>/DUT-OMRON-image/<id>.jpg + <manual_dir>/pixelwiseGT-new-PNG/<id>.png"),
    DataSet(
        "big", "BIG",
        "BIG (Cheng et al., CVPR 2020): 50 validation and 100 test objects, up to 5000x3600 "
        "pixels.",
        "BIG high-resolution segmentation refinement benchmark: image, coarse mask (seg) and "
        "ground truth per object.",
        "https://github.com/hkchengrex/CascadePSP",
        """\
Download and extract BIG (see https://github.com/hkchengrex/CascadePSP, docs/dataset.md) and pass
the BIG folder as manual_dir. Each subfolder holding BIG files becomes a split named after it (the
archive has val and test):
  <manual_dir>/val/<name>_im.jpg    image (.png also accepted)
  <manual_dir>/val/<name>_seg.png   coarse mask
  <manual_dir>/val/<name>_gt.png    ground truth
  <manual_dir>/test/...             the same
Incomplete triples are left out (and counted).
""", base=_BigBuilder),
)

BUILDERS: Dict[str, type] = {
    ds.short: type("Crm" + "".join(p.capitalize() for p in ds.short.split("_")), (ds.base,), {
        "__module__": __name__, "__doc__": ds.summary, "name": TFDS_PREFIX + ds.short,
        "DATASET": ds, "DISPLAY_NAME": ds.display, "MANUAL_DOWNLOAD_INSTRUCTIONS": ds.instructions})
    for ds in DATASETS}


def builder_class(name: str) -> type:
  """The builder class for a short name (``duts_tr``) or a TFDS name (``crm_duts_tr``)."""
  short = name[len(TFDS_PREFIX):] if name.startswith(TFDS_PREFIX) else name
  if short not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(BUILDERS)}")
  return BUILDERS[short]


def get_builder(name: str, data_dir: PathLike) -> tfds.core.GeneratorBasedBuilder:
  """The builder of ``name`` over ``data_dir`` (prepared or not), writing array_record files."""
  return builder_class(name)(data_dir=os.fspath(data_dir), file_format="array_record")


def prepared_path(name: str, data_dir: PathLike) -> str:
  """``<data_dir>/crm_<name>/<version>``: the folder of the prepared files of ``name``."""
  return os.path.join(os.fspath(data_dir), builder_class(name).name, DATA_VERSION)


def is_prepared(name: str, data_dir: PathLike) -> bool:
  """Whether ``name`` is prepared in ``data_dir`` (checked quietly, without building anything)."""
  return all(os.path.isfile(os.path.join(prepared_path(name, data_dir), f))
             for f in ("dataset_info.json", "features.json"))


def require_prepared(names: Union[str, Sequence[str]], data_dir: PathLike) -> None:
  """FileNotFoundError (naming ``data_dir`` and what to run) unless all ``names`` are prepared."""
  names = [names] if isinstance(names, str) else list(names)
  missing = [n for n in names if not is_prepared(n, data_dir)]
  if missing:
    raise FileNotFoundError(
        f"{os.fspath(data_dir)}: {', '.join(missing)} not prepared (no "
        f"{prepared_path(missing[0], data_dir)}); prepare with "
        "crm_jax.data.tfds_builders.prepare(name, manual_dir, data_dir)")


def prepare(name: str, manual_dir: PathLike, data_dir: PathLike, *,
            overwrite: bool = False) -> tfds.core.GeneratorBasedBuilder:
  """Prepares ``name`` from the extracted archive in ``manual_dir`` into ``data_dir`` (no network;
  a prepared one is reused unless ``overwrite``); ``builder.reports``: split -> scan report."""
  folders.check_folder(manual_dir, builder_class(name).DISPLAY_NAME)
  builder = get_builder(name, data_dir)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir), download_mode=mode, try_download_gcs=False))
  return builder


class DecodedSource:
  """Random access to one prepared split, decoded with OpenCV: ``{'image': uint8 [H, W, 3] RGB,
  'mask': uint8 [H, W], 'name': str}`` (BIG: ``seg`` and ``gt`` masks). Picklable."""

  def __init__(self, name: str, data_dir: PathLike, split: str = "train"):
    self.name = builder_class(name).DATASET.short
    self.data_dir = os.fspath(data_dir)
    self.split = split
    self._source = None
    self._len = len(self._open())

  def _open(self):
    if self._source is None:
      require_prepared(self.name, self.data_dir)
      builder = get_builder(self.name, self.data_dir)
      splits = list(builder.info.splits)
      if self.split not in splits:
        raise ValueError(f"{self.name} in {self.data_dir} has no split {self.split!r}; "
                         f"it has {', '.join(splits)}")
      self._masks = tuple(k for k in ("mask", "seg", "gt") if k in builder.info.features)
      decoders = {k: tfds.decode.SkipDecoding() for k in ("image",) + self._masks}
      self._source = builder.as_data_source(split=self.split, decoders=decoders)
    return self._source

  def _decode(self, ex: Mapping[str, Any]) -> Dict[str, Any]:
    name = ex["name"].decode("utf-8") if isinstance(ex["name"], bytes) else str(ex["name"])
    return {"image": decode_image(ex["image"], f"{self.name}/{name} image"),
            **{k: decode_mask(ex[k], f"{self.name}/{name} {k}") for k in self._masks},
            "name": name}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Dict[str, Any]:
    return self._decode(self._open()[source_index(index, self._len)])

  def __getitems__(self, indices: Sequence[int]) -> List[Dict[str, Any]]:
    indices = [source_index(i, self._len) for i in indices]
    return [self._decode(ex) for ex in self._open().__getitems__(indices)]

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __repr__(self) -> str:
    return (f"DecodedSource(name={self.name!r}, split={self.split!r}, len={self._len}, "
            f"data_dir={self.data_dir!r})")


def load_source(name: str, data_dir: PathLike, split: str = "train") -> DecodedSource:
  """A random-access, OpenCV-decoded source over a prepared split (see ``DecodedSource``)."""
  return DecodedSource(name, data_dir, split)


class MixtureSource:
  """The concatenation of random-access sources (a sequence, or a mapping {name: source})."""

  def __init__(self, sources: Union[Sequence[Any], Mapping[str, Any]]):
    named = isinstance(sources, Mapping)
    self.sources = list(sources.values() if named else sources)
    self.names = ([str(k) for k in sources] if named else
                  [getattr(s, "name", str(i)) for i, s in enumerate(self.sources)])
    if not self.sources:
      raise ValueError("MixtureSource needs at least one source")
    self.lengths = [len(s) for s in self.sources]
    self.offsets = np.cumsum([0] + self.lengths).tolist()  # offsets[i]: first index of source i

  def __len__(self) -> int:
    return self.offsets[-1]

  def locate(self, index: int) -> Tuple[int, int]:
    """(source number, index within that source) of a global index."""
    index = source_index(index, len(self))
    i = bisect.bisect_right(self.offsets, index) - 1
    return i, index - self.offsets[i]

  def __getitem__(self, index: int) -> Any:
    i, j = self.locate(index)
    return self.sources[i][j]

  def __getitems__(self, indices: Iterable[int]) -> List[Any]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    parts = ", ".join(f"{n}: {l}" for n, l in zip(self.names, self.lengths))
    return f"MixtureSource({parts}; total {len(self)})"


def training_mixture(data_dir: PathLike, names: Sequence[str] = TRAINING_SETS,
                     split: str = "train") -> MixtureSource:
  """The mixture of whichever of ``names`` are prepared in ``data_dir`` (none: an error)."""
  sources = {n: load_source(n, data_dir, split) for n in names if is_prepared(n, data_dir)}
  if not sources:
    raise FileNotFoundError(f"none of {', '.join(names)} is prepared in {os.fspath(data_dir)}; "
                            "run crm_jax.data.tfds_builders.prepare(name, manual_dir, data_dir)")
  return MixtureSource(sources)
