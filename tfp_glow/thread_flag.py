"""`ThreadFlag`: a per-thread boolean switched on for the length of a `with` block.

Used for the switches that change how a flow computes while a block runs:
ActNorm's data-dependent initialisation (`bijectors.data_dependent_init`) and
dropout in the coupling networks (`nets.dropout_active`). Per thread, because
`tf.distribute` runs each replica's step in a thread of its own. The flag is
read when the code runs in Python, i.e. when a `tf.function` is traced.

This module imports nothing of tfp_glow, so the bijectors may use it too.
"""

import contextlib
import threading

__all__ = ["ThreadFlag"]


class ThreadFlag:
    """Off unless inside `with flag.on():` in the current thread (blocks nest)."""

    def __init__(self):
        self._local = threading.local()

    def is_on(self):
        return getattr(self._local, "on", False)

    @contextlib.contextmanager
    def on(self):
        previous = self.is_on()
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = previous
