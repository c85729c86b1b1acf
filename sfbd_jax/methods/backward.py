"""SFBD's backward step (METHODS.md §2a): denoise *every* noisy image from σ_ζ to 0 (or, with
``sfbd.backward = 'dps'``, EMDiffusion's E-step: a posterior sample of every noisy image).

The noisy set is cut into output shards of ``shard_size`` rows; each shard is denoised in global
batches sharded over the mesh (the last partial batch is padded with copies of its last row and
the padding dropped), written as a checksummed ``.npy`` shard, and recorded in
``progress.json``. A re-run reuses every shard already recorded whose checksum still matches, so
a killed denoising pass resumes where it stopped. The pass ends with a count check: the shards
must cover rows 0..N−1 exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

from sfbd_jax.data import shards
from sfbd_jax.diffusion import sampler as sampler_lib
from sfbd_jax.utils import devices, jsonfile

PROGRESS = "progress.json"
SampleFn = Callable[[object, jax.Array, object, jax.Array], jax.Array]


class CountCheckError(RuntimeError):
    """The denoised set does not hold every noisy image exactly once."""


def check_complete(entries: list[dict], num_rows: int) -> None:
    """Raise CountCheckError unless the shard ``entries`` (with ``start``/``rows``) cover rows
    0..num_rows−1 exactly once, in order."""
    position = 0
    for e in sorted(entries, key=lambda e: e["start"]):
        if e["start"] != position:
            kind = "missing" if e["start"] > position else "duplicated"
            raise CountCheckError(f"denoised set: rows {min(position, e['start'])}.."
                                  f"{max(position, e['start']) - 1} are {kind} "
                                  f"(shard {e['file']} starts at {e['start']})")
        position += e["rows"]
    if position != num_rows:
        raise CountCheckError(f"denoised set holds {position} images, the noisy set {num_rows}")


class BackwardSampler(NamedTuple):
    """The backward step's sampler and what it costs per noisy image."""

    sample: SampleFn  # sample(params, y, labels, key) -> reconstructions, batch-sharded
    sigmas: np.ndarray  # its σ grid (decreasing, ending in 0)
    evaluations_per_image: int  # denoiser evaluations
    gradients_per_image: int  # of which also differentiated (DPS: every one)


def backward_grid(config, sigma_zeta: float) -> np.ndarray:
    """The σ grid of the backward step (decreasing, ending in 0), by ``config.sfbd.backward``:
    'ode': the Karras grid of ``sfbd.backward_num_steps`` levels truncated below σ_ζ, starting
    at σ_ζ (``sigmas_from_level``); 'dps': the Karras grid of ``sfbd.dps_num_steps`` levels
    from σ_max."""
    cfg, sc = config.sfbd, config.sampler
    if cfg.backward == "dps":
        return sampler_lib.karras_sigmas(cfg.dps_num_steps, sc.sigma_min, sc.sigma_max, sc.rho)
    if cfg.backward != "ode":
        raise ValueError(f"config.sfbd.backward must be 'ode' or 'dps', got {cfg.backward!r}")
    return sampler_lib.sigmas_from_level(sigma_zeta, cfg.backward_num_steps, sc.sigma_min,
                                         sc.sigma_max, sc.rho)


def cost_per_image(config, sigma_zeta: float) -> tuple[int, int]:
    """(denoiser evaluations, of which differentiated) that the backward step spends on one
    noisy image."""
    return _cost_on_grid(config, backward_grid(config, sigma_zeta))


def _cost_on_grid(config, sigmas) -> tuple[int, int]:
    if config.sfbd.backward == "dps":
        n = sampler_lib.num_dps_evaluations(sigmas)
        return n, n
    return sampler_lib.num_evaluations(sigmas), 0


def make_backward_sampler(denoise, mesh, config, sigma_zeta: float) -> BackwardSampler:
    """The sharded sampler of the backward step on ``backward_grid``, by
    ``config.sfbd.backward``: 'ode' (SFBD): the Heun sampler from y at σ_ζ, with
    ``sfbd.backward_churn`` and the sampler's churn window (``config.sampler``); 'dps'
    (EMDiffusion's E-step): diffusion posterior sampling guided by y (``sampler.dps_sample``
    with ``sfbd.dps_*``)."""
    cfg, sc = config.sfbd, config.sampler
    sigmas = backward_grid(config, sigma_zeta)
    if cfg.backward == "dps":
        prior = config.diffusion.sigma_data if cfg.dps_prior_variance else 0.0
        sample = sampler_lib.make_sharded_dps_sampler(
            denoise, mesh, sigmas, cfg.dps_zeta, guidance=cfg.dps_guidance,
            noise_sigma=sigma_zeta, prior_sigma=prior)
    else:
        sample = sampler_lib.make_sharded_sampler(
            denoise, mesh, sigmas, s_churn=cfg.backward_churn, s_tmin=sc.s_tmin,
            s_tmax=sc.s_tmax, s_noise=sc.s_noise)
    return BackwardSampler(sample, sigmas, *_cost_on_grid(config, sigmas))


def shared_backward_sampler(experiment, sigma_zeta: float) -> BackwardSampler:
    """``make_backward_sampler`` for ``experiment``'s config, built once per process for
    equal program keys (``loop.program_config``) and σ_ζ: every round, and a resumed run,
    reuse its traced and compiled programs."""
    programs = experiment.programs
    return programs.get(("backward", float(sigma_zeta)), lambda: make_backward_sampler(
        experiment.denoise, experiment.mesh, programs.config, sigma_zeta))


def backward_settings(config) -> dict:
    """The keys of the backward step that a finished pass depends on (part of the record that
    decides whether denoised shards or refreshes may be reused). The keys of the 'dps' step
    appear only when it is chosen, so records of 'ode' passes keep their old form."""
    cfg = config.sfbd
    if cfg.backward == "ode":
        return {}
    return {"backward": cfg.backward, "dps_num_steps": cfg.dps_num_steps,
            "dps_guidance": cfg.dps_guidance, "dps_zeta": cfg.dps_zeta,
            "dps_prior_variance": cfg.dps_prior_variance}


def denoise_rows(sample: SampleFn, params, noisy, rows: np.ndarray, *, mesh, batch_size: int,
                 key: jax.Array, labels: np.ndarray | None = None,
                 on_batch: Callable[[int], None] | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """``noisy[rows]`` (len(rows), H, W, C) denoised with ``sample(params, x, labels, key)``
    in global batches of ``batch_size`` sharded over ``mesh``; the batch starting at position
    i of ``rows`` uses the key ``fold_in(key, rows[i])``. A last partial batch is padded with
    copies of its last row (dropped again). Each process reads only its devices' rows (from a
    memory-mapped set: only those pages); every process gets the whole result, float32 or
    written into ``out`` (len(rows), H, W, C) of any float dtype, e.g. a memory-mapped shard.
    ``on_batch`` is called with the number of rows done after every batch."""
    devices.check_divisible(batch_size, mesh, "the denoising batch size")
    sharding = devices.batch_sharding(mesh)
    result = np.empty((len(rows), *noisy.shape[1:]), np.float32) if out is None else out
    if result.shape != (len(rows), *noisy.shape[1:]):
        raise ValueError(f"out has shape {result.shape}, expected {(len(rows), *noisy.shape[1:])}")
    for i in range(0, len(rows), batch_size):
        part = np.asarray(rows[i:i + batch_size])
        padded = np.concatenate([part, np.full(batch_size - len(part), part[-1])])
        local = padded[devices.process_rows(sharding, (batch_size,), 0)]
        x = jax.make_array_from_process_local_data(
            sharding, np.asarray(noisy[local], np.float32), (batch_size, *noisy.shape[1:]))
        y = None
        if labels is not None:
            y = jax.make_array_from_process_local_data(
                sharding, np.asarray(labels[local], np.int32), (batch_size,))
        out = sample(params, x, y, jax.random.fold_in(key, int(part[0])))
        result[i:i + len(part)] = devices.to_host(out)[: len(part)]
        if on_batch is not None:
            on_batch(i + len(part))
    return result


def denoise_set(sample: SampleFn, params, noisy, out_dir: str, *, mesh, batch_size: int,
                shard_size: int, key: jax.Array, settings: dict,
                labels: np.ndarray | None = None,
                on_progress: Callable[[int], None] | None = None,
                store_dtype: str = "float32") -> list[dict]:
    """Denoise every row of ``noisy`` (N, H, W, C; an array or a lazy ShardedArray) with
    ``sample(params, x, labels, key)`` (e.g. the sharded sampler on ``sigmas_from_level``) into
    shards under ``out_dir``; returns the shard entries (``file``, ``rows``, ``sha256``,
    ``start``). ``labels`` (N,): the class of each row, for a class-conditional model
    (conditional SFBD). ``settings`` identifies the pass (round, σ_ζ, grid, …): recorded shards made
    with other settings are never reused. ``on_progress`` is called with the number of rows
    done (reused shards included) after every batch. Shards hold ``store_dtype`` values
    (config.sfbd.denoised_dtype; recorded shards of another dtype are reused as they are)."""
    devices.check_divisible(batch_size, mesh, "the denoising batch size")
    if shard_size % batch_size:
        raise ValueError(f"denoising shard size {shard_size} must be a multiple of the batch "
                         f"size {batch_size}")
    n = len(noisy)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} noisy images")
    os.makedirs(out_dir, exist_ok=True)
    progress = jsonfile.read_json(os.path.join(out_dir, PROGRESS), {})
    if progress.get("settings") not in (None, settings):
        old = progress["settings"]
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        logging.warning("%s holds a denoising pass made with other inputs (%s): recomputing "
                        "every shard.", out_dir, "; ".join(
                            f"{k}: {old.get(k)!r} → {settings.get(k)!r}" for k in changed))
        progress = {}
    done = {e["start"]: e for e in progress.get("shards", [])}
    # Every process must take the same decisions below (which shards to redo): none may start
    # before all have read the record that process 0 is about to extend.
    devices.sync_processes(f"denoise-start:{out_dir}")
    entries = []
    report = on_progress or (lambda done: None)
    done_rows = 0
    for start in range(0, n, shard_size):
        stop = min(start + shard_size, n)
        entry = done.get(start)
        if entry is not None and entry["rows"] == stop - start:
            try:
                shards.verify_shard(out_dir, entry)
                entries.append(entry)
                done_rows += entry["rows"]
                continue
            except shards.CorruptShardError as err:
                logging.warning("Re-denoising rows %d..%d: %s", start, stop - 1, err)
        # Denoised straight into the shard's memory-mapped file (process 0; the others, which
        # write nothing, into memory): no float32 copy of the shard in host memory.
        name, shape = f"denoised-{start:09d}.npy", (stop - start, *noisy.shape[1:])
        writer = jax.process_index() == 0
        buffer = (shards.open_for_writing(out_dir, name, store_dtype, shape) if writer
                  else np.empty(shape, store_dtype))
        denoised = denoise_rows(sample, params, noisy, np.arange(start, stop), mesh=mesh,
                                batch_size=batch_size, key=key, labels=labels,
                                on_batch=lambda m, base=done_rows: report(base + m), out=buffer)
        done_rows += stop - start
        if len(denoised) != stop - start:
            raise CountCheckError(f"rows {start}..{stop - 1}: denoised {len(denoised)} images")
        bad = shards.nonfinite_rows(denoised) + start
        if bad.size:
            if writer:
                del buffer, denoised
                os.remove(os.path.join(out_dir, name + ".partial"))
            raise FloatingPointError(
                f"the backward pass produced NaN or infinite images for {bad.size} noisy "
                f"row(s) ({', '.join(map(str, bad[:10]))}{', …' if bad.size > 10 else ''}); "
                f"nothing was written for rows {start}..{stop - 1}. The model that denoises "
                "has diverged: check the previous round's training loss.")
        if writer:  # written once; the others read the record below
            entry = shards.commit(out_dir, name, buffer)
            del buffer, denoised
            entry["start"] = start
            entries.append(entry)
            jsonfile.write_json(os.path.join(out_dir, PROGRESS),
                                {"settings": settings, "shards": entries})
    if jax.process_count() > 1:
        devices.sync_processes(f"denoise-end:{out_dir}")
        entries = jsonfile.read_json(os.path.join(out_dir, PROGRESS), {})["shards"]
    check_complete(entries, n)
    return entries
