"""`EpochCheckpoint`: resume equals an uninterrupted fit, the best weights are the
best epoch's (averaged) weights, a foreign state file is refused by name.

The kill -9 form of the resume (a separate process killed mid-epoch) is in
test_kill_resume.py (CI's slow step).
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_glow
from tfp_glow import WithAveragedWeights
from tfp_glow.training import EpochCheckpoint
from tfp_glow.training.epoch_checkpoint import STATE_FILE, read_state_weights


def _data():
    rng = np.random.RandomState(0)
    x = (rng.rand(64, 4, 4, 1) - 0.5).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices(x).batch(16), x


def _model(width=4):
    keras.utils.set_random_seed(0)
    model = tfp_glow.Glow(
        (4, 4, 1),
        levels=1,
        steps_per_level=1,
        hidden_channels=width,
        num_bins=17,
        dequantization="uniform",
    )
    model.compile()  # Polyak averaging: "best" must hold the average
    return model


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.stop_training = True


class _ValueOf(keras.callbacks.Callback):
    """Records (val_loss, the averaged weights, the raw weights) at every epoch end."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        opt = self.model.optimizer
        avg = {
            id(w): a for w, a in zip(opt._trainable_variables, opt._model_variables_moving_average)
        }
        weights = [avg.get(id(v), v).numpy() for v in self.model.variables]
        raw = [v.numpy() for v in self.model.variables]
        self.seen.append((logs["val_loss"], weights, raw))


def test_stopped_then_resumed_fit_equals_the_uninterrupted_fit(tmp_path):
    ds, x = _data()
    reference = _model()
    reference.fit(ds, epochs=3, verbose=0, validation_data=ds)

    first = _model()
    values = _ValueOf()
    backup = EpochCheckpoint(
        tmp_path / "backup", best_path=tmp_path / "best.weights.h5", delete_on_end=False
    )
    # WithAveragedWeights: validation (the monitored val_loss) sees the average,
    # which is what "best" keeps, as in `tfp-glow train`.
    first.fit(
        ds,
        epochs=3,
        verbose=0,
        validation_data=ds,
        callbacks=[WithAveragedWeights(), values, backup, _StopAfter(1)],
    )
    assert os.path.exists(tmp_path / "backup" / STATE_FILE)
    # A run still training: its state file holds the last epoch's raw weights
    # (fit's end then copied their average into `first`).
    probe = _model()
    read_state_weights(str(tmp_path / "backup" / STATE_FILE), probe)
    for a, b in zip(probe.variables, values.seen[-1][2]):
        np.testing.assert_array_equal(a.numpy(), b)

    resumed = _model()
    history = resumed.fit(
        ds,
        epochs=3,
        verbose=0,
        validation_data=ds,
        callbacks=[
            WithAveragedWeights(),
            values,
            EpochCheckpoint(tmp_path / "backup", best_path=tmp_path / "best.weights.h5"),
        ],
    )
    assert history.epoch == [2]  # epochs 0 and 1 came from the state file
    worst = max(
        float(np.max(np.abs(a - b))) for a, b in zip(reference.get_weights(), resumed.get_weights())
    )
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(reference.get_weights(), _model().get_weights())
    )
    assert worst == 0.0 and moved > 1e-3
    assert not os.path.exists(tmp_path / "backup")  # finished: state and folder removed

    # best.weights.h5 holds the averaged weights of the lowest val_loss epoch.
    best_loss, best_weights, _ = min(values.seen, key=lambda s: s[0])
    loaded = _model()
    loaded.load_weights(tmp_path / "best.weights.h5")
    for v, expected in zip(loaded.variables, best_weights):
        np.testing.assert_allclose(v.numpy(), expected, rtol=0, atol=0)
    assert np.isfinite(best_loss)
    np.testing.assert_allclose(float(-tf.reduce_mean(loaded.log_prob(x))), best_loss, rtol=1e-5)


def test_a_state_file_of_another_model_is_refused_by_name(tmp_path):
    ds, _ = _data()
    _model(width=4).fit(
        ds, epochs=1, verbose=0, callbacks=[EpochCheckpoint(tmp_path, delete_on_end=False)]
    )
    with pytest.raises(ValueError, match=r"state\.npz.*different model configuration"):
        _model(width=8).fit(ds, epochs=1, verbose=0, callbacks=[EpochCheckpoint(tmp_path)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(directory=""), "`directory` must be a non-empty path"),
        (dict(directory="d", best_path="best.h5"), "`best_path` must end in '.weights.h5'"),
        (dict(directory="d", mode="lowest"), "mode"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EpochCheckpoint(**kwargs)
