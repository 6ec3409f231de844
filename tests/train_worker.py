"""A training process for the multi-process and SIGTERM tests of test_train.py.

    python tests/train_worker.py WORKDIR OUT.npz NUM_STEPS [FIELD=VALUE ...]

With ``CRM_TEST_DELAY_AFTER_EVALUATE=SECONDS`` process 1 returns from every evaluation that
much later than process 0 (a fault test). Runs ``train_and_evaluate`` on the small test config (fields overridden by FIELD=VALUE, values
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

  delay = float(os.environ.get('CRM_TEST_DELAY_AFTER_EVALUATE', 0))
  if delay and os.environ.get('JAX_PROCESS_ID') == '1':
    # The fault test: this process comes back from every validation late.
    import time
    from crm_jax.training import validation
    validate = validation.Validator.__call__

    def late(*args, **kwargs):
      out = validate(*args, **kwargs)
      time.sleep(delay)
      return out
    validation.Validator.__call__ = late

  workdir, out, num_steps = argv[1], argv[2], int(argv[3])
  config = train_config.small_test_config(num_steps=num_steps)
  for item in argv[4:]:
    key, value = item.split('=', 1)
    config[key] = ast.literal_eval(value)
  status = 0
  try:
    state = training.train_and_evaluate(config, workdir)
  except training.Preempted as e:  # as crm-train: the state is saved, the status says why
    state, status = e.state, e.exit_status
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  np.savez(out, step=np.asarray(state.step), **flat)
  return status


if __name__ == '__main__':
  sys.exit(main(sys.argv))
