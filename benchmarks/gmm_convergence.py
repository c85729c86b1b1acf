"""SFBD on a Gaussian mixture, where p_data is known exactly: distance to p_data per round,
and online SFBD beside it at equal compute (training steps + denoising evaluations).

    python benchmarks/gmm_convergence.py --variant 2d --out runs/gmm2d
    python benchmarks/gmm_convergence.py --variant 16d --out runs/gmm16d
    python benchmarks/gmm_convergence.py --out runs/gmm_online \
        --table runs/gmm_online/seed*/gmm_2d.json          # mean ± 95% interval over seeds
    python benchmarks/gmm_convergence.py --variant 2d --out runs/gmm_rules --seed 0 \
        --online_rules fixed,adaptive                      # online SFBD's two refresh rules

The settings live in configs/gmm_convergence.py. Data are vectors stored as (N, 1, 1, D)
"images", so the package's EDM loss, preconditioning and Heun sampler run unchanged with a
small MLP in place of the U-Net. Each round: denoise all noisy samples from σ_ζ with the
current model (probability-flow ODE), then fine-tune on denoised ∪ clean. After every round
the model's samples are compared with fresh samples of p_data: sliced W₁, and the mean
log-density under the true mixture (exact, against the same quantity for p_data itself).
Writes OUT/gmm_<variant>.json, a plot of the distances per round, and for 2-D scatter plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

from sfbd_jax.diffusion import edm, sampler  # noqa: E402
from sfbd_jax.evaluation import distances  # noqa: E402
from sfbd_jax.models import precond  # noqa: E402


# ----- the true distribution --------------------------------------------------------------
def mixture(cfg, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """(means (K, D), per-coordinate std) of an equal-weight isotropic mixture."""
    g = cfg.gmm
    if g.layout == "circle":
        if g.dim != 2:
            raise ValueError("gmm.layout='circle' needs gmm.dim=2")
        angles = 2 * np.pi * np.arange(g.components) / g.components
        means = g.radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif g.layout == "random":
        means = rng.normal(size=(g.components, g.dim)) * g.radius / np.sqrt(g.dim)
    else:
        raise ValueError(f"unknown gmm.layout {g.layout!r}")
    return means, g.std


def sample_mixture(means, std, n, rng) -> np.ndarray:
    idx = rng.integers(0, len(means), n)
    return (means[idx] + std * rng.normal(size=(n, means.shape[1]))).astype(np.float32)


def log_density(x, means, std) -> np.ndarray:
    """Exact log p_data(x) of the equal-weight mixture, (N,)."""
    d = x.shape[1]
    sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    return (logsumexp(-sq / (2 * std**2), axis=1) - np.log(len(means))
            - 0.5 * d * np.log(2 * np.pi * std**2))


# ----- the model --------------------------------------------------------------------------
class MLPDenoiserNet(nn.Module):
    """F(c_in·x; c_noise) for x of shape (B, 1, 1, D) (the U-Net's call signature)."""

    width: int
    depth: int
    emb_dim: int

    @nn.compact
    def __call__(self, x, c_noise, labels=None, *, train=False, label_embedding_noise=None):
        b, d = x.shape[0], x.shape[-1]
        freqs = jnp.exp(jnp.linspace(0.0, jnp.log(1000.0), self.emb_dim // 2))
        angle = c_noise[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)
        h = jnp.concatenate([x.reshape(b, d), emb], axis=-1)
        for _ in range(self.depth):
            h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(d, kernel_init=nn.initializers.zeros)(h).reshape(x.shape)


def as_images(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), 1, 1, -1)


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.net = MLPDenoiserNet(cfg.model.width, cfg.model.depth, cfg.model.emb_dim)
        self.denoise = precond.make_denoiser(self.net, cfg.diffusion.sigma_data)
        self.tx = optax.adam(cfg.train.lr)
        d = cfg.diffusion

        def loss(params, x, key):
            return jnp.mean(edm.edm_loss_per_example(
                self.denoise, params, x, key, sigma_data=d.sigma_data, p_mean=d.p_mean,
                p_std=d.p_std))

        @jax.jit
        def step(params, opt_state, x, key):
            value, grads = jax.value_and_grad(loss)(params, x, key)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        self._step = step
        s = cfg.sampler
        self._generate = jax.jit(lambda p, x: sampler.heun_sample(
            self.denoise, p, x, sampler.karras_sigmas(s.num_steps, s.sigma_min, s.sigma_max,
                                                      s.rho)))
        grid = sampler.sigmas_from_level(cfg.sigma_zeta, cfg.backward_num_steps, s.sigma_min,
                                         s.sigma_max, s.rho)
        self._denoise_from = jax.jit(lambda p, y: sampler.heun_sample(self.denoise, p, y, grid))

    def init(self, key, dim):
        params = precond.init_params(self.net, key, (1, 1, dim), with_labels=False)
        return params, self.tx.init(params)

    def train(self, params, opt_state, data: np.ndarray, steps: int, key, rng) -> tuple:
        losses = []
        for i in range(steps):
            idx = rng.integers(0, len(data), self.cfg.train.batch_size)
            params, opt_state, loss = self._step(params, opt_state, as_images(data[idx]),
                                                 jax.random.fold_in(key, i))
            losses.append(float(loss))
        return params, opt_state, float(np.mean(losses[-100:]))

    def generate(self, params, n, key) -> np.ndarray:
        x = jax.random.normal(key, (n, 1, 1, self.dim)) * self.cfg.sampler.sigma_max
        return np.asarray(self._generate(params, x)).reshape(n, -1)

    def denoise_set(self, params, noisy) -> np.ndarray:
        return np.asarray(self._denoise_from(params, as_images(noisy))).reshape(len(noisy), -1)


def distance_row(samples, reference, means, std, cfg) -> dict:
    return {"swd": distances.sliced_wasserstein(samples, reference,
                                                num_projections=cfg.swd_projections, seed=0),
            "mean_log_density": float(np.mean(log_density(samples, means, std))),
            "frechet": distances.frechet_distance(samples.mean(0), np.cov(samples, rowvar=False),
                                                  reference.mean(0),
                                                  np.cov(reference, rowvar=False))}


def run(cfg, out: str, variant: str) -> dict:
    """SFBD on the mixture; returns (and writes) the per-round distances."""
    rng = np.random.default_rng(cfg.seed)
    means, std = mixture(cfg, rng)
    clean = sample_mixture(means, std, cfg.clean_count, rng)
    originals = sample_mixture(means, std, cfg.noisy_count, rng)
    noisy = originals + cfg.sigma_zeta * rng.normal(size=originals.shape).astype(np.float32)
    reference = sample_mixture(means, std, cfg.eval_samples, rng)  # fresh, for the distances
    trainer = Trainer(cfg)
    trainer.dim = cfg.gmm.dim
    key = jax.random.PRNGKey(cfg.seed)
    params, opt_state = trainer.init(jax.random.fold_in(key, 0), cfg.gmm.dim)
    start = time.time()

    rows = [dict(what="p_data itself (fresh samples)",
                 **distance_row(sample_mixture(means, std, cfg.eval_samples, rng), reference,
                                means, std, cfg)),
            dict(what="the noisy data", **distance_row(noisy, reference, means, std, cfg)),
            dict(what="the 50 clean samples",
                 **distance_row(clean, reference, means, std, cfg))]
    scatter = {"clean": clean, "noisy": noisy, "p_data": reference}
    params, opt_state, loss = trainer.train(params, opt_state, clean, cfg.train.pretrain_steps,
                                            jax.random.fold_in(key, 1), rng)
    pretrained = (params, opt_state)
    for k in range(cfg.rounds + 1):
        if k > 0:
            denoised = trainer.denoise_set(params, noisy)
            mse = float(np.mean((denoised - originals) ** 2))
            union = np.concatenate([denoised, clean])
            params, opt_state, loss = trainer.train(params, opt_state, union,
                                                    cfg.train.round_steps,
                                                    jax.random.fold_in(key, 100 + k), rng)
        samples = trainer.generate(params, cfg.eval_samples, jax.random.fold_in(key, 1000 + k))
        scatter[f"round {k}"] = samples
        row = dict(what=f"SFBD round {k}", round=k, train_loss=loss,
                   **distance_row(samples, reference, means, std, cfg))
        if k > 0:
            row["denoised_mse"] = mse
        rows.append(row)
        print(f"[gmm {variant}] round {k}: swd {row['swd']:.4f}, frechet {row['frechet']:.4f}, "
              f"mean log p_data {row['mean_log_density']:.3f} ({time.time() - start:.0f} s)",
              flush=True)
    for rule in cfg.online_refresh_rules:
        rows += run_online(cfg, trainer, *pretrained, clean, noisy, originals, reference,
                           means, std, key, scatter, variant, start, rule)
    result = {"variant": variant, "config": cfg.to_dict(), "rows": rows,
              "seconds": time.time() - start}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"gmm_{variant}.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, scatter, cfg, out, variant)
    return result


def run_online(cfg, trainer, params, opt_state, clean, noisy, originals, reference, means,
               std, key, scatter, variant, start, rule: str = "fixed") -> list[dict]:
    """Online SFBD from the same pretrained model at SFBD's compute: ``rounds`` × round_steps
    steps with a refresh of ⌈N/2⌉ noisy samples every round_steps/2 steps (so after k rounds'
    worth of steps it has spent SFBD's k backward passes), the buffer weight ramped over the
    first round_steps; the schedule, mixture and refresh ``rule`` ('fixed' or 'adaptive': a
    KID-set share of the candidates committed, the samples' coordinates as features) of
    sfbd_jax.methods.online_sfbd. Evaluated at SFBD's round ends."""
    from sfbd_jax.methods import online_sfbd as online

    n, b = len(noisy), cfg.train.batch_size
    every, count = cfg.train.round_steps // 2, -(-len(noisy) // 2)
    order = online.refresh_order(n, cfg.seed)
    buffer = np.zeros_like(noisy)
    rng = np.random.default_rng([cfg.seed, 77])
    train_key = jax.random.fold_in(key, 5000)
    rows, losses, fractions = [], [], []
    seen = np.zeros(n, bool)
    for u in range(cfg.rounds * cfg.train.round_steps):
        if u % every == 0:
            rows_j = online.refresh_rows(order, u // every, count)
            candidates = trainer.denoise_set(params, noisy[rows_j])
            commit = np.ones(len(rows_j), bool)
            if rule == "adaptive":  # the samples' coordinates are the features
                commit, decision = online.adaptive_commit(
                    seen[rows_j], buffer[rows_j], candidates, clean, lambda x: x, cfg.seed,
                    u // every)
                if "kid_replaced" in decision:
                    fractions.append(decision["commit_fraction"])
            buffer[rows_j[commit]] = candidates[commit]
            seen[rows_j] = True
        covered = online.covered(u // every + 1, count, n)
        p = online.buffer_probability(online.buffer_weight(u, 0, cfg.train.round_steps),
                                      covered, len(clean), 0.0)
        from_buffer = rng.random(b) < p
        x = np.where(from_buffer[:, None], buffer[order[rng.integers(covered, size=b)]],
                     clean[rng.integers(len(clean), size=b)])
        params, opt_state, loss = trainer._step(params, opt_state, as_images(x),
                                                jax.random.fold_in(train_key, u))
        losses.append(float(loss))
        if (u + 1) % cfg.train.round_steps == 0:
            k = (u + 1) // cfg.train.round_steps
            samples = trainer.generate(params, cfg.eval_samples,
                                       jax.random.fold_in(key, 1000 + k))
            scatter[f"online {k}" + ("" if rule == "fixed" else f" ({rule})")] = samples
            done = order[:covered]
            row = dict(what=f"online SFBD ({rule} refresh) at round {k}'s compute",
                       online_round=k, online_rule=rule,
                       train_loss=float(np.mean(losses[-100:])),
                       buffer_mse=float(np.mean((buffer[done] - originals[done]) ** 2)),
                       **distance_row(samples, reference, means, std, cfg))
            if rule == "adaptive":  # q of the refreshes so far that met denoised samples
                row["commit_fractions"] = list(fractions)
            rows.append(row)
            print(f"[gmm {variant}] online ({rule}) at round {k}: swd {row['swd']:.4f}, frechet "
                  f"{row['frechet']:.4f}, mean log p_data {row['mean_log_density']:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    return rows


def plot(result, scatter, cfg, out, variant) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    rounds = [r for r in rows if "round" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("swd", "frechet", "mean_log_density"),
                              ("sliced W₁ to p_data ↓", "Fréchet (moments) to p_data ↓",
                               "mean log p_data(samples) ↑"), strict=True):
        ax.plot([r["round"] for r in rounds], [r[key] for r in rounds], "o-", label="SFBD")
        for rule, style in (("fixed", "s--"), ("adaptive", "^:")):
            on = [r for r in rows if "online_round" in r
                  and r.get("online_rule", "fixed") == rule]
            if on:
                ax.plot([r["online_round"] for r in on], [r[key] for r in on], style,
                        label=f"online SFBD, {rule} refresh (same compute)")
        for r, style in zip(rows[:3], ("g--", "k-.", "r:"), strict=True):
            ax.axhline(r[key], color=style[0], linestyle=style[1:], label=r["what"])
        ax.set_xlabel("round k, or online SFBD at round k's compute (0 = pretrained)")
        ax.set_title(f"{cfg.gmm.dim}-D mixture, σ_ζ = {cfg.sigma_zeta}: {title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"gmm_{variant}_distances.png"), dpi=110)
    plt.close(fig)
    if cfg.gmm.dim != 2:
        return
    names = ["p_data", "clean", "noisy"] + [f"round {k}" for k in (0, 1, 2, cfg.rounds)
                                             if f"round {k}" in scatter]
    names = list(dict.fromkeys(names))
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8))
    for ax, name in zip(axes, names, strict=True):
        pts = scatter[name][:2000]
        ax.scatter(pts[:, 0], pts[:, 1], s=2 if len(pts) > 100 else 8, alpha=0.5)
        ax.set_xlim(-1.3, 1.3)
        ax.set_ylim(-1.3, 1.3)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"gmm_{variant}_scatter.png"), dpi=110)
    plt.close(fig)


def seeds_table(results: list[dict]) -> str:
    """Markdown: SFBD round k beside online SFBD at round k's compute (each refresh rule the
    runs hold), mean ± 95% interval over the runs (seeds) in ``results``, and the paired
    differences online − SFBD (with both rules, also adaptive − fixed)."""
    import tables

    columns = (("swd", "sliced W₁ ↓", 4), ("frechet", "Fréchet ↓", 4),
               ("mean_log_density", "mean log p_data ↑", 3))
    lines = ["| compute | method | " + " | ".join(h for _, h, _ in columns)
             + " | online − SFBD: sliced W₁ | online − SFBD: mean log p_data | seeds |",
             "|---|---|" + "---|" * len(columns) + "---|---|---|"]
    rounds = sorted({r["round"] for res in results for r in res["rows"] if "round" in r})
    seeds = ",".join(str(res["config"]["seed"]) for res in results)
    rules = [rule for rule in ("fixed", "adaptive")
             if all(any(r.get("online_rule", "fixed") == rule for r in res["rows"]
                        if "online_round" in r) for res in results)]

    def paired(a, b):
        return [tables.fmt([x[key] - y[key] for x, y in zip(a, b, strict=True)], digits)
                for key, digits in (("swd", 4), ("mean_log_density", 3))]

    for k in rounds:
        sf = [next(r for r in res["rows"] if r.get("round") == k) for res in results]
        label = "pretrained" if k == 0 else f"round {k}"
        lines.append(f"| {label} | SFBD | " + " | ".join(tables.cells(sf, columns))
                     + f" | | | {seeds} |")
        found = {}
        for rule in rules:
            on = [next((r for r in res["rows"] if r.get("online_round") == k
                        and r.get("online_rule", "fixed") == rule), None) for res in results]
            if not k or not all(on):
                continue
            found[rule] = on
            name = "online SFBD" if rules == ["fixed"] else f"online SFBD, {rule} refresh"
            diffs = paired(on, sf)
            lines.append(f"| {label} | {name} | " + " | ".join(tables.cells(on, columns))
                         + f" | {diffs[0]} | {diffs[1]} | {seeds} |")
        if len(found) == 2:
            diffs = paired(found["adaptive"], found["fixed"])
            lines.append(f"| {label} | adaptive − fixed (paired) | " + " | " * (len(columns) - 1)
                         + f" | {diffs[0]} | {diffs[1]} | {seeds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from configs import gmm_convergence

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="2d", help="'2d', '16d' or 'smoke'")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--online_rules", default=None,
                        help="online SFBD refresh rules to run, e.g. 'fixed,adaptive' "
                             "(default: the config's online_refresh_rules)")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="tabulate finished runs (OUT/gmm_<variant>.json of several seeds) "
                             "instead of running")
    args = parser.parse_args(argv)
    if args.table:
        results = []
        for path in args.table:
            with open(path) as f:
                results.append(json.load(f))
        text = seeds_table(results)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"gmm_{args.variant}_seeds.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        return {"table": text}
    cfg = gmm_convergence.get_config(args.variant)
    cfg.seed = args.seed
    if args.online_rules:
        cfg.online_refresh_rules = tuple(args.online_rules.split(","))
    unknown = set(cfg.online_refresh_rules) - {"fixed", "adaptive"}
    if unknown:
        raise ValueError(f"unknown online refresh rules {sorted(unknown)}: 'fixed', 'adaptive'")
    return run(cfg, args.out, args.variant)


if __name__ == "__main__":
    main()
