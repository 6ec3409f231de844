"""What the commands share: the run flags of refine and evaluate, and the exit-status rule
(docs/faults_and_files.md): an error is one ``error:`` line and 2; SIGTERM/SIGINT: 128 + it."""

import argparse
import os
import signal
import sys
import threading
from typing import Callable

from crm_jax.checkpoint import CheckpointError
from crm_jax.constants import SCALES
from crm_jax.io import InputError
from crm_jax.outputs import os_error_line, stop_writes
from crm_jax.refine import DTYPES, PLAN_CHOICES

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
  """Raised in the main thread by SIGTERM or SIGINT while a command runs (``exit_status``)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _interrupt(signum, frame):
  del frame
  raise Interrupted(signum)


def exit_status(run: Callable[[], object]) -> int:
  """``run()``, then 0; a bad input, checkpoint or OS error is one ``error:`` line and 2.
  SIGTERM and SIGINT remove the temporary files being written and exit with 128 + the signal."""
  previous = {}
  if threading.current_thread() is threading.main_thread():
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
  try:
    run()
  except (Interrupted, KeyboardInterrupt) as e:
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    stop_writes()
    print(f"stopped by {signal.Signals(signum).name}: the outputs written so far are whole and "
          "no partial file is left; run the same command again to finish", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)  # no shutdown: threads may be inside XLA, peers never reach a barrier
  except (InputError, CheckpointError, OSError) as e:
    print(f"error: {os_error_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
    return 2
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return 0


def add_run_flags(parser: argparse.ArgumentParser, checkpoint_help: str,
                  batch_help: str) -> argparse._ArgumentGroup:
  """The model flags of refine and evaluate on ``parser``; returns the "dataset runs" group."""
  parser.add_argument("--checkpoint", default=None, help=checkpoint_help)
  parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES),
                      help="refinement scales, coarse to fine (default: %(default)s)")
  parser.add_argument("--min-side", type=int, default=None,
                      help="leave out the leading scales at which an image's shorter side is "
                           "below N pixels; their masks are the coarse mask; 0: every scale, "
                           "the published loop (default: what the checkpoint recommends, 0 "
                           "unless it names a value; the bundled one names 128; see "
                           "docs/refining.md)")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                      help="compute dtype of the network (default float32; bfloat16: for "
                           "accelerators, see docs/differences.md)")
  parser.add_argument("--plan", choices=PLAN_CHOICES, default="auto",
                      help="execution plan (default auto: banded on the CPU, fused on an "
                           "accelerator whose memory holds it)")
  parser.add_argument("--export", default=None, metavar="DIR",
                      help="run the fused plan from the programs crm-export wrote for the "
                           "checkpoint (no tracing; the export's dtype)")
  run = parser.add_argument_group("dataset runs")
  run.add_argument("--devices", type=int, default=None,
                   help="refine on the first N local devices (default: all of them)")
  run.add_argument("--batch-size", type=int, default=1, help=batch_help)
  run.add_argument("--overwrite", action="store_true",
                   help="--output holds masks of another model or settings: remove them and "
                        "refine everything again")
  run.add_argument("--no-progress", action="store_true", help="no progress bar")
  return run
