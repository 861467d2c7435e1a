"""A run directory of `tfp-glow train` / `tfp_glow.recipe.train`: its layout and loading.

`run_paths(run_dir)` names every file; `read_config` and `load_run` read a run
back, and say on one line which file is damaged or missing and how
(`RunDamagedError`, `RunNotFoundError`), never changing the directory.
"""

import json
import os

__all__ = ["RunDamagedError", "RunNotFoundError", "load_run", "read_config", "run_paths"]

_LAYOUT = dict(
    config="config.json",
    model="model.keras",
    checkpoints="checkpoints",
    last=os.path.join("checkpoints", "last.weights.h5"),
    best=os.path.join("checkpoints", "best.weights.h5"),
    backup="backup",
    backup_weights=os.path.join("backup", "state.npz"),  # EpochCheckpoint's STATE_FILE
    history_csv="history.csv",
    history_json="history.json",
    samples_dir="samples",
    samples="samples.png",
    sweep="temperature_sweep.png",
    metrics="metrics.json",
    export="export",
)


class RunNotFoundError(FileNotFoundError):
    """`run_dir` is not a run directory (`problem` says what is missing)."""

    def __init__(self, run_dir, problem):
        self.run_dir, self.problem = run_dir, problem
        super().__init__(f"`run_dir` {run_dir!r} {problem}")


class RunDamagedError(ValueError):
    """A file of a run directory cannot be used: truncated, zeroed, not JSON,
    or describing a model this library cannot build (`path` is the file,
    `problem` says what is wrong, on one line)."""

    def __init__(self, path, problem):
        self.path, self.problem = path, problem
        super().__init__(f"{path} {problem}")


def _one_line(error):
    """`error` as `Type: message` on one line (Keras and h5py messages span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def run_paths(run_dir):
    """Path of every file and folder of a run directory (module docstring)."""
    return {key: os.path.join(run_dir, rel) for key, rel in _LAYOUT.items()}


def _model_classes():
    from tfp_glow import FFJORD, IAF, MAF, NICE, Glow, NeuralSplineFlow, RealNVP, ResidualFlow

    return {
        cls.__name__: cls
        for cls in (Glow, RealNVP, NICE, MAF, IAF, NeuralSplineFlow, FFJORD, ResidualFlow)
    }


# Variable dtypes of a tfp_glow model: FlowModel's `dtype` is float32, float64 or
# a mixed policy (float32 variables); float16 variables have no kernels for the
# flow's triangular solves and would fail only when the model is used.
_VARIABLE_DTYPES = ("float32", "float64")


def read_config(run_dir):
    """The config.json of a run directory, as a dict.

    Raises `RunNotFoundError` if `run_dir` or its config.json is missing and
    `RunDamagedError` if config.json is not a JSON object naming one of
    the model classes (Glow, RealNVP, NICE, MAF, IAF, NeuralSplineFlow,
    FFJORD, ResidualFlow) with its `model_config`.
    """
    if run_dir is None or not os.path.isdir(run_dir):
        raise RunNotFoundError(run_dir, "is not a directory.")
    path = run_paths(run_dir)["config"]
    if not os.path.exists(path):
        raise RunNotFoundError(
            run_dir,
            "has no config.json: it is not a run directory written by "
            "`tfp_glow.recipe.train` (`tfp-glow train`).",
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RunDamagedError(path, f"is not valid JSON ({_one_line(e)}).") from None
    if not isinstance(config, dict):
        raise RunDamagedError(
            path,
            f"holds a JSON {type(config).__name__}; expected an "
            f"object with model_class and model_config.",
        )
    names = sorted(_model_classes())
    if config.get("model_class") not in names:
        raise RunDamagedError(
            path,
            f"names model_class {config.get('model_class')!r}; "
            f"expected one of {names} (a run written by "
            f"`tfp_glow.recipe.train`).",
        )
    if not isinstance(config.get("model_config"), dict):
        raise RunDamagedError(path, "has no model_config object (the model's get_config()).")
    return config


def _load_keras_file(path):
    import zipfile

    import keras

    if not zipfile.is_zipfile(path):
        raise RunDamagedError(
            path,
            f"is not a .keras zip archive ({os.path.getsize(path):,} "
            f"bytes): truncated, zeroed or not a saved model.",
        )
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # whatever the damage, the command names the file
        raise RunDamagedError(
            path, f"cannot be loaded as a tfp_glow model ({_one_line(e)})."
        ) from None


def _build_from_config(config, config_path):
    cls = _model_classes()[config["model_class"]]
    try:
        return cls.from_config(config["model_config"])
    except Exception as e:
        raise RunDamagedError(
            config_path,
            f"has a model_config that does not build a {cls.__name__} ({_one_line(e)}).",
        ) from None


def _load_weights(model, path):
    try:
        if path.endswith(".npz"):  # a run still training: its EpochCheckpoint state
            from tfp_glow.training.epoch_checkpoint import read_state_weights

            read_state_weights(path, model)
        else:
            model.load_weights(path)
    except Exception as e:
        raise RunDamagedError(
            path,
            f"cannot be loaded as the weights of this "
            f"{type(model).__name__}: truncated, zeroed or from "
            f"another model ({_one_line(e)}).",
        ) from None


def load_run(run_dir):
    """`(model, config)` of a run: `model.keras`, else config + the last weights,
    else (a run still training, or interrupted) the backup's latest epoch.

    Reads only: a damaged or foreign file raises `RunDamagedError` naming it,
    a missing one `RunNotFoundError`.
    """
    paths = run_paths(run_dir)
    config = read_config(run_dir)
    if os.path.exists(paths["model"]):
        source = paths["model"]
        model = _load_keras_file(source)
        if type(model).__name__ != config["model_class"]:
            raise RunDamagedError(
                paths["config"],
                f"names model_class "
                f"{config['model_class']!r} but {source} "
                f"holds a {type(model).__name__}.",
            )
    else:
        weights = next(
            (paths[k] for k in ("last", "backup_weights") if os.path.exists(paths[k])), None
        )
        if weights is None:
            raise RunNotFoundError(
                run_dir,
                "has neither model.keras nor checkpoints/last.weights.h5 nor a "
                "backup: train it first (`tfp-glow train --output RUN_DIR`).",
            )
        source = paths["config"]
        model = _build_from_config(config, source)
        _load_weights(model, weights)
    policy = model.dtype_policy
    if policy.variable_dtype not in _VARIABLE_DTYPES:
        raise RunDamagedError(
            source,
            f"gives the model dtype {policy.name!r}; tfp_glow "
            f"models run in 'float32', 'float64' or a mixed "
            f"policy such as 'mixed_bfloat16'.",
        )
    return model, config
