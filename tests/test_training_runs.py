"""Training runs that go wrong or are checked as they go: the non-finite guard, validation,
mixed precision, config and workdir errors, SIGINT, leftovers of killed runs.

Same setting as test_train.py (4 CPU devices, the TINY model, tests/train_config.py).
"""

import json
import os
import signal
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from crm_jax import checkpoint as model_ckpt
from crm_jax import evaluation
from crm_jax import training
from crm_jax.data import pipeline
from crm_jax.training import resume
from crm_jax.training import config as cfg_lib
from crm_jax.training import devices
from crm_jax.training import step as step_lib
from crm_jax.training import validation
from crm_jax.training import workdir as wd
from tests.train_config import small_test_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_states_equal(a, b):
  assert int(a.step) == int(b.step)
  for part in ('params', 'batch_stats', 'opt_state'):
    fa, fb = _flat(getattr(a, part)), _flat(getattr(b, part))
    assert fa.keys() == fb.keys()
    for k in fa:
      np.testing.assert_array_equal(fa[k], fb[k], err_msg=f'{part}{k}')


def _saved_state(workdir, config):
  manager = resume.checkpoint_manager(str(workdir), 2)
  try:
    state, notes = resume.restore_checkpoint(
        manager, step_lib.create_train_state(config, jax.random.PRNGKey(0)))
    assert notes == []
    return state
  finally:
    manager.close()


def _poison(monkeypatch, bad_step):
  original = pipeline.StepBatch.__call__

  def poisoned(self, step):
    batch = original(self, step)
    if step == bad_step:
      batch['image'][0, 0, 0, 0] = np.inf
    return batch

  monkeypatch.setattr(pipeline.StepBatch, '__call__', poisoned)


# ---------------------------------------------------------------------------------------------
# The non-finite guard.


def test_guard_keeps_the_state_and_records_the_first_bad_step():
  config = small_test_config()
  p_step = step_lib.build(config).p_step
  state = step_lib.create_train_state(config, jax.random.PRNGKey(0))
  good = devices.shard(pipeline.host_batch(config, 0), 4)
  bad = {k: v.copy() for k, v in good.items()}
  bad['image'][2, 0, 0, 0, 0] = np.nan  # one device's share only: every device must refuse
  r_state, guard = devices.replicate(state), devices.replicate(step_lib.Guard.clear())
  rng = jax.random.PRNGKey(1)
  r_state, guard, _ = p_step(r_state, guard, good, rng)
  after_one = devices.unreplicate(r_state)
  assert int(devices.unreplicate(guard).bad_step) == -1
  r_state, guard, metrics = p_step(r_state, guard, bad, rng)
  assert not np.isfinite(devices.unreplicate(metrics)['total'])
  r_state, guard, _ = p_step(r_state, guard, good, rng)  # later good steps are not applied
  g = devices.unreplicate(guard)
  assert int(g.bad_step) == 1
  assert g.describe().startswith('non-finite loss at step 1')
  _assert_states_equal(devices.unreplicate(r_state), after_one)


def test_non_finite_loss_saves_the_state_before_the_step(tmp_path, monkeypatch):
  # The guard is looked at only at log steps (every 5): the bad step 3 is found after step 5.
  config = small_test_config(num_steps=8, log_every=5, checkpoint_every=100)
  before = training.train_and_evaluate(small_test_config(num_steps=3, log_every=5,
                                                         checkpoint_every=100),
                                       str(tmp_path / 'straight'))
  _poison(monkeypatch, 3)
  with pytest.raises(training.TrainingError, match=r'non-finite loss at step 3\b') as e:
    training.train_and_evaluate(config, str(tmp_path / 'work'))
  assert str(tmp_path / 'work' / 'checkpoints') in str(e.value)
  assert os.listdir(tmp_path / 'work' / 'checkpoints') == ['3']
  _assert_states_equal(_saved_state(tmp_path / 'work', config), before)
  assert not (tmp_path / 'work' / 'model').exists()


@pytest.mark.slow  # compiles a step of its own (the learning rate is a constant of the step)
def test_nan_learning_rate_stops_at_step_0_with_finite_weights(tmp_path):
  # The loss and gradients of step 0 are finite; the updated parameters are not.
  config = small_test_config(learning_rate=float('nan'))
  with pytest.raises(training.TrainingError, match=r'non-finite parameters at step 0\b'):
    training.train_and_evaluate(config, str(tmp_path))
  saved = _saved_state(tmp_path, config)
  root = jax.random.PRNGKey(int(config.seed))
  _assert_states_equal(saved, step_lib.create_train_state(config, jax.random.fold_in(root, 0)))
  # A run that never stepped binds nothing: the corrected config runs in the same workdir.
  state = training.train_and_evaluate(small_test_config(num_steps=2), str(tmp_path))
  assert int(state.step) == 2
  assert json.loads((tmp_path / 'train_config.json').read_text())['learning_rate'] == 1e-2


# ---------------------------------------------------------------------------------------------
# Validation.


def _scalars(logdir):
  """{tag: {step: value}} of the TensorBoard event files in ``logdir`` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for name in os.listdir(logdir):
    with open(os.path.join(logdir, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        if v.HasField('simple_value'):
          out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def test_validation_does_not_import_the_dataset_run():
  """Validation scores in memory: no output folder or manifest machinery behind it."""
  code = ('import sys, crm_jax.training.validation; '
          'print(sorted(m for m in sys.modules if m in ("crm_jax.dataset_run", '
          '"crm_jax.evaluation", "crm_jax.folder_refine")))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[]'


def test_validation_runs_at_eval_every_and_writes_its_scalars(tmp_path, capsys):
  config = small_test_config(num_steps=4, eval_every=2, eval_data='synthetic',
                             eval_synthetic_num_examples=2, eval_synthetic_size=64,
                             eval_scales=(0.5, 1.0))
  training.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert 'validation at step 2 (2 objects)' in out and 'validation at step 4' in out
  record = json.loads((tmp_path / 'validation.json').read_text())
  assert sorted(record['steps'], key=int) == ['2', '4']
  assert record['metric'] == 'val/mba_1.0'
  best = max(record['steps'], key=lambda s: record['steps'][s]['val/mba_1.0'])
  assert record['best']['step'] == int(best)
  scalars = _scalars(tmp_path / 'tensorboard')
  for tag in ('val/iou_0.5', 'val/iou_1.0', 'val/mba_0.5', 'val/mba_1.0'):
    assert sorted(scalars[tag]) == [2, 4], tag
  # Validation wrote no picture anywhere: the held-out set lives in memory, scored there.
  assert not [f for _, _, files in os.walk(tmp_path) for f in files
              if f.lower().endswith(('.png', '.jpg'))]
  # The scores are crm-evaluate's for the same weights (the exported model at step 4) on the
  # same objects, written out as a BIG folder.
  held_out = tmp_path.parent / (tmp_path.name + '_held_out')
  validation.make_held_out_set(str(held_out), 2, 64, int(config.seed))
  result = evaluation.evaluate(str(held_out), str(tmp_path / 'model'),
                               str(tmp_path.parent / (tmp_path.name + '_eval')), (0.5, 1.0),
                               progress=False, log=lambda _: None)
  for s in ('0.5', '1.0'):
    for m in ('iou', 'mba'):
      assert record['steps']['4'][f'val/{m}_{s}'] == pytest.approx(result['scales'][s][m],
                                                                    abs=1e-6)
      assert scalars[f'val/{m}_{s}'][4] == pytest.approx(result['scales'][s][m], abs=1e-6)
  # The held-out set is not training data; nothing temporary is left in the workdir.
  assert sorted(os.listdir(held_out))[0] == 'held_out_000_gt.png'
  from crm_jax.data.synthetic import SyntheticSource
  from crm_jax.io import read_mask
  train_pairs = SyntheticSource(2, 64, 64, seed=int(config.seed))
  for i in range(2):
    held = read_mask(str(held_out / f'held_out_{i:03d}_gt.png'))
    assert not any(np.array_equal(held, train_pairs[j]['mask']) for j in range(2))
  assert not [f for f in os.listdir(tmp_path) if f.startswith('.tmp-')]


def test_bad_validation_set_fails_before_any_step(tmp_path):
  config = small_test_config(eval_every=2, eval_data=str(tmp_path / 'nowhere'))
  with pytest.raises(training.TrainingError, match=r'config.eval_data: .*nowhere'):
    training.train_and_evaluate(config, str(tmp_path / 'work'))
  assert not (tmp_path / 'work' / 'checkpoints' / '2').exists()
  assert not (tmp_path / 'work' / wd.CONFIG_FILE).exists()


def test_every_pixel_decoding_equals_the_query_decoder():
  config = small_test_config()
  model = step_lib.build(config).model
  state = step_lib.create_train_state(config, jax.random.PRNGKey(5))
  batch = pipeline.host_batch(config, 0)
  x = np.concatenate([batch['image'], batch['seg']], -1)
  b, s = x.shape[0], x.shape[1]
  variables = state.variables()
  plain = model.clone(bn_axis_name=None)
  want = plain.apply(variables, x, *step_lib.queries(s, b)).reshape(b, s, s)
  feature_map = plain.apply(variables, x, method=type(model).features)
  got = step_lib.decode_every_pixel(plain, variables, feature_map, s)
  assert got.shape == (b, s, s)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Mixed precision.


def test_bfloat16_compute_keeps_float32_state_and_a_close_loss():
  losses, states = {}, {}
  for dtype in ('float32', 'bfloat16'):
    config = small_test_config(compute_dtype=dtype)
    p_step = step_lib.build(config).p_step
    state = step_lib.create_train_state(config, jax.random.PRNGKey(0))
    batch = devices.shard(pipeline.host_batch(config, 0), 4)
    r_state, guard = devices.replicate(state), devices.replicate(step_lib.Guard.clear())
    r_state, guard, metrics = p_step(r_state, guard, batch, jax.random.PRNGKey(1))
    losses[dtype] = float(devices.unreplicate(metrics)['total'])
    states[dtype] = devices.unreplicate(r_state)
    assert int(devices.unreplicate(guard).bad_step) == -1
  for leaf in jax.tree_util.tree_leaves(states['bfloat16']):
    if np.issubdtype(leaf.dtype, np.floating):
      assert leaf.dtype == np.float32
  assert losses['bfloat16'] != losses['float32']  # computed in another precision ...
  assert losses['bfloat16'] == pytest.approx(losses['float32'], rel=0.05)  # ... but close


# ---------------------------------------------------------------------------------------------
# Config and workdir errors, SIGINT, leftovers.


@pytest.mark.parametrize('overrides, message', [
    ({'checkpoint_every': 0}, 'config.checkpoint_every must be an integer >= 1, got 0'),
    ({'num_steps': -1}, 'config.num_steps must be an integer >= 1, got -1'),
    ({'compute_dtype': 'float16'}, 'config.compute_dtype must be one of'),
    ({'eval_every': 5, 'eval_data': None}, 'config.eval_every > 0 needs config.eval_data'),
])
def test_bad_config_fields_fail_before_anything_runs(tmp_path, overrides, message):
  config = small_test_config(**overrides)
  with pytest.raises(training.TrainingError, match=message):
    training.train_and_evaluate(config, str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


def _cli(*args):
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *args]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
  return out.returncode, [line for line in out.stderr.splitlines() if line.strip()]


def test_cli_config_errors_are_one_line(tmp_path):
  small = os.path.join(ROOT, 'configs', 'synthetic_small.py')
  work = f'--workdir={tmp_path / "work"}'
  cases = [
      ([f'--config={tmp_path / "missing.py"}', work], 'missing.py'),
      ([f'--config={small}', '--config.no_such_field=3', work], "no field 'no_such_field'"),
      ([f'--config={small}', '--config.checkpoint_every=0', work], 'checkpoint_every'),
      ([f'--config={small}', '--config.num_steps=0', work], 'num_steps'),
  ]
  for args, expected in cases:
    rc, lines = _cli(*args)
    assert rc == 1, (args, lines)
    assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], lines
  assert not (tmp_path / 'work').exists()


def test_unusable_workdir_is_a_one_line_error(tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  with pytest.raises(training.TrainingError, match=r'file: --workdir is a file'):
    training.train_and_evaluate(small_test_config(), str(a_file))
  with pytest.raises(training.TrainingError, match=r'file/sub: the workdir is not writable'):
    training.train_and_evaluate(small_test_config(), str(a_file / 'sub'))


def test_workdir_that_refuses_writes_is_a_one_line_error(tmp_path, monkeypatch):
  # What a read-only folder gives a non-root user (root writes anyway: see the next test).
  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied')

  monkeypatch.setattr(wd.tempfile, 'mkstemp', refuse)
  with pytest.raises(training.TrainingError,
                     match=r'work: the workdir is not writable \(Permission denied\)$'):
    training.train_and_evaluate(small_test_config(), str(tmp_path / 'work'))


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_read_only_workdir_is_a_one_line_error(tmp_path):
  os.chmod(tmp_path, 0o555)
  try:
    with pytest.raises(training.TrainingError, match=r'the workdir is not writable'):
      training.train_and_evaluate(small_test_config(), str(tmp_path))
  finally:
    os.chmod(tmp_path, 0o755)


def test_config_is_recorded_only_once_the_run_has_started(tmp_path):
  work = str(tmp_path / 'work')
  bad_data = small_test_config(dataset='tfds_mixture', data_dir=str(tmp_path),
                               tfds_sets=('duts_tr',))
  with pytest.raises(pipeline.DatasetError):
    training.train_and_evaluate(bad_data, work)
  assert not os.path.exists(os.path.join(work, wd.CONFIG_FILE))
  bad_init = small_test_config(init=str(tmp_path / 'no_model'))
  with pytest.raises(model_ckpt.CheckpointError):
    training.train_and_evaluate(bad_init, work)
  assert not os.path.exists(os.path.join(work, wd.CONFIG_FILE))
  # The corrected config starts in the same workdir.
  assert int(training.train_and_evaluate(small_test_config(num_steps=2), work).step) == 2
  assert json.loads(open(os.path.join(work, wd.CONFIG_FILE)).read())['dataset'] == 'synthetic'


def test_sigint_checkpoints_and_stops(tmp_path, monkeypatch, capsys):
  original = pipeline.StepBatch.__call__

  def interrupting(self, step):  # Ctrl-C while the batch of step 3 is loaded
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)
    return original(self, step)

  monkeypatch.setattr(pipeline.StepBatch, '__call__', interrupting)
  config = small_test_config(num_steps=40, checkpoint_every=1000, log_every=1000)
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(training.Preempted) as stopped:
    training.train_and_evaluate(config, str(tmp_path))
  state = stopped.value.state
  assert stopped.value.exit_status == 128 + signal.SIGINT
  k = int(state.step)
  assert 0 < k < 40
  assert f'SIGINT: stopped after step {k}; checkpoint saved in' in capsys.readouterr().out
  assert os.listdir(tmp_path / 'checkpoints') == [str(k)]
  _assert_states_equal(_saved_state(tmp_path, config), state)
  assert not (tmp_path / 'model').exists()
  assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
  (tmp_path / 'model.tmp-abc123' / 'variables').mkdir(parents=True)
  (tmp_path / '.tmp-xyz.json').write_text('{')
  (tmp_path / 'images').mkdir()
  (tmp_path / 'images' / '.tmp-q.png').write_bytes(b'')
  (tmp_path / 'keep.txt').write_text('a user file')
  training.train_and_evaluate(small_test_config(num_steps=2), str(tmp_path))
  assert not (tmp_path / 'model.tmp-abc123').exists()
  assert not (tmp_path / '.tmp-xyz.json').exists()
  assert not (tmp_path / 'images' / '.tmp-q.png').exists()
  assert (tmp_path / 'keep.txt').read_text() == 'a user file'
  assert model_ckpt.load_model(str(tmp_path / 'model'))[0] == cfg_lib.model_config(
      small_test_config())
