"""RealNVP / Glow affine coupling layer with a bounded scale."""

import tensorflow as tf

from tfp_glow.bijectors.coupling import CouplingBase

__all__ = ["AffineCoupling"]


class AffineCoupling(CouplingBase):
    """Affine coupling: `y_a = s(x_b) * x_a + t(x_b)`, `y_b = x_b`.

    The network returns `h` with `2 * C_a` channels: the first `C_a` are the
    shift `t`, the last `C_a` the raw scale `r`, and

        s = sigmoid(r + 2)                  (openai/glow's bounded scale)
        forward:  y_a = s * x_a + t         log|det J| = sum(log s)
        inverse:  x_a = (y_a - t) / s       log|det J| = -sum(log s)

    `s` lies in (0, 1), so a step can only contract and `log s` never
    overflows: this is what keeps affine flows from producing NaNs early in
    training. With the network's last layer zero-initialised, `s =
    sigmoid(2) ~ 0.88` and `t = 0` at init.

    #### References

    [1] Laurent Dinh, Jascha Sohl-Dickstein, Samy Bengio. Density estimation
        using Real NVP. ICLR 2017. https://arxiv.org/abs/1605.08803
    [2] Kingma & Dhariwal. Glow. NeurIPS 2018 (code: openai/glow, model.py).
    """

    _outputs_per_channel = 2

    def __init__(self, shift_and_log_scale_fn, mask="channel", parity=0,
                 event_shape=None, event_ndims=3, dtype=tf.float32,
                 validate_args=False, name="affine_coupling"):
        parameters = dict(locals())
        super().__init__(shift_and_log_scale_fn, mask=mask, parity=parity,
                         event_shape=event_shape, event_ndims=event_ndims,
                         dtype=dtype, validate_args=validate_args,
                         parameters=parameters, name=name)

    @staticmethod
    def _shift_and_log_scale(h):
        shift, raw = tf.split(h, 2, axis=-1)
        return shift, tf.math.log_sigmoid(raw + 2.0)

    def _transform(self, x_a, h):
        shift, log_scale = self._shift_and_log_scale(h)
        return x_a * tf.exp(log_scale) + shift, log_scale

    def _untransform(self, y_a, h):
        shift, log_scale = self._shift_and_log_scale(h)
        return (y_a - shift) * tf.exp(-log_scale), -log_scale
