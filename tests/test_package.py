"""crm-jax as an installed package: the wheel, its console scripts and its bundled assets work in a
fresh virtual environment outside the checkout; the PyTorch reference says so when PyTorch is
missing."""

import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import cv2
import numpy as np
import pytest

from crm_jax import convert
from crm_jax.cli import convert as convert_cli
from crm_jax.torch_mapping import MappingError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFY_TOLERANCE = 1e-4  # float32 rounding, as the parity tests allow.


def test_torch_reference_without_torch_is_one_clear_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
  monkeypatch.delitem(sys.modules, "crm_jax.torch_reference", raising=False)
  with pytest.raises(ImportError) as e:
    importlib.import_module("crm_jax.torch_reference")
  message = str(e.value)
  assert "\n" not in message and "needs PyTorch" in message and "pip install" in message
  with pytest.raises(MappingError, match="needs PyTorch") as e:
    convert._torch_reference()
  assert "\n" not in str(e.value)


def test_convert_command_bad_input_is_one_line(tmp_path, capsys):
  missing = str(tmp_path / "nothing.pth")
  assert convert_cli.main([missing, str(tmp_path / "out"), "--verify"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err
  assert missing in err or "torch" in err
  assert not (tmp_path / "out").exists()


def _run(args, cwd, env, status=0, timeout=600):
  result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == status, f"{args}\n{result.stdout}\n{result.stderr}"
  return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """A wheel built offline from the checkout's package files, installed (without dependencies)
  into a new venv outside the checkout; the dependencies come from this interpreter's
  site-packages through a .pth file, so nothing is downloaded."""
  try:
    importlib.import_module("wheel")
  except ImportError:  # setuptools builds wheels by itself from 70.1 on (torch needs >= 77)
    version = importlib.metadata.version("setuptools")
    if tuple(int(p) for p in re.findall(r"\d+", version)[:2]) < (70, 1):
      pytest.skip(f"building a wheel offline needs setuptools>=70.1 or the wheel package "
                  f"(setuptools {version} here)")
  root = tmp_path_factory.mktemp("package")
  src = root / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  shutil.copytree(os.path.join(REPO, "crm_jax"), src / "crm_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
  _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
        "--no-index", "-q", "-w", str(root / "dist")], cwd=root, env=env)
  wheels = os.listdir(root / "dist")
  assert len(wheels) == 1 and wheels[0].startswith("crm_jax-") and wheels[0].endswith(".whl")

  venv = root / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root, env=env)
  python = str(venv / "bin" / "python")
  site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
              cwd=root, env=env).strip()
  outer = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
  with open(os.path.join(site, "crm_jax_test_deps.pth"), "w") as f:
    f.write("\n".join(sorted(outer)) + "\n")
  _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
        str(root / "dist" / wheels[0])], cwd=root, env=env)
  work = root / "elsewhere"
  work.mkdir()
  return {"bin": venv / "bin", "python": python, "site": site, "work": work, "env": env}


@pytest.mark.slow
def test_installed_package_is_not_the_checkout(installed):
  where = _run([installed["python"], "-c",
                "import crm_jax, crm_jax.bundled as b; print(crm_jax.__file__); "
                "print(b.DEMO_CHECKPOINT)"], cwd=installed["work"], env=installed["env"])
  module, checkpoint = where.split()
  assert module.startswith(installed["site"]) and checkpoint.startswith(installed["site"])
  assert os.path.isfile(os.path.join(checkpoint, "config.json"))
  # Every console script's --help is its own: its usage line names the script.
  for script in ("crm-refine", "crm-evaluate", "crm-convert", "crm-export", "crm-train"):
    printed = _run([str(installed["bin"] / script), "--help"], cwd=installed["work"],
                   env=installed["env"])
    assert printed.startswith(f"usage: {script} "), printed[:300]
  assert "--workdir" in printed
  # absl's --helpfull exits with status 1.
  assert "--workdir" in _run([str(installed["bin"] / "crm-train"), "--helpfull"],
                             cwd=installed["work"], env=installed["env"], status=1)


@pytest.mark.slow
def test_crm_train_reads_a_repository_config_from_another_folder(installed):
  """configs/*.py import ``configs.*``; crm-train finds them by the config file's path. With no
  prepared data the run stops at once with one line naming the data folder."""
  missing = installed["work"] / "no_data"
  result = subprocess.run(
      [str(installed["bin"] / "crm-train"), "--config",
       os.path.join(REPO, "configs", "synthetic_small.py"), "--workdir",
       str(installed["work"] / "run"), "--config.dataset=tfds_mixture",
       f"--config.data_dir={missing}"],
      cwd=installed["work"], env=installed["env"], capture_output=True, text=True, timeout=300)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and len(lines) == 1, result.stderr
  assert lines[0].startswith("error: ") and str(missing) in lines[0] and "not prepared" in lines[0]


@pytest.mark.slow
def test_crm_refine_on_a_bundled_image_from_another_folder(installed):
  demo = os.path.join(installed["site"], "crm_jax", "assets", "demo_big")
  stem = os.path.join(demo, "synthetic_02")
  out = installed["work"] / "refined.png"
  _run([str(installed["bin"] / "crm-refine"), "--image", stem + "_im.jpg",
        "--mask", stem + "_seg.png", "--output", str(out)],
       cwd=installed["work"], env=installed["env"])
  refined = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
  gt = cv2.imread(stem + "_gt.png", cv2.IMREAD_GRAYSCALE)
  assert refined.dtype == np.uint8 and refined.shape == gt.shape
  # The bundled checkpoint was found and used: the refined mask follows the object.
  fg, want = refined > 128, gt > 128
  assert (fg & want).sum() / (fg | want).sum() > 0.8


@pytest.mark.slow
@pytest.mark.torch
def test_crm_convert_verify_on_a_small_pytorch_checkpoint(installed):
  torch_reference = pytest.importorskip("crm_jax.torch_reference")
  from crm_jax.models.crm import TINY

  path = str(installed["work"] / "tiny.pth")
  model = torch_reference.randomize_(torch_reference.TorchCRM(**TINY.architecture()), 0)
  torch_reference.save_like_dataparallel(model, path)
  out_dir = installed["work"] / "converted"
  printed = _run([str(installed["bin"] / "crm-convert"), path, str(out_dir), "--verify"],
                 cwd=installed["work"], env=installed["env"])
  assert (out_dir / "config.json").is_file()
  match = re.search(r"largest \|logit difference\| JAX vs PyTorch = (\S+)", printed)
  assert match, printed
  assert float(match.group(1)) < VERIFY_TOLERANCE


def _readme_blocks(kind):
  """The README's fenced code blocks of one kind (``python`` or ``sh``), in order."""
  text = open(os.path.join(REPO, "README.md")).read()
  return re.findall(rf"^```{kind}\n(.*?)^```", text, re.M | re.S)


@pytest.mark.slow
def test_readme_snippets_run_as_written_from_another_folder(installed, tmp_path):
  """The README's Python and its crm-refine lines, run as written in a folder outside the
  checkout after the wheel is installed, on a bundled image made small (photo.jpg, coarse.png;
  IMAGES/ and MASKS/ for the folder line)."""
  work = tmp_path / "snippets"
  (work / "IMAGES").mkdir(parents=True)
  (work / "MASKS").mkdir()
  stem = os.path.join(installed["site"], "crm_jax", "assets", "demo_big", "synthetic_02")
  image = cv2.resize(cv2.imread(stem + "_im.jpg"), (320, 240), interpolation=cv2.INTER_AREA)
  mask = cv2.resize(cv2.imread(stem + "_seg.png", cv2.IMREAD_GRAYSCALE), (320, 240),
                    interpolation=cv2.INTER_AREA)
  assert cv2.imwrite(str(work / "photo.jpg"), image)
  assert cv2.imwrite(str(work / "coarse.png"), mask)
  assert cv2.imwrite(str(work / "IMAGES" / "photo.jpg"), image)
  assert cv2.imwrite(str(work / "MASKS" / "photo.png"), mask)
  labels = (mask > 128).astype("uint8")  # a label map: background 0, the object 1 and 2
  labels[:, :160] *= 2
  assert cv2.imwrite(str(work / "coarse_labels.png"), labels)
  env = dict(installed["env"], PATH=f"{installed['bin']}{os.pathsep}{installed['env']['PATH']}")
  python = _readme_blocks("python")
  assert python, "the README has no Python snippet"
  for code in python:
    _run([installed["python"], "-c", code], cwd=work, env=env)
  assert cv2.imread(str(work / "refined.png"), cv2.IMREAD_GRAYSCALE).shape == (240, 320)
  os.remove(work / "refined.png")
  lines = [l.split("#")[0].strip() for block in _readme_blocks("sh") for l in block.splitlines()
           if l.strip().startswith("crm-")]
  assert lines, "the README has no crm- command line"
  for line in lines:
    _run(["bash", "-c", line], cwd=work, env=env)
  assert cv2.imread(str(work / "refined.png"), cv2.IMREAD_GRAYSCALE).shape == (240, 320)
  assert cv2.imread(str(work / "OUT" / "photo.png"), cv2.IMREAD_GRAYSCALE).shape == (240, 320)
  refined_labels = cv2.imread(str(work / "refined_labels.png"), cv2.IMREAD_UNCHANGED)
  assert refined_labels.shape == (240, 320) and set(refined_labels.ravel()) <= {0, 1, 2}
