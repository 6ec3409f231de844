"""Test-session setup: four CPU devices for the data-parallel tests, a private compilation cache,
and the two test tiers.

XLA_FLAGS must be set before anything imports JAX, which is why it lives here (pytest imports
conftest.py before the test modules). A value already in the environment is kept. The Refiner's
persistent compilation cache (``CRM_JAX_CACHE_DIR``) goes to a fresh temporary folder, so tests
neither read nor fill the user's cache (subprocesses inherit it).

Tiers. ``make test`` runs everything; ``make test-fast`` runs ``-m "not torch and not slow"``, the
edit loop. The marks are given here, in one place, on top of any a test module sets itself:
``torch`` to every test of a module that imports PyTorch at module level, and ``slow`` to the tests
named in ``SLOW`` (a whole module by its file name, or one test by ``file::name``), which each
take several seconds of compilation or a subprocess on two CPU cores.
"""

import os
import tempfile
import types

import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('CRM_JAX_CACHE_DIR', tempfile.mkdtemp(prefix='crm_jax_test_xla_'))

SLOW = frozenset({
    'test_bundled.py::test_bundled_checkpoint_improves_mba_on_a_bundled_image',
    'test_evaluate.py',
    'test_benchmarks.py',
    'test_plans.py::test_plans_agree',
    'test_plans.py::test_refinement_runs_without_the_training_packages',
    'test_train.py::test_workdir_of_another_config_is_refused',
    'test_training_runs.py::test_bfloat16_compute_keeps_float32_state_and_a_close_loss',
    'test_plans.py::test_plans_agree_resnet50',
    'test_plans.py::test_empty_mask_gives_zeros',
    'test_plans.py::test_refine_batch_equals_one_by_one',
    'test_plans.py::test_refine_batch_bad_pairs',
    'test_plans.py::test_bfloat16_on_fused_as_on_banded',
    'test_plans.py::test_compilations_are_bounded',
    'test_plans.py::test_plain_compiles_per_size',
    'test_multidevice.py::test_four_devices_equal_one_device',
    'test_multidevice.py::test_batches_of_one_bucket_on_two_devices_equal_one_device',
    'test_multidevice.py::test_folder_mode_refines_reports_and_resumes',
    'test_multidevice.py::test_folder_mode_exits_nonzero_only_when_nothing_is_refined',
    'test_multidevice.py::test_two_processes_equal_one_process',
    'test_multidevice.py::test_two_processes_in_folder_mode_equal_one_process',
    'test_multidevice.py::test_killed_process_then_both_restarted_complete_the_run',
    'test_multidevice.py::test_a_process_whose_peer_dies_ends_in_bounded_time',
    'test_train.py::test_cli_error_is_one_line',
    'test_train.py::test_init_checkpoint_is_loaded',
    'test_train.py::test_loss_falls_on_a_fixed_batch',
    'test_train.py::test_non_finite_loss_stops_and_names_the_step',
    'test_train.py::test_pmapped_step_equals_one_device_with_the_whole_batch',
    'test_train.py::test_resumed_run_equals_uninterrupted_run',
    'test_train.py::test_sigterm_checkpoints_the_step_and_the_run_resumes_exactly',
    'test_train.py::test_two_processes_hold_identical_parameters',
    'test_train.py::test_pass_scales_train_one_pass_of_the_loop_per_step',
    'test_train.py::test_worker_processes_give_the_same_batches',
    'test_train.py::test_run_with_worker_processes_ends_without_leaked_shared_memory',
})


def _imports_torch(module) -> bool:
  value = getattr(module, 'torch', None)
  return isinstance(value, types.ModuleType) and value.__name__ == 'torch'


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    file = os.path.basename(str(item.path))
    if file in SLOW or f'{file}::{item.originalname}' in SLOW:
      item.add_marker(pytest.mark.slow)
    if item.module is not None and _imports_torch(item.module):
      item.add_marker(pytest.mark.torch)
