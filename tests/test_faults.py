"""Faults a cluster meets (docs/faults_and_files.md): a damaged latest training checkpoint, two
runs into one folder, a full disk while training. Same setting as test_train.py (four CPU
devices, the TINY model, tests/train_config.py)."""

import glob
import os

import jax
import numpy as np
import pytest

from crm_jax import training
from crm_jax.training import resume
from crm_jax.training import step as step_lib
from tests.test_training_runs import _assert_states_equal
from tests.train_config import small_test_config


def _cut_data(step_dir):
  """Halves the largest data file of a checkpoint step (a write cut off by a kill or a full
  disk)."""
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', '*'), recursive=True)
           if os.path.isfile(f) and not f.endswith('.json') and 'metadata' not in f]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)
  return biggest


def _cut_metadata(step_dir):
  """Cuts a JSON metadata file of the step in the middle."""
  files = sorted(f for f in glob.glob(os.path.join(step_dir, '**', '*'), recursive=True)
                 if os.path.isfile(f) and ('metadata' in os.path.basename(f)
                                           or f.endswith('.json')))
  target = files[0]
  text = open(target, 'rb').read()
  with open(target, 'wb') as f:
    f.write(text[:len(text) // 2])
  return target


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The state after 4 steps in one go, and the config (a checkpoint at every step)."""
  config = small_test_config(num_steps=4, checkpoint_every=1, keep_checkpoints=3)
  return training.train_and_evaluate(config, str(tmp_path_factory.mktemp('whole'))), config


@pytest.mark.parametrize('damage', [_cut_data, _cut_metadata])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys,
                                                                   uninterrupted, damage):
  """Checkpoints at steps 1-3, the newest damaged: the run notes it in one line, resumes from
  step 2 and ends where an uninterrupted run ends, byte for byte."""
  whole, config = uninterrupted
  work = str(tmp_path / 'work')
  training.train_and_evaluate(_with(config, num_steps=3), work)
  capsys.readouterr()
  damaged = damage(os.path.join(work, 'checkpoints', '3'))
  state = training.train_and_evaluate(config, work)
  out = capsys.readouterr().out
  notes = [l for l in out.splitlines() if 'damaged checkpoint' in l]
  assert len(notes) == 1 and '/3: damaged checkpoint' in notes[0], (damaged, out)
  assert f"resumed from {os.path.join(work, 'checkpoints')}/2; steps 2 -> 4" in notes[0]
  _assert_states_equal(state, whole)


def test_no_intact_checkpoint_is_one_error_naming_the_folder(tmp_path, uninterrupted):
  _, config = uninterrupted
  work = str(tmp_path / 'work')
  training.train_and_evaluate(_with(config, num_steps=1), work)
  _cut_data(os.path.join(work, 'checkpoints', '1'))
  with pytest.raises(training.TrainingError) as e:
    training.train_and_evaluate(config, work)
  message = str(e.value)
  assert '\n' not in message and os.path.join(work, 'checkpoints') in message
  assert 'no intact checkpoint' in message


def _with(config, **fields):
  c = config.copy_and_resolve_references()
  for k, v in fields.items():
    c[k] = v
  return c


def test_restore_returns_no_note_for_an_intact_workdir(tmp_path, uninterrupted):
  whole, config = uninterrupted
  work = str(tmp_path / 'work')
  training.train_and_evaluate(_with(config, num_steps=2), work)
  manager = resume.checkpoint_manager(work, 3)
  try:
    state, notes = resume.restore_checkpoint(
        manager, step_lib.create_train_state(config, jax.random.PRNGKey(0)))
  finally:
    manager.close()
  assert notes == [] and int(state.step) == 2


_CLI_SCRIPT = """
import errno, sys
from crm_jax import training
from crm_jax.cli import train

def fake(config, workdir):
  if sys.argv[1] == 'preempted':
    raise training.Preempted('SIGTERM: stopped after step 3', None, 'SIGTERM')
  raise RuntimeError('a save failed') from OSError(
      errno.ENOSPC, 'No space left on device', workdir + '/checkpoints/3/state/d/0a1b')

training.train_and_evaluate = fake
train.main(['crm-train', '--config', sys.argv[2], '--workdir', sys.argv[3]])
"""


@pytest.mark.parametrize('kind', ['preempted', 'disk_full'])
def test_crm_train_exit_status_and_one_line(tmp_path, kind):
  """A pre-empted run ends with 128 + SIGTERM (a scheduler must not take it as finished); a full
  disk under orbax's own exception types is one line naming the file and the cause, status 1."""
  import signal
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', _CLI_SCRIPT, kind,
                         os.path.join(root, 'configs', 'synthetic_small.py'),
                         str(tmp_path / 'work')], cwd=root, capture_output=True, text=True,
                        timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  if kind == 'preempted':
    assert proc.returncode == 128 + signal.SIGTERM and not lines, proc.stderr[-2000:]
  else:
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == (f'error: {tmp_path}/work/checkpoints/3/state/d/0a1b: '
                        'No space left on device')


# ---------------------------------------------------------------------------------------------
# Output folders: one run at a time, and nothing left behind by a run that found nothing.


@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
  """IMAGES/<x>.png with MASKS/<x>_mask.png (two pairs), a TINY checkpoint, and a BIG-style
  folder of two objects (``data``)."""
  import cv2
  from tests.big_objects import make_world, object_triple
  root = tmp_path_factory.mktemp('faults')
  data, ckpt = make_world(root, {'o1': (64, 72), 'o2': (72, 64)}, seed=3)
  images, masks = root / 'images', root / 'masks'
  images.mkdir()
  masks.mkdir()
  rng = np.random.default_rng(4)
  for name in ('a', 'b'):
    image, seg, _ = object_triple(64, 80, rng)
    assert cv2.imwrite(str(images / f'{name}.png'), image[:, :, ::-1])
    assert cv2.imwrite(str(masks / f'{name}_mask.png'), seg)
  return {'images': str(images), 'masks': str(masks), 'ckpt': ckpt, 'data': data}


def _refine(pairs, out, *extra):
  from crm_jax.cli import refine as refine_cli
  return refine_cli.main(['--images', pairs['images'], '--masks', pairs['masks'], '--output',
                          str(out), '--checkpoint', pairs['ckpt'], '--no-progress',
                          '--scales', '0.5', '1.0', *extra])


# ---------------------------------------------------------------------------------------------
# Interrupted dataset runs: SIGTERM / SIGINT stop at once, leave no partial or temporary file,
# and the same command finishes the run with the bytes of an uninterrupted one.

_INTERRUPTED = """
import os, signal, sys, time
from crm_jax.cli import evaluate, refine
real_replace, calls = os.replace, [0]
def replace(src, dst):
  calls[0] += 1
  if calls[0] == int(sys.argv[2]):  # a worker thread with its temporary file written
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    time.sleep(30)  # still renaming when the main thread stops the run
  return real_replace(src, dst)
os.replace = replace
command = {'refine': refine, 'evaluate': evaluate}[sys.argv[3]]
sys.exit(command.main(sys.argv[4:]))
"""


def _command_args(pairs, command, out):
  if command == 'refine':
    return ['--images', pairs['images'], '--masks', pairs['masks'], '--mask-suffix', '_mask',
            '--output', str(out), '--checkpoint', pairs['ckpt'], '--no-progress', '--scales',
            '0.5', '1.0']
  return ['--data', pairs['data'], '--checkpoint', pairs['ckpt'], '--output', str(out),
          '--no-progress', '--scales', '0.5', '1.0']


def _outputs(folder):
  """{name: bytes} of every image of an output folder, and the scores of ``metrics.json`` (not
  the run's own record: times and counts)."""
  import json
  out = {f: open(os.path.join(folder, f), 'rb').read() for f in sorted(os.listdir(folder))
         if f.endswith(('.png', '.jpg'))}
  if os.path.exists(os.path.join(folder, 'metrics.json')):
    out['metrics.json'] = json.load(open(os.path.join(folder, 'metrics.json')))['scales']
  return out


@pytest.mark.slow
@pytest.mark.parametrize('command', ['refine', 'evaluate'])
@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGINT'])
def test_an_interrupted_run_leaves_whole_files_and_the_rerun_finishes_it(pairs, tmp_path, command,
                                                                        sig):
  """The signal comes while a worker thread holds a written temporary file (its second write:
  the first mask or copy of an object): the run stops at once with 128 + the signal and one
  line, every output left is whole, no temporary file is left, and the same command run again
  ends with the bytes of an uninterrupted run."""
  import signal
  import subprocess
  import sys
  from crm_jax import outputs
  from crm_jax.cli import evaluate as evaluate_cli
  from crm_jax.cli import refine as refine_cli
  main = {'refine': refine_cli.main, 'evaluate': evaluate_cli.main}[command]
  whole, out = tmp_path / 'whole', tmp_path / 'out'
  assert main(_command_args(pairs, command, whole)) == 0
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, '-c', _INTERRUPTED, sig, '3', command, *_command_args(pairs, command, out)],
      cwd=root, env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=root), capture_output=True,
      text=True, timeout=600)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 128 + getattr(signal, sig), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr and lines[-1].startswith(f'stopped by {sig}: '), lines
  left = os.listdir(out)
  assert not [f for f in left if outputs.TMP_MARK in f], left
  written = [f for f in left if f.endswith('.png')]
  assert all(outputs.is_complete_output(str(out / f)) for f in written), written
  assert set(_outputs(out)) < set(_outputs(whole))  # stopped before the end
  assert main(_command_args(pairs, command, out)) == 0
  assert _outputs(out) == _outputs(whole)


def test_masks_of_another_suffix_are_listed_with_a_hint_and_no_folder_is_left(
    pairs, tmp_path, capsys):
  out = tmp_path / 'out'
  assert _refine(pairs, out) == 2
  printed = capsys.readouterr()
  out_lines, err = printed.out.splitlines(), printed.err
  skipped = [l for l in out_lines if l.startswith('skipped ')]
  errors = [l for l in err.splitlines() if l.startswith('error: ')]
  assert len(skipped) == 4, err  # two images without a mask, two masks without an image
  assert len(errors) == 1 and 'pass --mask-suffix _mask' in errors[0], err
  assert not out.exists()  # the run made the folder and wrote nothing: it is gone
  assert _refine(pairs, out, '--mask-suffix', '_mask') == 0
  assert sorted(f for f in os.listdir(out) if f.endswith('.png')) == ['a_mask.png',
                                                                       'b_mask.png']


def test_a_second_run_into_a_folder_in_use_is_refused(pairs, tmp_path, capsys):
  from crm_jax.folder_lock import FolderLock
  out = tmp_path / 'out'
  out.mkdir()
  with FolderLock(str(out)):  # another run holds the folder
    assert _refine(pairs, out, '--mask-suffix', '_mask') == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f'error: {out}: another crm-jax run is using'), err
  assert not [f for f in os.listdir(out) if f.endswith(('.png', '.json'))]
  assert _refine(pairs, out, '--mask-suffix', '_mask') == 0  # released: the run goes ahead


def test_a_killed_holder_does_not_leave_the_lock_stuck(tmp_path):
  import signal
  import subprocess
  import sys
  from crm_jax.folder_lock import FolderLock
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from crm_jax.folder_lock import FolderLock; '
       f'FolderLock({str(tmp_path)!r}).acquire(); print("held", flush=True); time.sleep(600)'],
      cwd=root, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(Exception, match='another crm-jax run'):
      FolderLock(str(tmp_path)).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  finally:
    if holder.poll() is None:
      holder.kill()
  with FolderLock(str(tmp_path)):
    pass


def test_a_second_training_run_into_a_workdir_in_use_is_refused(tmp_path):
  from crm_jax.folder_lock import FolderLock
  from crm_jax.io import InputError
  work = tmp_path / 'work'
  work.mkdir()
  with FolderLock(str(work)):
    with pytest.raises(InputError, match='another crm-jax run is using this workdir'):
      training.train_and_evaluate(small_test_config(num_steps=1), str(work))
  assert not os.path.exists(work / 'checkpoints')  # refused before anything was written
  assert int(training.train_and_evaluate(small_test_config(num_steps=1), str(work)).step) == 1


def _descendants(pid):
  """The pids of every living descendant of ``pid`` (from /proc)."""
  children = {}
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()
      except OSError:
        continue
      if fields[0] != 'Z':
        children.setdefault(int(fields[1]), []).append(int(entry))
  out, todo = [], [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      out.append(child)
      todo.append(child)
  return out


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


@pytest.mark.slow
def test_no_data_worker_outlives_a_killed_training_process(tmp_path):
  """SIGKILL of a training process with grain worker processes: every process it started ends
  within seconds (none lives on re-parented to init)."""
  import signal
  import subprocess
  import sys
  import time
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, 'tests', 'train_worker.py'), str(tmp_path / 'work'),
         str(tmp_path / 'out.npz'), '100000', 'num_workers=2', 'log_every=1',
         'checkpoint_every=100000']
  proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
  try:
    for line in proc.stdout:  # training under way: the workers are running
      if line.startswith('step '):
        break
    started = _descendants(proc.pid)
    assert len(started) >= 2, started  # the two data workers (and grain's helpers)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p) for p in started):
      time.sleep(0.5)
    assert not [p for p in started if _alive(p)]
  finally:
    if proc.poll() is None:
      proc.kill()
