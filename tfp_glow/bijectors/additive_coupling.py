"""NICE's additive coupling layer (Dinh, Krueger & Bengio 2014)."""

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from tfp_glow.bijectors.coupling import CouplingBase

__all__ = ["AdditiveCoupling"]


class AdditiveCoupling(CouplingBase):
    """Volume-preserving coupling: `y_a = x_a + t(x_b)`, `y_b = x_b`.

        forward:  y_a = x_a + t(x_b)         log|det J| = 0
        inverse:  x_a = y_a - t(y_b)         log|det J| = 0

    `shift_fn` is a factory `fn(output_units) -> keras.layers.Layer` (the
    coupling calls it with the number of outputs it needs; `event_shape` is
    then required) or a ready Keras layer returning one output channel per
    transformed channel (`C/2` for `mask="channel"`, `C` for
    `mask="checkerboard"`; `output_units_for` computes it). See
    `tfp_glow.bijectors.coupling` for the masks and the rule. With
    `context_shape`, the shift is `t([x_b, f(c)])`, `c` the context given as
    `conditional_input` (see `AffineCoupling`).

    #### Examples

    ```python
    nice = tfp_glow.bijectors.AdditiveCoupling(
        functools.partial(tfp_glow.nets.GlowCouplingNet, 64), event_shape=(8, 8, 4))
    nice.output_units  # 2
    ```

    #### References

    [1] Laurent Dinh, David Krueger, Yoshua Bengio. NICE: Non-linear
        Independent Components Estimation. 2014. https://arxiv.org/abs/1410.8516
    """

    _outputs_per_channel = 1

    def __init__(
        self,
        shift_fn: keras.layers.Layer | Callable[[int], keras.layers.Layer],
        mask: str = "channel",
        parity: int = 0,
        event_shape: Sequence[int] | None = None,
        event_ndims: int = 3,
        dtype: tf.DType | str = tf.float32,
        validate_args: bool = False,
        name: str = "additive_coupling",
        context_shape: Sequence[int] | None = None,
    ) -> None:
        parameters = dict(locals())
        super().__init__(
            shift_fn,
            mask=mask,
            parity=parity,
            event_shape=event_shape,
            event_ndims=event_ndims,
            dtype=dtype,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
            net_arg="shift_fn",
            context_shape=context_shape,
        )

    def _transform(self, x_a, shift):
        return x_a + shift, tf.zeros_like(x_a)

    def _untransform(self, y_a, shift):
        return y_a - shift, tf.zeros_like(y_a)
