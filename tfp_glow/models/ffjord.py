"""FFJORD (Grathwohl et al. 2019) as a `FlowModel`: a continuous flow, TFP's
`tfb.FFJORD` with a Keras 3 `ODENet`, on (flattened) vectors."""

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow_probability as tfp

from tfp_glow import checks, nets
from tfp_glow.models import _vectors
from tfp_glow.models._common import _context_options, _flow_context, _net_dtype, _positive_int
from tfp_glow.training.flow_model import FlowModel

tfb = tfp.bijectors

__all__ = ["FFJORD", "build_ffjord_flow", "exact_trace_for"]

TRACES = ("auto", "exact", "hutchinson")
SOLVERS = ("dormand_prince", "bdf")
# trace="auto" takes the exact trace up to this many features: it costs D
# vector-Jacobian products per function evaluation against Hutchinson's one,
# so beyond a few tens of features the estimator is the only affordable
# choice (the paper's), and below it the noise-free log-det is nearly free.
EXACT_TRACE_MAX_FEATURES = 16
# About 150k parameters on the digits protocol (64 features): 147,488.
DEFAULT_HIDDEN_UNITS = (240, 240, 240)


def exact_trace_for(trace, num_features):
    """True when `trace` ("auto", "exact", "hutchinson") means the exact trace
    for `num_features` features."""
    trace = checks.choice(trace, TRACES, "trace")
    return trace == "exact" or (trace == "auto" and num_features <= EXACT_TRACE_MAX_FEATURES)


@keras.saving.register_keras_serializable(package="tfp_glow")
class FFJORD(FlowModel):
    """FFJORD (Grathwohl et al. 2019): a continuous normalizing flow.

    The data `x` flows to the latent along `dz/dt = f(z, t)` (`f` an `ODENet`
    of `hidden_units`, tanh, time fed to every layer); the change of density
    is the integral of the field's divergence:

        z = x + int_0^1 f(z(t), t) dt,   log|det dz/dx| = int_0^1 tr(df/dz) dt

    solved by TFP's adaptive ODE solver (`solver`: "dormand_prince", the
    paper's dopri5, or "bdf" for stiff fields) to the tolerances `rtol`,
    `atol`, with gradients by the adjoint sensitivity method (TFP's solver
    differentiates by a second, backward ODE solve; the field's variables are
    found on the tape). `trace`: "exact" (D vector-Jacobian products per function
    evaluation), "hutchinson" (`tr(A) ~ r^T A r`, `trace_samples` Gaussian
    probes, one product each: unbiased but noisy, so `log_prob` and the test
    bits/dim vary from call to call; the paper's choice for images), or
    "auto": exact up to `EXACT_TRACE_MAX_FEATURES` = 16 features, Hutchinson
    above (the digits' 64 features get Hutchinson).

    Cost: every density evaluation and every sample is an ODE solve of tens
    to hundreds of field evaluations (as many as the tolerances demand, and
    growing as the field learns structure), each one backward pass per
    probe or per feature for the trace: by far the slowest family per step.

    Images (`input_shape=(H, W, C)`) are flattened to `H W C` features. The
    default field (hidden [240, 240, 240]) holds 147,488 parameters on 64
    features.

    Args:
      input_shape: `(D,)` or `(H, W, C)`.
      hidden_units: the ODENet's hidden layer sizes.
      trace: "auto", "exact" or "hutchinson".
      trace_samples: Hutchinson probes per solve.
      rtol, atol: the solver's relative and absolute tolerances (TFP's
        defaults; the paper trains at 1e-5 both).
      solver: "dormand_prince" or "bdf".
      activation: the field's hidden activation (smooth: the solver and the
        trace differentiate it).
      num_classes, num_bins: see `MAF`.
      context_shape: a conditional model `p(x | c)` for contexts of this
        shape (any: it is flattened): the field reads the context in its first
        layer, `dz/dt = f(z, t, c)`, so each context has its own flow; the
        learned prior gets a zero-initialised offset from it. The density
        methods and `fit` take the context second. Not with `num_classes`.
      **kwargs: `FlowModel`'s.

    #### Examples

    ```python
    model = tfp_glow.FFJORD(input_shape=(2,), hidden_units=[64, 64], num_bins=None)
    model.compile()
    model.fit(points, epochs=5, batch_size=256)   # exact trace: 2 features
    ```

    #### References

    [1]: Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. FFJORD: Free-form
         Continuous Dynamics for Scalable Reversible Generative Models.
         ICLR 2019. https://arxiv.org/abs/1810.01367
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (8, 8, 1),
        hidden_units: Sequence[int] = DEFAULT_HIDDEN_UNITS,
        trace: str = "auto",
        trace_samples: int = 1,
        rtol: float = 1e-3,
        atol: float = 1e-6,
        solver: str = "dormand_prince",
        activation: str = "tanh",
        num_classes: int | None = None,
        num_bins: int | None = 256,
        context_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        input_shape = _vectors.input_shape_of(input_shape)
        context_shape, num_classes = _context_options(context_shape, num_classes)
        self._config = dict(
            input_shape=input_shape,
            hidden_units=_vectors.hidden_units_of(hidden_units),
            trace=checks.choice(trace, TRACES, "trace"),
            trace_samples=_positive_int(trace_samples, "trace_samples"),
            rtol=checks.number(rtol, "rtol", minimum=0.0, exclusive_minimum=True),
            atol=checks.number(atol, "atol", minimum=0.0, exclusive_minimum=True),
            solver=checks.choice(solver, SOLVERS, "solver"),
            activation=activation,
            num_classes=num_classes,
            num_bins=num_bins,
            context_shape=context_shape,
        )
        options = {k: v for k, v in self._config.items() if k != "num_bins"}
        options["context_shape"] = _flow_context(context_shape, num_classes, kwargs)
        super().__init__(
            flow=lambda: build_ffjord_flow(
                **options,
                dtype=self.dtype_policy.variable_dtype,
                net_dtype=_net_dtype(self.dtype_policy),
            ),
            event_shape=input_shape,
            num_bins=num_bins,
            num_classes=num_classes,
            context_shape=context_shape,
            **kwargs,
        )

    @property
    def exact_trace(self):
        """Whether this model's log-det uses the exact trace (else Hutchinson's)."""
        return exact_trace_for(
            self._config["trace"], _vectors.num_features(self._config["input_shape"])
        )

    def get_config(self):
        return {**self._base_config(), **self._config}


def build_ffjord_flow(
    input_shape,
    hidden_units=DEFAULT_HIDDEN_UNITS,
    trace="auto",
    trace_samples=1,
    rtol=1e-3,
    atol=1e-6,
    solver="dormand_prince",
    activation="tanh",
    num_classes=None,
    dtype="float32",
    net_dtype=None,
    context_shape=None,
):
    """The normalizing bijector of `FFJORD` (see its docstring). With
    `context_shape` the field also reads the flattened context; the walker
    binds it into the field per call (`_tfp_parts.bind_ffjord_context`)."""
    dim = _vectors.num_features(input_shape)
    field = nets.ODENet(
        event_size=dim,
        hidden_units=list(hidden_units),
        activation=activation,
        dtype=net_dtype or dtype,
        name="ode_net",
        context_shape=context_shape,
    )
    solvers = {"dormand_prince": tfp.math.ode.DormandPrince, "bdf": tfp.math.ode.BDF}
    ffjord = tfb.FFJORD(
        state_time_derivative_fn=field,
        ode_solve_fn=solvers[solver](rtol=rtol, atol=atol).solve,
        trace_augmentation_fn=nets.ffjord_trace(
            exact=exact_trace_for(trace, dim), num_samples=trace_samples
        ),
        dtype=dtype,
        name="ffjord",
    )
    # TFP's FFJORD runs latent -> data (t from 0 to 1): its inverse normalizes.
    return _vectors.vector_flow(
        input_shape,
        [tfb.Invert(ffjord)],
        num_classes,
        dtype,
        name="ffjord",
        context_shape=context_shape,
    )
