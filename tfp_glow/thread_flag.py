"""`ThreadFlag`: a per-thread value set for the length of a `with` block.

Used for the switches that change how a flow computes while a block runs:
ActNorm's data-dependent initialisation (`bijectors.data_dependent_init`) and
dropout in the coupling networks (`nets.dropout_active`, whose value is the
training step's dropout seed). Per thread, because `tf.distribute` runs each
replica's step in a thread of its own. The flag is read when the code runs in
Python, i.e. when a `tf.function` is traced.

This module imports nothing of tfp_glow, so the bijectors may use it too.
"""

import contextlib
import threading

__all__ = ["ThreadFlag"]


class ThreadFlag:
    """Off (value None) unless inside `with flag.on(value):` in the current
    thread; blocks nest, the innermost value wins."""

    def __init__(self):
        self._local = threading.local()

    @property
    def value(self):
        return getattr(self._local, "value", None)

    def is_on(self):
        return self.value is not None

    @contextlib.contextmanager
    def on(self, value=True):
        if value is None:
            raise ValueError("ThreadFlag.on(value): value must not be None (None is 'off').")
        previous = self.value
        self._local.value = value
        try:
            yield
        finally:
            self._local.value = previous
