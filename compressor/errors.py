"""Exception types that the CLI maps to exit codes.

* :class:`CompressError` -- bad input (a missing file, an unknown model name, a
  recipe with an unknown key ...). The CLI prints its message on one line and
  exits with code 2. Messages name the problem *and* the fix.
* :class:`CheckFailed` -- the input was fine but a check the user asked for did
  not pass (ONNX parity, a latency budget, an accuracy floor). Exit code 1.
* :class:`Terminated` -- SIGTERM (a scheduler's preemption or time limit, ``kill``,
  ``timeout``) stopped a training whose state was saved first, as Ctrl-C does.
  A ``KeyboardInterrupt``, so everything that cleans up after Ctrl-C cleans up
  after it; the CLI exits with code 143 (128 + 15) instead of 130.
"""


class CompressError(Exception):
    """Bad input: exit code 2, one line, no traceback."""


class CheckFailed(Exception):
    """A requested check failed: exit code 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped a training after its state was saved: exit code 143 (128 + 15, what a
    shell reports for a process that SIGTERM ended)."""
