"""How good is EMDiffusion's E-step (DPS) against SFBD's backward step, per unit of compute?

    python benchmarks/dps_calibration.py --out runs/reproduce_mnist --seed 0 --variant sigma0.2 \
        --round 0 --count 256 --grid normalized:9:0.5,normalized:9:1,likelihood:9:1

Restores round ``--round``'s state of the SFBD row of ``benchmarks/reproduce_mnist.py`` (its
``--out``, seed and variant; round 0 = the model pretrained on the clean subset: the starting
point of both methods), takes ``--count`` noisy images of its
prepared data set (every ⌊N/count⌋-th: MNIST-5k is sorted by class) and reconstructs them with
the ODE from σ_ζ (SFBD's backward step, the run's own settings) and with DPS for each
``guidance:levels:zeta`` of ``--grid``. Prints, per setting: PSNR against the clean originals
(a diagnostic only synthetic data allows), the discrepancy ratio ‖y − x‖/(σ_ζ·√d) (1 for an
exact posterior sample, ≈ 0 when x copies y; a rule that needs no originals), the denoiser
evaluations and gradients per image, and the cost in forward-pass equivalents (an evaluation
1, a gradient 2 more). Appends one JSON line per setting to the row's dps_calibration.jsonl
(settings already there are skipped, so the script resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_grid(spec: str) -> list[tuple[str, int, float]]:
    grid = []
    for item in spec.split(","):
        guidance, levels, zeta = item.split(":")
        grid.append((guidance, int(levels), float(zeta)))
    return grid


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the --out of reproduce_mnist.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default="sigma0.2")
    parser.add_argument("--round", type=int, default=0, help="the state rounds/<k> to use")
    parser.add_argument("--count", type=int, default=256, help="noisy images to reconstruct")
    parser.add_argument("--grid", default="normalized:9:0.5,normalized:9:1,likelihood:9:1",
                        help="guidance:levels:zeta settings of DPS")
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    from absl import logging

    from sfbd_jax.data import eval_only
    from sfbd_jax.data.prepared import PreparedDataset
    from sfbd_jax.evaluation import denoising
    from sfbd_jax.methods import backward
    from sfbd_jax.training import loop
    from sfbd_jax.utils import checkpoints, devices

    devices.configure_cpu_devices(0)
    logging.set_verbosity(logging.WARNING)
    import reproduce_mnist

    config = reproduce_mnist.row_config(args.variant, args.seed, "sfbd", args.out)
    workdir = reproduce_mnist.row_workdir(args.out, args.seed, args.variant, "sfbd")
    out = os.path.join(workdir, "dps_calibration.jsonl")
    done = set()
    if os.path.exists(out):
        with open(out) as f:
            done = {(r["backward"], r.get("guidance"), r.get("levels"), r.get("zeta"))
                    for r in map(json.loads, f)}
    exp = loop.Experiment(config)
    state = checkpoints.Checkpointer(os.path.join(workdir, "rounds"), None,
                                     enable_async=False).restore(args.round,
                                                                 exp.abstract_state())
    data_dir = config.corrupt.output_dir
    data = PreparedDataset(data_dir)
    noisy = np.asarray(data.noisy()[0].images)
    rows = np.arange(0, len(noisy), len(noisy) // args.count)[: args.count]
    originals = eval_only.load_clean_originals(data_dir)[rows]
    y = noisy[rows]
    sigma_zeta = float(data.manifest["settings"]["corruption"]["sigma"])
    batch = min(config.sfbd.denoise_batch_size, len(y))
    batch -= batch % len(jax.devices())
    results = []
    settings = [("ode", None, None, None)] + [("dps", *g) for g in parse_grid(args.grid)]
    for kind, guidance, levels, zeta in settings:
        if (kind, guidance, levels, zeta) in done:
            continue
        config.sfbd.backward = kind
        if kind == "dps":
            config.sfbd.dps_guidance, config.sfbd.dps_num_steps = guidance, levels
            config.sfbd.dps_zeta = zeta
        sampler = backward.make_backward_sampler(exp.denoise, exp.mesh, config, sigma_zeta)
        key = jax.random.PRNGKey(config.seed)
        backward.denoise_rows(sampler.sample, state.ema_params, y, np.arange(min(batch,
                              len(y))), mesh=exp.mesh, batch_size=batch, key=key)  # compile
        start = time.time()
        x = backward.denoise_rows(sampler.sample, state.ema_params, y, np.arange(len(y)),
                                  mesh=exp.mesh, batch_size=batch, key=key)
        seconds = time.time() - start
        _, psnr = denoising.mse_psnr(np.clip(x, -1.0, 1.0), originals)
        residual = np.sqrt(np.mean(np.square(x - y), axis=(1, 2, 3))) / sigma_zeta
        row = {"backward": kind, "guidance": guidance, "levels": levels, "zeta": zeta,
               "round": args.round, "count": len(y), "sigma_zeta": sigma_zeta,
               "psnr": float(psnr), "discrepancy_ratio": float(np.mean(residual)),
               "evaluations_per_image": sampler.evaluations_per_image,
               "gradients_per_image": sampler.gradients_per_image,
               "forward_equivalents_per_image": sampler.evaluations_per_image
               + 2 * sampler.gradients_per_image,
               "images_per_second": len(y) / seconds, "seed": args.seed, "variant": args.variant}
        results.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{kind:4} {guidance or '':10} levels {levels or '':>4} ζ {zeta or '':>5}  "
              f"PSNR {psnr:6.2f} dB  discrepancy {row['discrepancy_ratio']:.3f}  "
              f"{row['forward_equivalents_per_image']:>4} FPE/image  "
              f"{row['images_per_second']:.1f} images/s", flush=True)
    return results


if __name__ == "__main__":
    main()
