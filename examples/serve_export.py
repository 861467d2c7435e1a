"""Export a trained flow as a TF Serving SavedModel and query it.

    python examples/serve_export.py --run runs/digits-glow     # a `tfp-glow train` run
    python examples/serve_export.py --output out/serve          # trains a small Glow first
    python examples/serve_export.py --smoke

Writes `<output>/export/<version>/` with `tfp_glow.export_saved_model`, loads it
back with plain `tf.saved_model.load` (no tfp_glow needed on the serving side),
calls its `sample`, `log_prob` and `bits_per_dim` signatures, writes
`served_samples.png`, and prints the JSON bodies one would POST to TF Serving's
REST API after

    docker run -p 8501:8501 -v "$PWD/<output>/export:/models/glow" \\
        -e MODEL_NAME=glow tensorflow/serving
"""

import argparse
import json
import os

import keras
import numpy as np
import tensorflow as tf

import tfp_glow
from tfp_glow import data
from tfp_glow.export import export_saved_model
from tfp_glow.training import WarmupSchedule

URL = "http://localhost:8501/v1/models/glow:predict"


def train_small_glow(smoke, seed):
    keras.utils.set_random_seed(seed)
    model = tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=2 if smoke else 4,
        hidden_channels=16 if smoke else 32,
        num_bins=data.DIGITS_NUM_BINS,
    )
    train = data.digits_dataset("train", batch_size=64, seed=seed)
    if smoke:
        # Seconds-long: ActNorm's data-dependent init only (an export needs it).
        return model.initialize(next(iter(train)))
    model.compile(keras.optimizers.Adam(WarmupSchedule(1e-3, warmup_steps=50)))
    model.fit(train, epochs=15, verbose=2)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a `tfp-glow train` run directory")
    parser.add_argument("--output", default="out/serve_export")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds-long run")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    if args.run:
        from tfp_glow import recipe

        model, _ = recipe.load_run(args.run)  # model.keras, else the last checkpoint
    else:
        model = train_small_glow(args.smoke, args.seed)
    if model.num_classes is not None or model.num_bins is None or len(model.event_shape) != 3:
        parser.error("this example serves unconditional image models")
    version_dir = export_saved_model(model, os.path.join(args.output, "export"))
    print(f"exported {version_dir}")

    # --- the serving side: only TensorFlow ---------------------------------
    served = tf.saved_model.load(version_dir)
    print("signatures:", sorted(served.signatures.keys()))

    samples = served.signatures["sample"](
        num=tf.constant(16), temperature=tf.constant(0.7), seed=tf.constant(args.seed, tf.int64)
    )["samples"]
    png = os.path.join(args.output, "served_samples.png")
    tfp_glow.save_image_grid(
        samples,
        png,
        num_bins=model.num_bins,
        rows=4,
        upscale=4,
        title="served 'sample' signature, T = 0.7",
    )
    print(f"wrote {png}")

    x = next(iter(data.digits_dataset("test", 4, dequantize=False, shuffle=False)))
    served_lp = served.signatures["log_prob"](x=x)["log_prob"].numpy()
    keras_lp = model.log_prob(x).numpy()
    print("log_prob (served):", np.round(served_lp, 3))
    print("log_prob (Keras): ", np.round(keras_lp, 3))
    print("max |difference|:", float(np.max(np.abs(served_lp - keras_lp))))
    bpd = served.signatures["bits_per_dim"](x=x)["bits_per_dim"].numpy()
    print("bits/dim (served):", np.round(bpd, 3))

    # --- what a client would POST to TF Serving's REST API ----------------
    bodies = {
        "sample": {"signature_name": "sample", "inputs": {"num": 4, "temperature": 0.7, "seed": 1}},
        "log_prob": {
            "signature_name": "log_prob",
            "inputs": {"x": np.round(x[:1].numpy().astype(np.float64), 3).tolist()},
        },
        "bits_per_dim": {
            "signature_name": "bits_per_dim",
            "inputs": {"x": np.round(x[:1].numpy().astype(np.float64), 3).tolist()},
        },
    }
    for name, body in bodies.items():
        text = json.dumps(body)
        print(f"\n# {name}\ncurl -s -X POST {URL} -d '{text}'")
    with open(os.path.join(args.output, "requests.json"), "w") as f:
        json.dump(bodies, f, indent=1)
    print(
        f"\n# or, with no server: saved_model_cli run --dir {version_dir} --tag_set serve "
        "--signature_def sample --input_exprs 'num=4;temperature=0.7;seed=1'"
    )


if __name__ == "__main__":
    main()
