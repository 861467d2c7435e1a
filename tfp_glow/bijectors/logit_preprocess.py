"""Logit pre-processing of data in [0, 1] (RealNVP, MAF)."""

import numpy as np
import tensorflow as tf

from tfp_glow.bijectors.base import FlowBijector

__all__ = ["LogitPreprocess"]


class LogitPreprocess(FlowBijector):
    """Elementwise `y = logit(alpha + (1 - 2 alpha) x)` for `x` in [0, 1].

        p = alpha + (1 - 2 alpha) x
        forward:    y = log p - log(1 - p)
        log|det J| = log(1 - 2 alpha) - log p - log(1 - p)
        inverse:    x = (sigmoid(y) - alpha) / (1 - 2 alpha)

    `alpha` keeps `p` in `[alpha, 1 - alpha]` so the logit stays finite.
    The map is increasing (TFP's `cdf` / `quantile` of a transformed scalar
    distribution work through it); with `validate_args=True` a forward input
    outside [0, 1] raises `tf.errors.InvalidArgumentError`.
    RealNVP [1] writes the map as `logit(alpha + (1 - alpha) x)` with
    alpha = 0.05; this symmetric form (the same margin at both ends) is the
    one MAF [2] uses, with alpha = 1e-6 on MNIST.

    #### References

    [1] Dinh, Sohl-Dickstein & Bengio. Density estimation using Real NVP.
        ICLR 2017, section 4.1. https://arxiv.org/abs/1605.08803
    [2] Papamakarios, Pavlakou & Murray. Masked Autoregressive Flow for
        Density Estimation. NeurIPS 2017. https://arxiv.org/abs/1705.07057
    """

    def __init__(
        self, alpha: float = 0.05, validate_args: bool = False, name: str = "logit_preprocess"
    ) -> None:
        parameters = dict(locals())
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)):
            raise TypeError(f"`alpha` must be a float in [0, 0.5); got {alpha!r}.")
        if not 0.0 <= float(alpha) < 0.5:
            raise ValueError(f"`alpha` must be in [0, 0.5); got {alpha!r}.")
        self._alpha = float(alpha)
        super().__init__(
            forward_min_event_ndims=0, validate_args=validate_args, parameters=parameters, name=name
        )

    # Elementwise: any rank works, even one unknown while tracing.
    _needs_static_event = False

    @property
    def alpha(self):
        return self._alpha

    @classmethod
    def _is_increasing(cls, **kwargs):
        # dy/dx = (1 - 2 alpha) / (p (1 - p)) > 0: TFP's scalar contract, used by
        # TransformedDistribution's cdf, quantile and survival function.
        return True

    def _input_assertions(self, t, inverse, **kwargs):
        checks = super()._input_assertions(t, inverse, **kwargs)
        if not inverse:  # the logit is defined for x in [0, 1] only
            checks += [
                tf.debugging.assert_greater_equal(
                    t,
                    tf.zeros([], t.dtype),
                    message=f"{self.name}: `x` must lie in [0, 1] (validate_args=True).",
                ),
                tf.debugging.assert_less_equal(
                    t,
                    tf.ones([], t.dtype),
                    message=f"{self.name}: `x` must lie in [0, 1] (validate_args=True).",
                ),
            ]
        return checks

    def _forward_and_log_det(self, x, **kwargs):
        p = self._alpha + (1.0 - 2.0 * self._alpha) * x
        log_p, log_1mp = tf.math.log(p), tf.math.log1p(-p)
        ldj = tf.math.log1p(-2.0 * tf.constant(self._alpha, x.dtype)) - log_p - log_1mp
        return log_p - log_1mp, ldj

    def _inverse_and_log_det(self, y, **kwargs):
        x = (tf.sigmoid(y) - self._alpha) / (1.0 - 2.0 * self._alpha)
        # log p + log(1 - p) = log_sigmoid(y) + log_sigmoid(-y), stable for |y| large.
        ildj = (
            tf.math.log_sigmoid(y)
            + tf.math.log_sigmoid(-y)
            - tf.math.log1p(-2.0 * tf.constant(self._alpha, y.dtype))
        )
        return x, ildj
