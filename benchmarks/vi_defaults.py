"""The measurements behind `tfp_glow.vi`'s defaults (their docstrings cite them).

    python benchmarks/vi_defaults.py surrogate --out benchmarks/results/vi_surrogate.json
    python benchmarks/vi_defaults.py leapfrog  --out benchmarks/results/vi_leapfrog.json

`surrogate`: `flow_surrogate_posterior` on the 10-D Neal funnel and the centred
Eight Schools (examples/vi_neutra.py's targets), stock
`tfp.vi.fit_surrogate_posterior`, 2,000 steps of 16 draws, ELBO from 20,000
draws, averaged over surrogate seeds 0 and 1: depth 2 / 4 / 6 / 8 (width 32,
affine, Adam 1e-3), width 64 at depth 4, additive at depth 4, and Adam 3e-3 /
3e-4 at depth 6.

`leapfrog`: NeuTra HMC against plain HMC on the funnel (the default surrogate,
fitted as above with seed 0), the same gradients for both: `--chains` chains x
(300 burn-in, 240 of them adapting the step, + 1,000 draws) x L leapfrog
steps; the cross-chain ESS of `v` per 1000 gradients for L = 2, 3, 4, 6, 8, 12,
each over the chain seeds `--chain-seeds`.
"""

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import report  # noqa: E402

STEPS = 2000


def _targets():
    import vi_neutra

    schools = vi_neutra.eight_schools()
    return {
        "funnel": (vi_neutra.funnel_log_prob, [10]),
        "schools": (schools.unnormalized_log_prob, schools),
    }


def surrogate(seeds=(0, 1)):
    import vi_neutra

    from tfp_glow import vi

    configs = {f"{n} layers": dict(num_layers=n) for n in (2, 4, 6, 8)}
    configs["4 layers, width 64"] = dict(num_layers=4, hidden_units=64)
    configs["4 layers, additive"] = dict(num_layers=4, coupling="additive")
    rates = {"6 layers, Adam 3e-3": 3e-3, "6 layers, Adam 3e-4": 3e-4}
    out = {}
    for name, (target, model) in _targets().items():
        for label in list(configs) + list(rates):
            kwargs = configs.get(label, dict(num_layers=6))
            lr = rates.get(label, 1e-3)
            elbos = []
            for seed in seeds:
                t0 = time.perf_counter()
                q = vi.flow_surrogate_posterior(model, seed=seed, **kwargs)
                vi_neutra.fit(target, q, lr, STEPS, (seed, 1), True)
                elbos.append(vi_neutra.elbo(target, q))
                print(
                    f"{name:8s} {label:22s} seed {seed}: ELBO {elbos[-1]:.3f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
            out[f"{name}: {label}"] = {"elbo_mean": float(np.mean(elbos)), "elbos": elbos}
    return out


def leapfrog(chains=128, chain_seeds=(9, 19, 29), steps=(2, 3, 4, 6, 8, 12)):
    import tensorflow as tf
    import tensorflow_probability as tfp
    import vi_neutra

    from tfp_glow import vi

    target, _ = _targets()["funnel"]
    q = vi.flow_surrogate_posterior([10], seed=0)
    vi_neutra.fit(target, q, 1e-3, STEPS, (0, 1), True)
    burnin, results, adapt = 300, 1000, 240
    out = {}
    for num_steps in steps:
        grads = chains * (burnin + results) * num_steps
        rows = []
        for seed in chain_seeds:
            runs = {
                "neutra": (
                    vi.neutra_kernel(
                        target, q, num_leapfrog_steps=num_steps, num_adaptation_steps=adapt
                    ),
                    vi.neutra_initial_state(q, chains, seed=(1, 7)),
                ),
                "hmc": (
                    vi_neutra.hmc(target, num_steps, adapt),
                    tf.random.stateless_normal([chains, 10], seed=(1, 7)),
                ),
            }
            row = {}
            for name, (kernel, init) in runs.items():
                x = vi_neutra.sample_chain(kernel, init, results, burnin, (2, seed), True)
                ess = float(tfp.mcmc.effective_sample_size(x[..., 0], cross_chain_dims=1))
                row[name] = 1000 * ess / grads
                row[f"{name}_sd_v"] = float(np.std(x[..., 0].numpy()))
            rows.append(row)
            print(
                f"L={num_steps:2d} chain seed {seed}: ESS of v per 1000 gradients NeuTra "
                f"{row['neutra']:.3f}, HMC {row['hmc']:.3f}",
                flush=True,
            )
        out[str(num_steps)] = rows
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("surrogate", "leapfrog"))
    parser.add_argument("--chains", type=int, default=128)
    parser.add_argument("--chain-seeds", type=int, nargs="+", default=[9, 19, 29])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import common

    result = {"machine": common.machine_info(), "loadavg_start": list(os.getloadavg())}
    if args.what == "surrogate":
        result["surrogate"] = surrogate()
    else:
        result["leapfrog"] = leapfrog(args.chains, tuple(args.chain_seeds))
    result["loadavg_end"] = list(os.getloadavg())
    report.print_and_write(result, args.out)


if __name__ == "__main__":
    main()
