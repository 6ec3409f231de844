"""Training: the data pipeline, the pmapped step, resuming, multi-process runs and errors.

Everything runs on 4 CPU devices (tests/conftest.py) with the TINY model on 32x32 crops; the
tests share one compiled train step (tests/train_config.py), so the file takes a few minutes.
"""

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from crm_jax import checkpoint as ckpt
from crm_jax import training
from crm_jax.training import resume
from crm_jax.training import config as cfg_lib
from crm_jax.training import devices
from crm_jax.training import step as step_lib
from crm_jax.training import workdir
from crm_jax.data import pipeline
from crm_jax.refine import Refiner
from tests.train_config import small_test_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trees_close(a, b, rtol, atol):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=k)


def test_conftest_gives_four_devices():
  assert jax.device_count() == 4
  assert jax.local_device_count() == 4


# ---------------------------------------------------------------------------------------------
# Data pipeline.


def test_batches_are_a_pure_function_of_the_step():
  config = small_test_config(num_steps=5)
  with pipeline.TrainLoader(config, start_step=2, process_index=0, process_count=1) as loader:
    got = list(loader)
  assert [step for step, _ in got] == [2, 3, 4]
  for step, batch in got:
    want = pipeline.host_batch(config, step)
    for k in ('image', 'seg', 'gt'):
      np.testing.assert_array_equal(batch[k], want[k])
  a, b = pipeline.host_batch(config, 2), pipeline.host_batch(config, 3)
  assert not np.array_equal(a['gt'], b['gt'])
  other_seed = pipeline.host_batch(small_test_config(seed=1), 2)
  assert not np.array_equal(a['image'], other_seed['image'])


def test_batch_layout_and_value_ranges():
  config = small_test_config()
  batch = pipeline.host_batch(config, 0)
  assert batch['image'].shape == (4, 32, 32, 3)
  assert batch['seg'].shape == batch['gt'].shape == (4, 32, 32, 1)
  assert all(v.dtype == np.float32 for v in batch.values())
  assert batch['seg'].min() >= -1 and batch['seg'].max() <= 1
  binary = pipeline.host_batch(small_test_config(soft_seg_fraction=0.0), 0)
  assert set(np.unique(binary['seg'])) <= {-1.0, 1.0}  # the published recipe's segs
  assert batch['gt'].min() >= 0 and batch['gt'].max() <= 1
  assert abs(float(batch['image'].mean())) < 1.5  # normalised, not 0-255


def test_each_host_builds_its_own_slice():
  config = small_test_config()
  whole = pipeline.host_batch(config, 3)
  halves = [pipeline.host_batch(config, 3, process_index=p, process_count=2) for p in (0, 1)]
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    pipeline.host_slice(4, 0, 3)


def test_worker_processes_give_the_same_batches():
  config = small_test_config(num_steps=3)
  with pipeline.TrainLoader(config, 1, process_index=0, process_count=1,
                            num_workers=2) as loader:
    got = list(loader)
  assert [s for s, _ in got] == [1, 2]
  for step, batch in got:
    np.testing.assert_array_equal(batch['seg'], pipeline.host_batch(config, step)['seg'])


def test_missing_dataset_is_a_clear_error(tmp_path):
  config = small_test_config(dataset='tfds_mixture', data_dir=str(tmp_path),
                             tfds_sets=('duts_tr', 'ecssd'))
  with pytest.raises(pipeline.DatasetError, match=r'duts_tr, ecssd not prepared') as e:
    training.train_and_evaluate(config, str(tmp_path / 'work'))
  assert str(tmp_path) in str(e.value)
  with pytest.raises(pipeline.DatasetError, match='unknown config.dataset'):
    pipeline.make_source(small_test_config(dataset='imagenet'))


# ---------------------------------------------------------------------------------------------
# The train step.


def _no_dropout(next_fun, args, kwargs, context):
  """Flax interceptor: Dropout returns its input (so that per-device and whole-batch dropout
  masks cannot differ; BatchNorm still runs in training mode)."""
  if isinstance(context.module, nn.Dropout) and context.method_name == '__call__':
    return args[0]
  return next_fun(*args, **kwargs)


def test_pmapped_step_equals_one_device_with_the_whole_batch():
  config = small_test_config(batch_norm_sync='all')  # synchronised BatchNorm: the whole batch
  trainer = step_lib.build(config)
  model, schedule = trainer.model, trainer.schedule
  # SGD with rate 1: the update is minus the gradient, compared without Adam's normalisation.
  tx = optax.sgd(1.0)
  state = step_lib.create_train_state(config, jax.random.PRNGKey(3))
  state = state.replace(opt_state=tx.init(state.params))
  batch = pipeline.host_batch(config, 0)
  step = functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule,
                           weights=cfg_lib.loss_weights(config))
  rng = jax.random.PRNGKey(0)
  with nn.intercept_methods(_no_dropout):
    four = jax.pmap(step, axis_name='batch', in_axes=(0, 0, None))
    s4, m4 = four(devices.replicate(state), devices.shard(batch, 4), rng)
    one_dev = [jax.local_devices()[0]]
    one = jax.pmap(step, axis_name='batch', in_axes=(0, 0, None), devices=one_dev)
    s1, m1 = one(devices.replicate(state, one_dev), devices.shard(batch, 1), rng)
  s4, s1 = devices.unreplicate(s4), devices.unreplicate(s1)
  m4, m1 = devices.unreplicate(m4), devices.unreplicate(m1)
  grad4 = jax.tree_util.tree_map(lambda new, old: old - new, s4.params, state.params)
  grad1 = jax.tree_util.tree_map(lambda new, old: old - new, s1.params, state.params)
  scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grad1))
  assert scale > 0
  _assert_trees_close(grad4, grad1, rtol=1e-3, atol=1e-4 * scale)
  # Synchronised BatchNorm: the running statistics are those of the whole batch (the unbiased
  # variance's n counts every device's values).
  _assert_trees_close(s4.batch_stats, s1.batch_stats, rtol=1e-4, atol=1e-5)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(s1.batch_stats),
                                                  jax.tree_util.tree_leaves(state.batch_stats))]
  assert all(moved)
  np.testing.assert_allclose(m4['total'], m1['total'], rtol=1e-5)
  for k in ('seg_intersection', 'seg_union', 'pred_intersection', 'pred_union'):
    assert m4[k] == m1[k]
  assert m4['seg_union'] > 0


def test_published_batch_norm_keeps_device_zeros_statistics_on_every_device():
  """batch_norm_sync='published': each device normalises with its own share of the batch, and
  the running statistics after the step are device 0's (nn.DataParallel keeps replica 0's
  buffers), on every device."""
  config = small_test_config()
  assert config.batch_norm_sync == 'published'
  trainer = step_lib.build(config)
  model = trainer.model
  assert model.bn_axis_name is None
  state = step_lib.create_train_state(config, jax.random.PRNGKey(4))
  batch = pipeline.host_batch(config, 0)
  step = functools.partial(step_lib.train_step, model=model, tx=trainer.tx,
                           schedule=trainer.schedule, weights=cfg_lib.loss_weights(config))
  with nn.intercept_methods(_no_dropout):
    new, _ = jax.pmap(step, axis_name='batch', in_axes=(0, 0, None))(
        devices.replicate(state), devices.shard(batch, 4), jax.random.PRNGKey(0))
    x = np.concatenate([batch['image'], batch['seg']], axis=-1)
    per_device = [model.apply(state.variables(), x[d:d + 1], True,
                              method=type(model).features, mutable=['batch_stats'])[1]
                  for d in range(4)]
  for d in range(4):
    _assert_trees_close(jax.tree_util.tree_map(lambda v: v[d], new.batch_stats),
                        per_device[0]['batch_stats'], rtol=1e-5, atol=1e-6)
  other = [not np.allclose(a, b, rtol=1e-3) for a, b in zip(
      jax.tree_util.tree_leaves(per_device[0]), jax.tree_util.tree_leaves(per_device[1]))]
  assert all(other)  # the devices' own statistics differ: device 0's were kept


def test_loss_falls_on_a_fixed_batch():
  config = small_test_config()
  p_step = step_lib.build(config).p_step
  state = devices.replicate(step_lib.create_train_state(config, jax.random.PRNGKey(0)))
  guard = devices.replicate(step_lib.Guard.clear())
  batch = devices.shard(pipeline.host_batch(config, 0), 4)
  losses = []
  for _ in range(30):
    state, guard, metrics = p_step(state, guard, batch, jax.random.PRNGKey(1))
    losses.append(float(metrics['total'][0]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
  assert int(devices.unreplicate(state).step) == 30


def test_pass_scales_train_one_pass_of_the_loop_per_step():
  """With pass_scales each step's image and seg are shrunk to the step's scale (the same on
  every host), gt stays at the crop size, and the pmapped step decodes every crop pixel from
  the smaller input: finite loss, seg IoU counted on the seg resized to the crop, and the
  example picture still drawn at the crop size."""
  from crm_jax.ops import resize_bilinear_align_corners
  from crm_jax.training import logger
  config = small_test_config(pass_scales=(0.25, 0.5, 1.0))
  sides = {}
  for step in range(12):
    batch = pipeline.host_batch(config, step)
    s = pipeline.step_pass_scale(config.seed, step, config.pass_scales)
    side = round(32 * s)
    assert batch['image'].shape == (4, side, side, 3) and batch['seg'].shape == (4, side, side, 1)
    assert batch['gt'].shape == (4, 32, 32, 1)
    halves = [pipeline.host_batch(config, step, process_index=p, process_count=2) for p in (0, 1)]
    for k in batch:
      np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), batch[k])
    sides[side] = step
  assert set(sides) == {8, 16, 32}
  p_step = step_lib.build(config).p_step
  state = devices.replicate(step_lib.create_train_state(config, jax.random.PRNGKey(0)))
  guard = devices.replicate(step_lib.Guard.clear())
  batch = pipeline.host_batch(config, sides[8])
  state, guard, metrics = p_step(state, guard, devices.shard(batch, 4), jax.random.PRNGKey(1))
  m = devices.unreplicate(metrics)
  assert np.isfinite(float(m['total'])) and int(devices.unreplicate(state).step) == 1
  seg32 = np.asarray(resize_bilinear_align_corners(batch['seg'], (32, 32)))
  gt = batch['gt'] > 0.5
  want = ((seg32 > 0.5) & gt).sum(), ((seg32 > 0.5) | gt).sum()
  assert (int(m['seg_intersection']), int(m['seg_union'])) == (int(want[0]), int(want[1]))
  variables = {'params': devices.unreplicate(state).params,
               'batch_stats': devices.unreplicate(state).batch_stats}
  picture = logger.example_picture(cfg_lib.model_config(config), variables, batch)
  assert picture.shape[1:] == (4 * 32, 3)


# ---------------------------------------------------------------------------------------------
# train_and_evaluate.


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  straight = training.train_and_evaluate(small_test_config(num_steps=6, image_every=3),
                                          str(tmp_path / 'a'))
  first = training.train_and_evaluate(small_test_config(num_steps=3), str(tmp_path / 'b'))
  assert int(first.step) == 3
  resumed = training.train_and_evaluate(small_test_config(num_steps=6), str(tmp_path / 'b'))
  assert int(straight.step) == int(resumed.step) == 6
  for part in ('params', 'batch_stats', 'opt_state'):
    a, b = _flat(getattr(straight, part)), _flat(getattr(resumed, part))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f'{part}{k}')
  assert not np.array_equal(_flat(first.params)[next(iter(_flat(first.params)))],
                            _flat(straight.params)[next(iter(_flat(first.params)))])
  # The workdir: config, the last checkpoints, TensorBoard events, example images, the model.
  work = tmp_path / 'a'
  assert json.loads((work / 'train_config.json').read_text())['num_steps'] == 6
  assert sorted(os.listdir(work / 'checkpoints')) == ['4', '6']  # keep_checkpoints 2
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(work / 'tensorboard'))
  assert sorted(os.listdir(work / 'images')) == ['step_0000003.png', 'step_0000006.png']
  refiner = Refiner.from_checkpoint(str(work / 'model'))
  assert refiner.config == cfg_lib.model_config(small_test_config())
  assert ckpt.read_config(str(work / 'model'))[1]['refine'] == {'min_side': 0}
  assert refiner.min_side == 0  # the published recipe recommends the published loop
  _, variables = ckpt.load_model(str(work / 'model'))
  _assert_trees_close(variables['params'], straight.params, rtol=0, atol=0)


def test_config_dropout_rate_reaches_the_model():
  config = small_test_config()
  config.dropout_rate = None  # the preset's rate: the published one
  assert cfg_lib.model_config(config).dropout_rate == 0.5
  config.dropout_rate = 0.0
  assert cfg_lib.model_config(config).dropout_rate == 0.0
  config.dropout_rate = 1.5
  with pytest.raises(training.TrainingError, match='dropout_rate'):
    cfg_lib.model_config(config)


def test_init_checkpoint_is_loaded(tmp_path):
  config = small_test_config()
  init = step_lib.create_train_state(config, jax.random.PRNGKey(42))
  ckpt.save_model(str(tmp_path / 'init'), init.variables(), cfg_lib.model_config(config))
  config.init = str(tmp_path / 'init')
  state = step_lib.create_train_state(config, jax.random.PRNGKey(0))
  loaded = resume.load_init(config, state)
  _assert_trees_close(loaded.params, init.params, rtol=0, atol=0)
  config.dropout_rate = 0.0  # a training-only setting, not another architecture
  loaded = resume.load_init(config, state)
  _assert_trees_close(loaded.params, init.params, rtol=0, atol=0)
  config.model = 'small'
  with pytest.raises(training.TrainingError, match='another architecture'):
    resume.load_init(config, state)


def test_non_finite_loss_stops_and_names_the_step(tmp_path, monkeypatch):
  original = pipeline.StepBatch.__call__

  def poisoned(self, step):
    batch = original(self, step)
    if step == 2:
      batch['image'][0, 0, 0, 0] = np.inf
    return batch

  monkeypatch.setattr(pipeline.StepBatch, '__call__', poisoned)
  with pytest.raises(training.TrainingError, match=r'non-finite loss at step 2\b'):
    training.train_and_evaluate(small_test_config(num_steps=5, checkpoint_every=100),
                                 str(tmp_path))
  assert os.listdir(tmp_path / 'checkpoints') == ['2']  # the last good state
  assert not (tmp_path / 'model').exists()


def test_batch_size_must_divide_the_devices(tmp_path):
  with pytest.raises(training.TrainingError, match=r'batch_size 6 .* devices \(4'):
    training.train_and_evaluate(small_test_config(batch_size=6), str(tmp_path))


def test_workdir_of_another_config_is_refused(tmp_path):
  training.train_and_evaluate(small_test_config(num_steps=2), str(tmp_path))
  # num_steps and bookkeeping fields may change ...
  workdir.check_config(str(tmp_path), small_test_config(num_steps=60, log_every=7), True)
  # ... the recipe may not.
  changed = small_test_config(learning_rate=0.5, crop_size=48)
  with pytest.raises(training.TrainingError, match='crop_size: 32 -> 48; learning_rate'):
    training.train_and_evaluate(changed, str(tmp_path))
  # A run recorded before a field was added ran with it off: it resumes; on, it does not.
  record = tmp_path / 'train_config.json'
  old = json.loads(record.read_text())
  for field in cfg_lib.ADDED_FIELDS:
    del old[field]
  record.write_text(json.dumps(old))
  workdir.check_config(str(tmp_path), small_test_config(num_steps=60), True)
  with pytest.raises(training.TrainingError, match=r'pass_scales: None -> \[0.5, 1.0\]'):
    workdir.check_config(str(tmp_path), small_test_config(pass_scales=(0.5, 1.0)), True)
  # sync_batch_norm was replaced by batch_norm_sync: a recorded run with it resumes under the
  # equivalent value (True: 'all'; False: 'published') and is refused under the other.
  for legacy, same in ((True, 'all'), (False, 'published')):
    legacy_record = {k: v for k, v in old.items() if k != 'batch_norm_sync'}
    record.write_text(json.dumps(dict(legacy_record, sync_batch_norm=legacy)))
    workdir.check_config(str(tmp_path), small_test_config(batch_norm_sync=same), True)
    other = 'published' if same == 'all' else 'all'
    with pytest.raises(training.TrainingError, match=f"batch_norm_sync: '{same}' -> '{other}'"):
      workdir.check_config(str(tmp_path), small_test_config(batch_norm_sync=other), True)
  # refine_min_side is what the exported model recommends, not part of the recipe.
  workdir.check_config(str(tmp_path), small_test_config(refine_min_side=64), True)
  with pytest.raises(training.TrainingError, match='refine_min_side'):
    cfg_lib.check_config(small_test_config(refine_min_side=-3))


def test_batch_norm_sync_is_checked_and_replaces_sync_batch_norm():
  cfg_lib.check_config(small_test_config(batch_norm_sync='all'))
  with pytest.raises(training.TrainingError, match="batch_norm_sync must be one of published, all"):
    cfg_lib.check_config(small_test_config(batch_norm_sync='device'))
  with pytest.raises(training.TrainingError, match='sync_batch_norm was replaced by '
                     'config.batch_norm_sync'):
    cfg_lib.check_config(small_test_config(sync_batch_norm=True))
  assert cfg_lib.recorded_fields({'sync_batch_norm': True})['batch_norm_sync'] == 'all'
  assert cfg_lib.recorded_fields({'sync_batch_norm': False})['batch_norm_sync'] == 'published'
  assert 'sync_batch_norm' not in cfg_lib.recorded_fields({'sync_batch_norm': False})


def test_cli_error_is_one_line(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         '--config', os.path.join(ROOT, 'configs', 'synthetic_small.py'),
         '--config.dataset=tfds_mixture', f'--config.data_dir={tmp_path}',
         '--workdir', str(tmp_path / 'work')]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode == 1
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'not prepared' in lines[0], \
      out.stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize('delay', [0, 3])
def test_two_processes_hold_identical_parameters(tmp_path, delay):
  """Two processes train, validate (sharing the objects) and export together; with ``delay``,
  process 1 comes back from the validation late, after process 0 removed its folder (a run
  once hung there: process 1 read process 0's metrics file after the barrier)."""
  port = _free_port()
  procs = []
  for pid in (0, 1):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
               CRM_TEST_DELAY_AFTER_EVALUATE=str(delay),
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(pid), JAX_PLATFORMS='cpu')
    cmd = [sys.executable, os.path.join(ROOT, 'tests', 'train_worker.py'),
           str(tmp_path / 'work'), str(tmp_path / f'p{pid}.npz'), '2', 'checkpoint_every=100',
           # Validation at the end, shared by both processes.
           'eval_every=2', "eval_data='synthetic'", 'eval_synthetic_num_examples=3',
           'eval_synthetic_size=64', 'eval_scales=(0.5, 1.0)']
    procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      # Every worker's output, thread dumps included (each prints its stacks after 3 minutes).
      for q in procs:
        q.kill()
      dumps = [f'--- process {k} ---\n' + (q.communicate()[0] or '')[-12000:]
               for k, q in enumerate(procs)]
      pytest.fail('the two processes did not finish in 400 s:\n' + '\n'.join(dumps))
  for k, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {k} of 2 failed: ' + out[-12000:]
  assert '2 process(es)' in outputs[0]
  a, b = np.load(tmp_path / 'p0.npz'), np.load(tmp_path / 'p1.npz')
  assert int(a['step']) == int(b['step']) == 2
  assert a.files == b.files
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert (tmp_path / 'work' / 'model' / 'config.json').exists()
  assert 'validation at step 2 (3 objects)' in outputs[0]
  record = json.loads((tmp_path / 'work' / 'validation.json').read_text())
  assert list(record['steps']) == ['2'] and record['steps']['2']['num_images'] == 3
  assert not [f for f in os.listdir(tmp_path / 'work') if f.startswith('.tmp-')]


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_the_run_resumes_exactly(tmp_path):
  work, total, steps = tmp_path / 'work', 2000, 8
  # The worker: no periodic checkpoints (the only one is SIGTERM's), a line after every step.
  cmd = [sys.executable, os.path.join(ROOT, 'tests', 'train_worker.py'), str(work),
         str(tmp_path / 'out.npz'), str(total), 'log_every=1', 'checkpoint_every=100000']
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  lines, signalled = [], threading.Event()
  with open(tmp_path / 'stderr.txt', 'w') as err:
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                            text=True)

  def read():  # SIGTERM on the first step line: the handler is installed, training under way.
    for line in proc.stdout:
      lines.append(line)
      if not signalled.is_set() and re.match(rf'step \d+/{total}:', line):
        proc.send_signal(signal.SIGTERM)
        signalled.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    # Meanwhile (sharing no files with the worker) an uninterrupted run of `steps` steps.
    config = small_test_config(num_steps=steps)
    straight = training.train_and_evaluate(config, str(tmp_path / 'straight'))
    proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  reader.join(timeout=30)
  out = ''.join(lines)
  log = out[-3000:] + (tmp_path / 'stderr.txt').read_text()[-3000:]
  assert signalled.is_set(), log
  assert proc.returncode == 128 + signal.SIGTERM, log  # a pre-empted job did not finish
  stops = re.findall(r'^SIGTERM: stopped after step (\d+); checkpoint saved in (\S+);', out,
                     re.M)
  assert len(stops) == 1, log
  k = int(stops[0][0])
  assert 0 < k < total, log
  assert stops[0][1] == str(work / 'checkpoints')
  # It stopped at a step boundary: steps 1..k were logged, nothing after; no export.
  assert [int(n) for n in re.findall(rf'^step (\d+)/{total}:', out, re.M)] == \
      list(range(1, k + 1))
  assert 'done:' not in out
  assert not (work / 'model').exists()
  assert os.listdir(work / 'checkpoints') == [str(k)]
  # The checkpoint holds the state that the worker returned at step k.
  manager = resume.checkpoint_manager(str(work), 2)
  try:
    saved, notes = resume.restore_checkpoint(
        manager, step_lib.create_train_state(config, jax.random.PRNGKey(0)))
    assert notes == []
  finally:
    manager.close()
  returned = np.load(tmp_path / 'out.npz')
  assert int(saved.step) == int(returned['step']) == k
  flat = _flat(saved.params)
  assert sorted(flat) == sorted(f for f in returned.files if f != 'step')
  for key, v in flat.items():
    np.testing.assert_array_equal(v, returned[key], err_msg=key)
  if k + 2 > steps:  # a late signal: a longer uninterrupted run (compiled by now, so quick).
    steps = k + 2
    config = small_test_config(num_steps=steps)
    straight = training.train_and_evaluate(config, str(tmp_path / 'straight_long'))
  # Resuming (num_steps and the bookkeeping fields may change) equals the uninterrupted run.
  resumed = training.train_and_evaluate(config, str(work))
  assert int(resumed.step) == int(straight.step) == steps
  for part in ('params', 'batch_stats', 'opt_state'):
    a, b = _flat(getattr(straight, part)), _flat(getattr(resumed, part))
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'{part}{key}')


def test_run_with_worker_processes_ends_without_leaked_shared_memory(tmp_path):
  """crm-train with grain worker processes: no resource_tracker warning of leaked
  shared_memory objects at exit (crm_jax/data/pipeline.py)."""
  fields = dict(model='tiny', crop_size=32, batch_size=4, num_steps=3, synthetic_size=48,
                synthetic_num_examples=16, num_workers=2, log_every=1, checkpoint_every=3,
                image_every=0, eval_every=0, lr_milestones='(2,)')
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         '--config', os.path.join(ROOT, 'configs', 'synthetic_small.py'),
         '--workdir', str(tmp_path / 'work')] + [f'--config.{k}={v}' for k, v in fields.items()]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'done: 3 steps' in out.stdout, out.stdout[-3000:]
  assert 'resource_tracker' not in out.stderr and 'leaked' not in out.stderr, out.stderr[-3000:]
