"""Test-session setup: four CPU devices for the data-parallel tests, and a private compilation
cache.

XLA_FLAGS must be set before anything imports JAX, which is why it lives here (pytest imports
conftest.py before the test modules). A value already in the environment is kept. The Refiner's
persistent compilation cache (``CRM_JAX_CACHE_DIR``) goes to a fresh temporary folder, so tests
neither read nor fill the user's cache (subprocesses inherit it).
"""

import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('CRM_JAX_CACHE_DIR', tempfile.mkdtemp(prefix='crm_jax_test_xla_'))
