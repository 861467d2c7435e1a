"""Neural posterior estimation on a Gaussian-linear simulator, checked against
its closed-form posterior.

    python examples/npe_gaussian_linear.py --output out/npe_gaussian_linear
    python examples/npe_gaussian_linear.py --family realnvp
    python examples/npe_gaussian_linear.py --smoke     # seconds, used by the tests

The simulator: `theta ~ N(0, I_5)`, `x = A theta + 0.5 eps` (A fixed by a
seed). A conditional flow `q(theta | x)` (the default conditional MAF) is fitted
to 20,000 simulated pairs, 25 epochs of batch 256; then, for 10 held-out
observations, it prints `KL(p(theta | x_o) || q(theta | x_o))` (nats, Monte
Carlo over 10,000 exact posterior draws, with its standard error) and the
average. Writes `posterior.png`: for the first observation, exact posterior
draws next to the flow's, on the two coordinates the posterior correlates most.
"""

import argparse
import os
import time

import _plots
import keras
import numpy as np

from tfp_glow import npe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="out/npe_gaussian_linear")
    parser.add_argument("--family", default="maf", choices=["maf", "realnvp"])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds-long run")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    keras.utils.set_random_seed(args.seed)

    problem = npe.GaussianLinear()  # theta_dim=5, x_dim=5, noise_std=0.5, A from seed 0
    theta, x = problem.simulate(2_000 if args.smoke else 20_000, seed=1)
    _, x_obs = problem.simulate(10, seed=2)  # held out: drawn like the training x

    estimator = npe.NeuralPosteriorEstimator.build(theta_dim=5, x_dim=5, family=args.family)
    start = time.perf_counter()
    estimator.fit(theta, x, epochs=1 if args.smoke else args.epochs, batch_size=256, verbose=2)
    print(f"fit: {time.perf_counter() - start:.1f} s")

    # KL(p || q) = E_p[log p - log q] over exact posterior draws, per observation.
    kl, se = problem.kl_to_posterior(
        estimator.log_prob, x_obs, num_samples=1_000 if args.smoke else 10_000, seed=3
    )
    for i, (k, s) in enumerate(zip(kl, se)):
        print(f"observation {i}: KL = {k:.4f} +- {s:.4f} nats")
    print(
        f"mean KL over {len(kl)} observations: {kl.mean():.4f} "
        f"+- {np.sqrt((se**2).sum()) / len(se):.4f} nats"
    )

    # The first observation's posterior: exact draws and the flow's.
    exact = np.asarray(problem.posterior(x_obs[0].astype(np.float64)).sample(2_000, seed=4))
    ours = estimator.sample(2_000, x_obs[0], seed=5)
    pair = list(np.unravel_index(np.argmax(np.abs(np.triu(_correlation(problem), 1))), (5, 5)))
    center = exact[:, pair].mean(axis=0)
    extent = 4 * exact[:, pair].std(axis=0).max()
    _plots.scatter_png(
        [exact[:, pair] - center, ours[:, pair] - center],
        [f"exact p(theta_{pair[0] + 1}, theta_{pair[1] + 1} | x_o)", f"{args.family} q(. | x_o)"],
        os.path.join(args.output, "posterior.png"),
        extent=extent,
    )
    print(f"wrote {os.path.join(args.output, 'posterior.png')} (centred on the exact mean)")


def _correlation(problem):
    cov = problem.posterior_covariance
    return cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))


if __name__ == "__main__":
    main()
