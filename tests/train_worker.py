"""A training process for the multi-process and SIGTERM tests of test_train.py.

    python tests/train_worker.py WORKDIR OUT.npz NUM_STEPS [FIELD=VALUE ...]

Runs ``train_and_evaluate`` on the small test config (fields overridden by FIELD=VALUE, values
parsed as Python literals) and saves the final parameters, flattened, to OUT.npz. Multi-process
runs take JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID from the environment.
"""

import ast
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
  import faulthandler
  # A process still running after three minutes prints every thread's stack (a hang shows
  # where it waits; the multi-process test's output then carries it).
  faulthandler.dump_traceback_later(180, exit=False)
  import jax
  import numpy as np
  from crm_jax import training
  from tests import train_config

  workdir, out, num_steps = argv[1], argv[2], int(argv[3])
  config = train_config.small_test_config(num_steps=num_steps)
  for item in argv[4:]:
    key, value = item.split('=', 1)
    config[key] = ast.literal_eval(value)
  state = training.train_and_evaluate(config, workdir)
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  np.savez(out, step=np.asarray(state.step), **flat)


if __name__ == '__main__':
  main(sys.argv)
