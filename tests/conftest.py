"""Test-session setup: four CPU devices for the data-parallel tests.

XLA_FLAGS must be set before anything imports JAX, which is why it lives here (pytest imports
conftest.py before the test modules). A value already in the environment is kept.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
