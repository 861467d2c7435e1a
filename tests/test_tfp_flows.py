"""TFP's own flows train, save and serve under Keras 3 through `FlowModel`.

Every case of `tests/tfp_flows.py` (MAF with tfp_glow's MADE and with TFP's
`AutoregressiveNetwork`, IAF, NSF-AR, `tfb.RealNVP` with a Keras 3 network and
with TFP's template, TFP's `tfb.Glow`, `tfb.FFJORD`, elementwise bijectors with
variables) goes through every check here; one registry line adds a flow.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_glow
from tfp_glow import nets

sys.path.insert(0, os.path.dirname(__file__))
import tfp_flows  # noqa: E402  (the registry lives beside the tests)
from tfp_flows import FLOWS, build_model, perturb_all, reference_log_prob  # noqa: E402

tfb = tfp.bijectors
tfd = tfp.distributions

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
# FFJORD's ODE solves take tens of seconds here: its cases run in the slow step.
SLOW_FLOWS = {"ffjord_exact_trace"}


def _marked(*args):
    name = args[0]
    return (
        pytest.param(*args, marks=pytest.mark.slow)
        if name in SLOW_FLOWS
        else (args if len(args) > 1 else name)
    )


CASES_BY_DTYPE = [_marked(name, dtype) for name, case in FLOWS.items() for dtype in case.dtypes]
NAMES = [_marked(name) for name in sorted(FLOWS)]


def _close(actual, expected, dtype):
    """|actual - expected| <= tol * max(1, |expected|), elementwise."""
    tol = TOLERANCE[dtype] * np.maximum(1.0, np.abs(expected))
    err = np.abs(np.asarray(actual, np.float64) - expected)
    assert np.all(err <= tol), f"max error {err.max():.3g} (tolerance {tol.max():.3g})"


def _underlying(variables):
    """The tf.Variables behind Keras variables (and plain ones), as refs."""
    return {(v.value if isinstance(v, keras.Variable) else v).ref() for v in variables}


def _read_by_flow(model, x):
    """Ground truth: the trainable variables one normalizing pass reads."""
    with tf.GradientTape(watch_accessed_variables=True) as tape:
        tfp_glow.bijectors.forward_and_log_det(model.flow, x, len(model.event_shape))
    return tape.watched_variables()


# -- the density -------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype", CASES_BY_DTYPE)
def test_log_prob_equals_transformed_distribution(name, dtype):
    model = build_model(name, dtype)
    x = FLOWS[name].data(16, seed=1).astype(dtype)
    model.log_prob(x)  # TFP's own ActNorm (tfb.Glow) initialises on its first batch
    perturb_all(model)
    expected = reference_log_prob(model, x)
    _close(model.log_prob(x).numpy(), expected, dtype)
    # bits/dim of continuous data: the NLL in bits per dimension
    d = int(np.prod(FLOWS[name].event_shape))
    _close(model.bits_per_dim(x).numpy(), -expected / (d * np.log(2.0)), dtype)


ELEMENTWISE = {
    # normalizing bijector, data sampler (inside its domain)
    "scale": (lambda: tfb.Scale(2.0), lambda r: r.normal(size=(9, 3))),
    "shift": (lambda: tfb.Shift(-0.7), lambda r: r.normal(size=(9, 3))),
    "exp": (lambda: tfb.Exp(), lambda r: r.normal(size=(9, 3))),
    "log": (lambda: tfb.Invert(tfb.Exp()), lambda r: r.uniform(0.1, 3.0, size=(9, 3))),
    "logit": (lambda: tfb.Invert(tfb.Sigmoid()), lambda r: r.uniform(0.05, 0.95, (9, 3))),
    "sigmoid": (lambda: tfb.Sigmoid(), lambda r: r.normal(size=(9, 3))),
    "softplus_inverse": (
        lambda: tfb.Invert(tfb.Softplus()),
        lambda r: r.uniform(0.1, 3.0, size=(9, 3)),
    ),
    "sinh_arcsinh": (
        lambda: tfb.SinhArcsinh(skewness=0.3, tailweight=1.4),
        lambda r: r.normal(size=(9, 3)),
    ),
    "arctanh": (lambda: tfb.Invert(tfb.Tanh()), lambda r: r.uniform(-0.9, 0.9, (9, 3))),
    "scale_matvec_tril": (
        lambda: tfb.ScaleMatvecTriL([[1.5, 0, 0], [0.3, 0.7, 0], [-0.2, 0.4, 2.0]]),
        lambda r: r.normal(size=(9, 3)),
    ),
    "chain": (
        lambda: tfb.Chain(
            [tfb.Scale(0.5), tfb.SinhArcsinh(0.2, 0.8), tfb.Shift(1.0), tfb.Invert(tfb.Sigmoid())]
        ),
        lambda r: r.uniform(0.05, 0.95, (9, 3)),
    ),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@pytest.mark.parametrize("event_shape", [(3,), (3, 1)])
def test_elementwise_bijector_density_over_the_whole_event(name, event_shape):
    make, sampler = ELEMENTWISE[name]
    if name == "scale_matvec_tril" and len(event_shape) == 2:
        pytest.skip("a matrix bijector acts on the last axis: event rank 1 only")
    flow = make()
    x = sampler(np.random.default_rng(3)).astype(np.float32).reshape(9, *event_shape)
    model = tfp_glow.FlowModel(flow, event_shape=event_shape, num_bins=None)
    expected = reference_log_prob(model, x)
    assert expected.shape == (9,)
    _close(model.log_prob(x).numpy(), expected, "float32")
    for mode in ("checkpoint", "reversible"):  # the other backprop modes: same density
        log_prob = model.density.log_prob_of(tf.constant(x), backprop=mode)
        _close(log_prob.numpy(), expected, "float32")
    # encode/decode: the right latent, and back
    z = model.encode(x).numpy()
    np.testing.assert_allclose(model.decode(z).numpy(), x, rtol=1e-5, atol=1e-5)


# -- every variable is a weight, and fit trains it ---------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_variable_is_a_weight_and_fit_trains_it(name):
    case = FLOWS[name]
    model = build_model(name)
    perturb_all(model, scale=0.1)
    data = case.data(256, seed=2)
    read = _read_by_flow(model, tf.constant(data[:4]))
    weights = _underlying(model.trainable_weights)
    assert read and _underlying(read) <= weights, "a variable the flow reads is not a weight"
    assert len(model.trainable_weights) == len(weights), "a variable is counted twice"
    before = [w.numpy() for w in model.trainable_weights]
    model.compile(keras.optimizers.Adam(1e-2))
    nll_before = model.evaluate(data, batch_size=64, verbose=0, return_dict=True)["loss"]
    model.fit(data, epochs=2, batch_size=64, verbose=0)
    nll_after = model.evaluate(data, batch_size=64, verbose=0, return_dict=True)["loss"]
    assert nll_after < nll_before - 0.05, (nll_before, nll_after)
    unmoved = [
        w.path for w, b in zip(model.trainable_weights, before) if np.array_equal(w.numpy(), b)
    ]
    assert not unmoved, f"fit did not move {unmoved}"
    # Trained, the flow is still the map its log-det describes (a MAF whose
    # masks were not kept by the optimizer would not be autoregressive).
    x = tf.constant(data[:8])
    with tf.GradientTape(persistent=True) as tape:  # no pfor: FFJORD's solver
        tape.watch(x)
        z, log_det = tfp_glow.bijectors.forward_and_log_det(model.flow, x, len(case.event_shape))
    jacobian = tape.batch_jacobian(z, x, experimental_use_pfor=False)
    d = int(np.prod(case.event_shape))
    _, autodiff = tf.linalg.slogdet(tf.reshape(jacobian, [-1, d, d]))
    tol = 1e-2 if name.startswith("ffjord") else 1e-4  # FFJORD: the ODE solver's error
    np.testing.assert_allclose(log_det.numpy(), autodiff.numpy(), rtol=tol, atol=tol)


# -- saving ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_save_weights_restores_into_a_freshly_built_flow(name, tmp_path):
    x = FLOWS[name].data(8, seed=4)
    model = build_model(name, seed=0)
    model.log_prob(x)
    perturb_all(model, seed=5)
    expected = model.log_prob(x).numpy()
    model.save_weights(tmp_path / "flow.weights.h5")
    fresh = build_model(name, seed=1)  # other initial values
    assert not np.allclose(fresh.log_prob(x).numpy(), expected)
    fresh.load_weights(tmp_path / "flow.weights.h5")
    np.testing.assert_array_equal(fresh.log_prob(x).numpy(), expected)


def test_keras_save_refuses_a_flow_object_before_writing(tmp_path):
    model = build_model("maf_made")  # a flow object, not a registered builder
    with pytest.raises(TypeError, match="register_keras_serializable"):
        model.save(tmp_path / "flow.keras")
    assert not (tmp_path / "flow.keras").exists()

    def closure_builder():
        return tfp_flows.maf_made()

    model = tfp_glow.FlowModel(closure_builder, event_shape=(2,), num_bins=None)
    with pytest.raises(TypeError, match="unregistered function 'closure_builder'"):
        model.save(tmp_path / "closure.keras")
    assert not (tmp_path / "closure.keras").exists()


KERAS_CHILD = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    import keras
    import tfp_flows  # registers the builders, as a user's module would
    job = json.load(open(sys.argv[1]))
    out = {}
    for name, path in job["files"].items():
        model = keras.models.load_model(path)
        x = np.load(job["inputs"][name])
        out[name] = {"log_prob": model.log_prob(x).numpy().tolist(),
                     "class": type(model).__name__, "compiled": model.optimizer is not None}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_keras_file_round_trips_in_a_fresh_process(tmp_path):
    files, inputs, expected = {}, {}, {}
    for name, case in FLOWS.items():
        model = build_model(name, from_builder=True)
        x = case.data(8, seed=6)
        model.log_prob(x)
        perturb_all(model, seed=7)
        model.compile(keras.optimizers.Adam(1e-3))
        expected[name] = model.log_prob(x).numpy()
        files[name] = str(tmp_path / f"{name}.keras")
        model.save(files[name])
        inputs[name] = str(tmp_path / f"{name}_x.npy")
        np.save(inputs[name], x)
    (tmp_path / "job.json").write_text(json.dumps({"files": files, "inputs": inputs}))
    (tmp_path / "child.py").write_text(KERAS_CHILD)
    out = _run_child(tmp_path, os.path.dirname(__file__))
    for name in FLOWS:
        assert out[name]["class"] == "FlowModel" and out[name]["compiled"]
        np.testing.assert_array_equal(np.float32(out[name]["log_prob"]), expected[name])


EXPORT_CHILD = textwrap.dedent(r"""
    import json, sys
    sys.modules["tfp_glow"] = None  # served without the library: importing it fails
    import numpy as np
    import tensorflow as tf
    job = json.load(open(sys.argv[1]))
    out = {}
    for name, path in job["exports"].items():
        served = tf.saved_model.load(path)
        x = np.load(job["inputs"][name])
        log_prob = served.signatures["log_prob"](x=tf.constant(x))["log_prob"]
        samples = served.signatures["sample"](
            num=tf.constant(5), temperature=tf.constant(0.8),
            seed=tf.constant(3, tf.int64))["samples"]
        out[name] = {"log_prob": log_prob.numpy().tolist(), "sample_shape": samples.shape.as_list(),
                     "sample_finite": bool(np.isfinite(samples.numpy()).all())}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_export_serves_log_prob_and_sample_without_tfp_glow(tmp_path):
    exports, inputs, expected, samples = {}, {}, {}, {}
    for name, case in FLOWS.items():
        model = build_model(name)
        x = case.data(6, seed=8)
        model.log_prob(x)
        perturb_all(model, seed=9)
        expected[name] = model.log_prob(x).numpy()
        samples[name] = model.sample(5, temperature=0.8, seed=3).numpy()
        exports[name] = tfp_glow.export_saved_model(model, tmp_path / name)
        inputs[name] = str(tmp_path / f"{name}_x.npy")
        np.save(inputs[name], x)
    (tmp_path / "job.json").write_text(
        json.dumps({"exports": {k: str(v) for k, v in exports.items()}, "inputs": inputs})
    )
    (tmp_path / "child.py").write_text(EXPORT_CHILD)
    out = _run_child(tmp_path)
    for name, case in FLOWS.items():
        np.testing.assert_allclose(out[name]["log_prob"], expected[name], rtol=1e-5, atol=1e-5)
        assert out[name]["sample_shape"] == [5, *case.event_shape]
        assert out[name]["sample_finite"], name
        assert np.isfinite(samples[name]).all(), name


def _run_child(tmp_path, *args):
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "job.json"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    return json.loads(results[-1][len("RESULT ") :])


# -- what cannot work says so ------------------------------------------------------------
def test_variable_hidden_in_a_closure_is_a_type_error_naming_the_bijector():
    made = nets.MADE(params=2, event_size=2, hidden_units=[8])
    maf = tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=lambda x: made(x), name="hidden_maf")
    with pytest.raises(TypeError, match=r"MaskedAutoregressiveFlow 'hidden_maf'.*closure"):
        tfp_glow.FlowModel(tfb.Invert(maf), event_shape=(2,), num_bins=None)
    # the same network handed over directly is reachable
    model = tfp_glow.FlowModel(
        tfb.Invert(tfb.MaskedAutoregressiveFlow(made)), event_shape=(2,), num_bins=None
    )
    assert _underlying(model.trainable_weights) == _underlying(made.trainable_weights)


def test_fit_on_a_flow_with_nothing_to_train_says_so():
    model = tfp_glow.FlowModel(tfb.Scale(2.0), event_shape=(2,), num_bins=None)
    model.compile()
    with pytest.raises(ValueError, match="no trainable weights"):
        model.fit(np.zeros((8, 2), np.float32), epochs=1, verbose=0)


def test_building_the_model_leaves_tfp_actnorm_to_the_data():
    """The probe that builds lazy variables restores every value it changed:
    TFP's ActNorm (inside `tfb.Glow`) initialises from the first real batch,
    exactly as in TFP alone, not from the probe's zeros."""
    x = FLOWS["tfp_glow_bijector"].data(32, seed=10)
    model = build_model("tfp_glow_bijector", seed=0)
    got = model.log_prob(x).numpy()
    keras.utils.set_random_seed(0)
    plain = tfp_flows.tfp_glow_bijector()
    base = tfd.Sample(tfd.Normal(0.0, 1.0), model.latent_shape)
    expected = tfd.TransformedDistribution(base, tfb.Invert(plain)).log_prob(x).numpy()
    _close(got, expected, "float32")


def test_network_kept_only_in_the_bijectors_parameters_is_reached():
    """With validate_args=True TFP's MAF wraps `bijector_fn` in a closure and keeps
    the user's object only in `parameters`: its MADE is still found."""
    spline = nets.AutoregressiveSplineFn.build(event_size=2, hidden_units=[8])
    maf = tfb.MaskedAutoregressiveFlow(bijector_fn=spline, validate_args=True)
    model = tfp_glow.FlowModel(tfb.Invert(maf), event_shape=(2,), num_bins=None)
    assert _underlying(model.trainable_weights) == _underlying(spline.made.trainable_weights)


class _StopAt(keras.callbacks.Callback):
    """Raises inside `fit` at a given global step, as a preempted job dies."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise RuntimeError("preempted")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maf_tfp_network", "elementwise_with_variables"])
def test_backup_and_restore_resumes_a_tfp_flow_exactly(name, tmp_path):
    """BackupAndRestore (weights *and* Adam's moments) for a tf_keras network and for
    plain tf.Variables: an interrupted, resumed fit ends where an uninterrupted one does."""
    data = FLOWS[name].data(128, seed=13)

    def run(callbacks):
        model = perturb_all(build_model(name, seed=0), seed=14)
        model.compile(keras.optimizers.Adam(1e-2))
        model.fit(data, batch_size=32, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        return [w.numpy() for w in model.trainable_weights]

    # Keras 3 restores the epoch, not the position inside it: backed up at each
    # epoch's end, the resumed run repeats the interrupted epoch from its start.
    expected = run([])
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="preempted"):
        run([keras.callbacks.BackupAndRestore(backup), _StopAt(6)])  # dies in epoch 2
    resumed = run([keras.callbacks.BackupAndRestore(backup)])
    for a, b in zip(resumed, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
