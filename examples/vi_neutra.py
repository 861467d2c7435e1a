"""A flow surrogate for TFP variational inference, then NeuTra HMC in its latent space.

    python examples/vi_neutra.py --output out/vi_neutra
    python examples/vi_neutra.py --smoke      # tiny, seconds of compute

Two posteriors whose answers are known:

* the 10-D Neal funnel: v ~ N(0, 3), x_i | v ~ N(0, exp(v / 2)), i = 1..9
  (normalised, so ELBO = -KL(q || p) <= 0);
* the centred Eight Schools, a pinned `tfd.JointDistributionCoroutineAutoBatched`
  (mu ~ N(0, 5), tau ~ HalfCauchy(0, 5), theta_j ~ N(mu, tau), y_j ~ N(theta_j,
  sigma_j)); its truth (log p(y) = -31.31, moments of mu and tau) comes from
  quadrature over (mu, log tau) with theta integrated out exactly.

Each is fitted with stock `tfp.vi.fit_surrogate_posterior` twice: TFP's
mean-field surrogate (at its best learning rate of 1e-2 / 3e-2 / 1e-1, measured)
and `tfp_glow.vi.flow_surrogate_posterior` (defaults, Adam 1e-3). Then HMC
runs on the raw target and, with the same number of gradients, in the flow's
latent space (`tfp_glow.vi.neutra_kernel`).

Writes `elbo_curves.png`, `funnel_samples.png`, `schools_tau.png` and prints
an ELBO table and an ESS table. Needs matplotlib (`pip install -e ".[examples]"`).
"""

import argparse
import os
import sys
import time

import _plots
import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from scipy.special import logsumexp

from tfp_glow import vi

tfb, tfd = tfp.bijectors, tfp.distributions
SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
MEAN_FIELD_LR = {"funnel": 3e-2, "schools": 1e-1}  # best of {1e-2, 3e-2, 1e-1}, measured


def funnel_log_prob(z):
    """log N(v; 0, 3) + sum_i log N(x_i; 0, exp(v / 2)), z = (v, x_1..x_9)."""
    v, x = z[..., 0], z[..., 1:]
    return tfd.Normal(0.0, 3.0).log_prob(v) + tf.reduce_sum(
        tfd.Normal(0.0, tf.exp(v / 2)[..., None]).log_prob(x), -1
    )


def eight_schools():
    def model():
        mu = yield tfd.Normal(0.0, 5.0, name="mu")
        tau = yield tfd.HalfCauchy(0.0, 5.0, name="tau")
        theta = yield tfd.Normal(mu[..., None] * tf.ones(8), tau[..., None], name="theta")
        yield tfd.Normal(theta, SCHOOLS_SIGMA.astype(np.float32), name="y")

    jd = tfd.JointDistributionCoroutineAutoBatched(model, use_vectorized_map=False)
    return jd.experimental_pin(y=SCHOOLS_Y.astype(np.float32))


def schools_truth(n=1500):
    """log p(y), E/sd of mu and tau, and the density of log tau, by quadrature.

    theta is integrated out exactly: y_j | mu, tau ~ N(mu, sqrt(tau^2 + sigma_j^2)).
    """
    mu = np.linspace(-30, 40, n)
    log_tau = np.linspace(-14, 9, n)
    m, lt = np.meshgrid(mu, log_tau, indexing="ij")
    tau = np.exp(lt)
    var = tau[..., None] ** 2 + SCHOOLS_SIGMA**2
    log_joint = (
        -0.5 * (m / 5) ** 2
        - np.log(5 * np.sqrt(2 * np.pi))
        + np.log(2 / (np.pi * 5))
        - np.log1p((tau / 5) ** 2)
        + lt
        + np.sum(-0.5 * (SCHOOLS_Y - m[..., None]) ** 2 / var - 0.5 * np.log(2 * np.pi * var), -1)
    )
    cell = (mu[1] - mu[0]) * (log_tau[1] - log_tau[0])
    w = np.exp(log_joint - logsumexp(log_joint))
    moments = {}
    for name, values in (("mu", m), ("tau", tau)):
        mean = float(np.sum(w * values))
        moments[name] = (mean, float(np.sqrt(np.sum(w * values**2) - mean**2)))
    density = w.sum(0) / (log_tau[1] - log_tau[0])
    return float(logsumexp(log_joint) + np.log(cell)), moments, (log_tau, density)


def elbo(target, q, num_draws=20_000, seed=(11, 12)):
    x, log_q = q.experimental_sample_and_log_prob(num_draws, seed=seed)
    log_p = target(*x) if isinstance(x, tuple) else target(x)
    return float(tf.reduce_mean(log_p - log_q))


def fit(target, q, lr, steps, seed, jit):
    losses = tfp.vi.fit_surrogate_posterior(
        target, q, keras.optimizers.Adam(lr), steps, sample_size=16, jit_compile=jit, seed=seed
    )
    return -losses.numpy()  # the ELBO estimate of each step


def sample_chain(kernel, init, num_results, num_burnin, seed, jit):
    return tf.function(
        lambda: tfp.mcmc.sample_chain(
            num_results, init, kernel=kernel, num_burnin_steps=num_burnin, seed=seed, trace_fn=None
        ),
        jit_compile=jit,
    )()


def hmc(target, leapfrog, adapt, bijector=None):
    kernel = tfp.mcmc.HamiltonianMonteCarlo(target, step_size=0.5, num_leapfrog_steps=leapfrog)
    if bijector is not None:
        kernel = tfp.mcmc.TransformedTransitionKernel(kernel, bijector)
    return tfp.mcmc.DualAveragingStepSizeAdaptation(kernel, num_adaptation_steps=adapt)


def smoothed(curve, width):
    width = max(1, min(width, len(curve)))
    return np.convolve(curve, np.ones(width) / width, mode="valid")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", "--out", default="out/vi_neutra")
    parser.add_argument("--steps", type=int, default=2000, help="VI steps per fit")
    parser.add_argument("--chains", type=int, default=128)
    parser.add_argument("--results", type=int, default=1000, help="MCMC draws per chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds-long run")
    args = parser.parse_args(argv)
    plt = _plots.matplotlib_pyplot()
    if plt is None:
        sys.exit('examples/vi_neutra.py needs matplotlib: pip install -e ".[examples]"')
    os.makedirs(args.output, exist_ok=True)
    smoke = args.smoke
    steps = 20 if smoke else args.steps
    flow_args = dict(num_layers=1, hidden_units=8) if smoke else {}
    jit = not smoke  # XLA compiles for seconds: worth it for 2,000 steps, not for 20
    results, burnin = (20, 20) if smoke else (args.results, 300)
    # neutra_kernel's default (2): short trajectories give the most effective
    # samples per gradient in a near-standard-normal latent (see its docstring).
    leapfrog, adapt = 2, int(0.8 * burnin)
    grads = args.chains * (burnin + results) * leapfrog

    log_z, moments, (log_tau_grid, log_tau_density) = schools_truth(300 if smoke else 1500)
    schools = eight_schools()
    problems = {
        "funnel": (
            funnel_log_prob,
            0.0,
            [10],
            lambda: tfp.experimental.vi.build_factored_surrogate_posterior(
                [10], seed=(args.seed, 5)
            ),
        ),
        "schools": (
            schools.unnormalized_log_prob,
            log_z,
            schools,
            lambda: tfp.experimental.vi.build_factored_surrogate_posterior(
                schools.event_shape,
                bijector=schools.experimental_default_event_space_bijector(),
                seed=(args.seed, 5),
            ),
        ),
    }
    curves, surrogates, table = {}, {}, []
    for name, (target, truth, model, mean_field) in problems.items():
        for kind in ("mean-field", "flow"):
            start = time.time()
            if kind == "flow":
                q = vi.flow_surrogate_posterior(model, seed=args.seed, **flow_args)
                lr = 1e-3
            else:
                q, lr = mean_field(), MEAN_FIELD_LR[name]
            curves[name, kind] = fit(target, q, lr, steps, (args.seed, 1), jit)
            surrogates[name, kind] = q
            value = elbo(target, q, 2000 if smoke else 20_000)
            table.append((name, kind, lr, value, truth, time.time() - start))
    print(
        f"\n{'problem':8s} {'surrogate':10s} {'lr':>6s} {'ELBO':>8s} {'log p':>7s} "
        f"{'KL':>6s} {'time':>6s}"
    )
    for name, kind, lr, value, truth, seconds in table:
        print(
            f"{name:8s} {kind:10s} {lr:6.0e} {value:8.3f} {truth:7.2f} "
            f"{truth - value:6.3f} {seconds:5.0f}s"
        )

    # ---- MCMC: the same gradients for plain HMC and NeuTra HMC
    flow_f, flow_s = surrogates["funnel", "flow"], surrogates["schools", "flow"]
    constrain = schools.experimental_default_event_space_bijector()
    shapes = constrain.inverse_event_shape(schools.event_shape)
    schools_init = constrain(
        tf.nest.map_structure(
            lambda s: tf.random.stateless_normal([args.chains] + s.as_list(), seed=(args.seed, 3)),
            shapes,
        )
    )
    runs = {
        ("funnel", "HMC"): (
            hmc(funnel_log_prob, leapfrog, adapt),
            tf.random.stateless_normal([args.chains, 10], seed=(args.seed, 3)),
        ),
        ("funnel", "NeuTra HMC"): (
            vi.neutra_kernel(funnel_log_prob, flow_f, num_adaptation_steps=adapt),
            vi.neutra_initial_state(flow_f, args.chains, seed=(args.seed, 3)),
        ),
        ("schools", "HMC"): (
            hmc(schools.unnormalized_log_prob, leapfrog, adapt, constrain),
            schools_init,
        ),
        ("schools", "NeuTra HMC"): (
            vi.neutra_kernel(schools.unnormalized_log_prob, flow_s, num_adaptation_steps=adapt),
            vi.neutra_initial_state(flow_s, args.chains, seed=(args.seed, 3)),
        ),
    }
    draws = {}
    print(
        f"\n{'problem':8s} {'sampler':11s} {'gradients':>9s} {'ESS':>7s} {'ESS/1k grad':>11s} "
        f"{'mean':>6s} {'sd':>6s} {'true mean, sd':>14s} {'time':>6s}"
    )
    for (name, sampler), (kernel, init) in runs.items():
        start = time.time()
        states = sample_chain(kernel, init, results, burnin, (args.seed, 9), jit)
        x = states[..., 0] if name == "funnel" else states.tau
        draws[name, sampler] = states
        ess = (
            float(tfp.mcmc.effective_sample_size(x, cross_chain_dims=1))
            if args.chains > 1
            else float(tfp.mcmc.effective_sample_size(x)[0])
        )
        true_mean, true_sd = (0.0, 3.0) if name == "funnel" else moments["tau"]
        label = "v" if name == "funnel" else "tau"
        print(
            f"{name:8s} {sampler:11s} {grads:9d} {ess:7.1f} {1000 * ess / grads:11.3f} "
            f"{float(np.mean(x)):6.2f} {float(np.std(x)):6.2f} "
            f"{label:>3s} {true_mean:4.2f}, {true_sd:4.2f} {time.time() - start:5.0f}s"
        )

    # ---- pictures
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (name, (_, truth, _, _)) in zip(axes, problems.items()):
        for kind in ("mean-field", "flow"):
            curve = smoothed(curves[name, kind], 50)
            ax.plot(np.arange(len(curve)), curve, label=kind)
        ax.axhline(truth, color="k", ls="--", lw=1, label="log p(y)" if truth else "log Z = 0")
        low = min(np.percentile(smoothed(curves[name, k], 50), 20) for k in ("mean-field", "flow"))
        ax.set_ylim(low - 0.5, truth + 0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("ELBO (16 draws, moving average of 50)")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    paths = [os.path.join(args.output, "elbo_curves.png")]
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)

    rng = np.random.default_rng(args.seed)
    v = 3.0 * rng.standard_normal(4000)
    exact = np.stack([v, np.exp(v / 2) * rng.standard_normal(4000)], 1)
    panels = {"exact": exact}
    for kind in ("mean-field", "flow"):
        panels[kind] = surrogates["funnel", kind].sample(4000, seed=(1, 1)).numpy()[:, [0, 1]]
    for sampler in ("HMC", "NeuTra HMC"):
        panels[sampler] = draws["funnel", sampler].numpy().reshape(-1, 10)[:, [0, 1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharey=True)
    for ax, (title, pts) in zip(axes, panels.items()):
        ax.scatter(pts[:, 1], pts[:, 0], s=1, alpha=0.3)
        ax.set_xlim(-12, 12)
        ax.set_ylim(-10, 10)
        ax.set_title(title)
        ax.set_xlabel("x_1")
    axes[0].set_ylabel("v")
    fig.tight_layout()
    paths.append(os.path.join(args.output, "funnel_samples.png"))
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(log_tau_grid, log_tau_density, "k", lw=2, label="exact (quadrature)")
    samples = {
        kind: surrogates["schools", kind].sample(20_000, seed=(2, 2)).tau
        for kind in ("mean-field", "flow")
    }
    samples["NeuTra HMC"] = draws["schools", "NeuTra HMC"].tau
    bins = np.linspace(-6, 4, 60)
    for label, tau in samples.items():
        ax.hist(
            np.log(np.ravel(tau.numpy())),
            bins=bins,
            density=True,
            histtype="step",
            lw=1.5,
            label=label,
        )
    ax.set_xlim(-6, 4)
    ax.set_xlabel("log tau")
    ax.set_title("Eight Schools: posterior of log tau")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(args.output, "schools_tau.png"))
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    main()
