"""Neural posterior estimation on the Gaussian-linear problem: tfp_glow's
conditional flows beside BayesFlow 2 and sbi, at each library's defaults.

The problem is `tfp_glow.npe.GaussianLinear()` (theta ~ N(0, I_5),
x = A theta + 0.5 eps, A from seed 0): its posterior is Gaussian in closed
form. Every row gets the identical data and budget:

* 20,000 training pairs `problem.simulate(20000, seed=1)`; 25 epochs of batch
  256; everything else at the library's defaults;
* 10 held-out observations `x_o` (`problem.simulate(10, seed=2)`, prior
  predictive draws);
* the same estimator of `KL(p(theta | x_o) || q(theta | x_o))`: the mean of
  `log p - log q` over the same 10,000 exact posterior draws per observation
  (`GaussianLinear.kl_to_posterior`'s draws, seed 3), averaged over the 10
  observations; its standard error is the Monte Carlo one, `sqrt(sum se_i^2)/10`.

The rows, each run in a fresh process (the peers import no TensorFlow of ours):

* `tfp_glow_maf`: `NeuralPosteriorEstimator.build(5, 5, "maf")`, the default
  conditional MAF, compiled with the default optimizer;
* `tfp_glow_realnvp`: the same with `family="realnvp"` (vector RealNVP);
* `bayesflow_coupling_flow`: BayesFlow 2's `BasicWorkflow` with its default
  `CouplingFlow()` (Keras 3, TensorFlow backend), `fit_offline`;
* `sbi_npe_maf`: sbi's `NPE(prior)` (its default density estimator, MAF on
  nflows), `train(training_batch_size=256, max_num_epochs=25)`; sbi holds
  out its default 10% for early stopping, so it trains on 18,000 pairs.

Each row writes `benchmarks/results/npe/<row>_seed<s>.json` (figures, versions,
machine, load at start and end, times). The peers are the `npe-peers` extra:

    pip install -e ".[benchmarks,npe-peers]"
    python benchmarks/npe_peers.py                       # every row, seeds 0 1 2
    python benchmarks/npe_peers.py --rows sbi_npe_maf --seeds 0
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "npe")
ROWS = ("tfp_glow_maf", "tfp_glow_realnvp", "bayesflow_coupling_flow", "sbi_npe_maf")
NUM_TRAIN, NUM_OBS, NUM_POSTERIOR = 20_000, 10, 10_000
EPOCHS, BATCH = 25, 256
THREADS = 2


def monte_carlo_kl(log_p, log_q):
    """NumPy copy of `tfp_glow.npe.monte_carlo_kl` (kept here so the torch rows
    import no TensorFlow): per row of `[B, n]`, `mean(log p - log q)` and its
    standard error `std / sqrt(n)`."""
    diff = np.asarray(log_p, np.float64) - np.asarray(log_q, np.float64)
    return diff.mean(axis=-1), diff.std(axis=-1, ddof=1) / np.sqrt(diff.shape[-1])


def loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine():
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads_used": THREADS,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def make_problem(path):
    """Draws the shared data with tfp_glow.npe and saves it for every row."""
    from tfp_glow import npe

    problem = npe.GaussianLinear()
    theta, x = problem.simulate(NUM_TRAIN, seed=1)
    _, x_obs = problem.simulate(NUM_OBS, seed=2)
    posterior = problem.posterior(x_obs.astype(np.float64))
    draws = posterior.sample(NUM_POSTERIOR, seed=npe._stateless_seed(3, 3))  # [n, B, D]
    log_p = np.asarray(posterior.log_prob(draws)).T
    np.savez(
        path,
        theta=theta,
        x=x,
        x_obs=x_obs,
        posterior_draws=np.transpose(draws, [1, 0, 2]),
        log_p=log_p,
        A=problem.A,
        noise_std=problem.noise_std,
    )


# -- the rows: each returns (log_q [B, n], fit seconds, parameter count, versions) --------------
def run_tfp_glow(data, family, seed):
    import keras
    import tensorflow as tf
    import tensorflow_probability as tfp

    import tfp_glow
    from tfp_glow import npe

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(THREADS)
    keras.utils.set_random_seed(seed)
    estimator = npe.NeuralPosteriorEstimator.build(5, 5, family=family)
    start = time.perf_counter()
    estimator.fit(data["theta"], data["x"], epochs=EPOCHS, batch_size=BATCH, verbose=0)
    seconds = time.perf_counter() - start
    log_q = np.stack(
        [estimator.log_prob(t, x) for t, x in zip(data["posterior_draws"], data["x_obs"])]
    )
    params = int(sum(np.prod(v.shape) for v in estimator.model.trainable_weights))
    versions = {
        "tfp_glow": tfp_glow.__version__,
        "tensorflow": tf.__version__,
        "tfp": tfp.__version__,
        "keras": keras.__version__,
    }
    return log_q, seconds, params, versions, estimator.model.get_config()


def run_bayesflow(data, seed):
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    # Before bayesflow's import, which starts TensorFlow's runtime.
    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(THREADS)
    import bayesflow as bf
    import keras

    keras.utils.set_random_seed(seed)
    workflow = bf.BasicWorkflow(
        inference_network=bf.networks.CouplingFlow(),
        inference_variables=["theta"],
        inference_conditions=["x"],
    )
    start = time.perf_counter()
    workflow.fit_offline(
        {"theta": data["theta"], "x": data["x"]}, epochs=EPOCHS, batch_size=BATCH, verbose=0
    )
    seconds = time.perf_counter() - start
    log_q = np.stack(
        [
            np.asarray(
                workflow.log_prob(
                    {
                        "theta": t.astype(np.float32),
                        "x": np.broadcast_to(x, (len(t), x.size)).copy(),
                    }
                )
            )
            for t, x in zip(data["posterior_draws"], data["x_obs"])
        ]
    )
    params = int(sum(np.prod(v.shape) for v in workflow.approximator.trainable_weights))
    versions = {
        "bayesflow": bf.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.config.backend(),
    }
    return log_q, seconds, params, versions, {"inference_network": "CouplingFlow()"}


def run_sbi(data, seed):
    import sbi
    import torch
    from sbi.inference import NPE

    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    np.random.seed(seed)
    prior = torch.distributions.MultivariateNormal(torch.zeros(5), torch.eye(5))
    inference = NPE(prior=prior, show_progress_bars=False)
    start = time.perf_counter()
    inference.append_simulations(torch.from_numpy(data["theta"]), torch.from_numpy(data["x"]))
    inference.train(training_batch_size=BATCH, max_num_epochs=EPOCHS)
    posterior = inference.build_posterior()
    seconds = time.perf_counter() - start
    # The prior's support is all of R^5, so sbi's leakage correction (norm_posterior)
    # would be 1: it is skipped.
    with torch.no_grad():
        log_q = np.stack(
            [
                posterior.log_prob(
                    torch.from_numpy(t.astype(np.float32)),
                    x=torch.from_numpy(x[None]),
                    norm_posterior=False,
                ).numpy()
                for t, x in zip(data["posterior_draws"], data["x_obs"])
            ]
        )
    params = int(sum(p.numel() for p in posterior.posterior_estimator.parameters()))
    epochs_run = inference._summary.get("epochs_trained", [None])[-1]
    versions = {"sbi": sbi.__version__, "torch": torch.__version__}
    return (
        log_q,
        seconds,
        params,
        versions,
        {"density_estimator": "maf", "epochs_trained": epochs_run},
    )


def run_row(row, seed, problem_path, out_dir):
    data = dict(np.load(problem_path))
    load_start, t0 = loadavg(), time.time()
    if row.startswith("tfp_glow_"):
        log_q, seconds, params, versions, config = run_tfp_glow(data, row[len("tfp_glow_") :], seed)
    elif row == "bayesflow_coupling_flow":
        log_q, seconds, params, versions, config = run_bayesflow(data, seed)
    elif row == "sbi_npe_maf":
        log_q, seconds, params, versions, config = run_sbi(data, seed)
    else:
        raise ValueError(f"`--rows` must be among {ROWS}; got {row!r}.")
    kl, se = monte_carlo_kl(data["log_p"], log_q)
    result = {
        "row": row,
        "seed": seed,
        "kl_mean": float(kl.mean()),
        "kl_mean_se": float(np.sqrt((se**2).sum()) / len(se)),
        "kl_per_observation": kl.round(5).tolist(),
        "kl_se_per_observation": se.round(5).tolist(),
        "fit_seconds": round(seconds, 1),
        "params": params,
        "budget": {
            "train_pairs": NUM_TRAIN,
            "epochs": EPOCHS,
            "batch_size": BATCH,
            "observations": NUM_OBS,
            "posterior_draws": NUM_POSTERIOR,
        },
        "config": json.loads(json.dumps(config, default=str)),
        "versions": {**versions, "python": sys.version.split()[0]},
        "machine": machine(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "wall_seconds": round(time.time() - t0, 1),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{row}_seed{seed}.json"), "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("row", "seed", "kl_mean", "kl_mean_se", "fit_seconds", "params")
            }
        ),
        flush=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=RESULTS, help="directory of the JSON results")
    parser.add_argument("--problem", help=argparse.SUPPRESS)  # a row's own process
    parser.add_argument("--make-problem", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_problem:
        return make_problem(args.make_problem)
    if args.problem:  # one row, one seed, in this process
        return run_row(args.rows[0], args.seeds[0], args.problem, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "problem.npz")
        subprocess.run([sys.executable, __file__, "--make-problem", path], check=True)
        for row in args.rows:
            for seed in args.seeds:
                env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--problem",
                        path,
                        "--rows",
                        row,
                        "--seeds",
                        str(seed),
                        "--out",
                        args.out,
                    ],
                    check=True,
                    env=env,
                )


if __name__ == "__main__":
    main()
