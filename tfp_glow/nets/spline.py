"""`AutoregressiveSplineFn`: a `bijector_fn` that makes TFP's MAF a neural spline flow.

Not a Keras layer: TFP's `MaskedAutoregressiveFlow(bijector_fn=...)` wants a
callable returning a bijector, and what holds the weights is the `MADE` in
its `made` attribute (where a variable walker finds it). It is a `tf.Module`
so that `tf.train.Checkpoint` follows the MAF's `_bijector_fn` into the MADE
(a plain Python object would end the walk there and save nothing).
"""

import math

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import checks
from tfp_glow.nets.made import MADE

tfb = tfp.bijectors

__all__ = ["AutoregressiveSplineFn"]


class AutoregressiveSplineFn(tf.Module):
    """Rational-quadratic spline per dimension, parametrised by a `MADE`
    (NSF-AR, Durkan et al. 2019).

    For each dimension the MADE gives `3K - 1` numbers (K = `num_bins`),
    split into `w` (K), `h` (K) and `s` (K - 1):

        widths  = m + (2B - K m) softmax(w)         m = min_bin_size
        heights = m + (2B - K m) softmax(h)
        slopes  = min_derivative + softplus(s + log(expm1(1 - min_derivative)))

    and the returned `tfb.RationalQuadraticSpline(widths, heights, slopes,
    range_min=-B)` maps `[-B, B]` onto itself (identity outside, B = `bound`).
    The softplus offset makes `s = 0` a unit slope, so with the MADE's zero
    last layer all bins are equal, all slopes 1 and the flow starts as the
    identity (the boundary slopes are TFP's fixed 1).

    Args:
      made: a `MADE` with `params = 3 * num_bins - 1`.
      num_bins: K, the number of spline bins.
      bound: B, half the width of the interval the spline acts on.
      min_bin_size: smallest bin width and height (keeps every bin's slope finite).
      min_derivative: smallest interior knot slope (keeps the spline invertible).

    #### Examples

    ```python
    fn = tfp_glow.nets.AutoregressiveSplineFn.build(
        event_size=4, hidden_units=[64, 64], num_bins=8, bound=4.)
    nsf = tfb.MaskedAutoregressiveFlow(bijector_fn=fn)
    fn.made.trainable_variables  # what an optimiser trains

    # conditional: build(..., context_size=3), then
    nsf.forward(x, conditional_input=c)
    ```

    #### References

    [1]: Durkan, Bekasov, Murray, Papamakarios. Neural Spline Flows.
         NeurIPS 2019. https://arxiv.org/abs/1906.04032
    """

    def __init__(
        self,
        made: MADE,
        num_bins: int = 8,
        bound: float = 4.0,
        min_bin_size: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        super().__init__(name="autoregressive_spline_fn")
        if not isinstance(made, MADE):
            raise TypeError(f"`made` must be a tfp_glow.nets.MADE; received {made!r}.")
        self.num_bins = checks.positive_int(num_bins, "num_bins")
        self.bound = checks.number(bound, "bound", minimum=0.0, exclusive_minimum=True)
        self.min_bin_size = checks.number(
            min_bin_size,
            "min_bin_size",
            minimum=0.0,
            maximum=2.0 * self.bound / self.num_bins,
            exclusive_maximum=True,
        )
        self.min_derivative = checks.number(
            min_derivative, "min_derivative", minimum=0.0, maximum=1.0, exclusive_maximum=True
        )
        if made.params != 3 * self.num_bins - 1:
            raise ValueError(
                f"`made` must have params = 3 * num_bins - 1 = "
                f"{3 * self.num_bins - 1} for `num_bins={self.num_bins}`; received "
                f"a MADE with params={made.params} (AutoregressiveSplineFn.build "
                "sizes it)."
            )
        self.made = made

    @classmethod
    def build(
        cls,
        event_size,
        hidden_units,
        num_bins=8,
        bound=4.0,
        min_bin_size=1e-3,
        min_derivative=1e-3,
        **made_kwargs,
    ):
        """A new `MADE(params=3 * num_bins - 1, event_size, hidden_units,
        **made_kwargs)` wrapped in an `AutoregressiveSplineFn`."""
        num_bins = checks.positive_int(num_bins, "num_bins")
        made = MADE(3 * num_bins - 1, event_size, hidden_units, **made_kwargs)
        return cls(made, num_bins, bound, min_bin_size, min_derivative)

    @property
    def trainable_variables(self):
        """The MADE's (tf.Module's own walk does not see Keras 3 variables)."""
        return self.made.trainable_variables

    def __call__(self, x, **kwargs):
        conditional_input = kwargs.pop("conditional_input", None)
        if kwargs:
            raise TypeError(
                f"AutoregressiveSplineFn got unexpected keyword arguments "
                f"{sorted(kwargs)}; only `conditional_input` is understood."
            )
        params = self.made(x, conditional_input=conditional_input)
        k, bound, low = self.num_bins, self.bound, self.min_bin_size
        w, h, s = tf.split(params, [k, k, k - 1], axis=-1)
        widths = low + (2.0 * bound - k * low) * tf.math.softmax(w, axis=-1)
        heights = low + (2.0 * bound - k * low) * tf.math.softmax(h, axis=-1)
        offset = math.log(math.expm1(1.0 - self.min_derivative))
        slopes = self.min_derivative + tf.math.softplus(s + offset)
        return tfb.RationalQuadraticSpline(widths, heights, slopes, range_min=-bound)

    def get_config(self):
        return {
            "made": keras.saving.serialize_keras_object(self.made),
            "num_bins": self.num_bins,
            "bound": self.bound,
            "min_bin_size": self.min_bin_size,
            "min_derivative": self.min_derivative,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        made = keras.saving.deserialize_keras_object(config.pop("made"))
        return cls(made, **config)
