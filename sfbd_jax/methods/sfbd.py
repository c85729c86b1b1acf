"""SFBD driver (METHODS.md §2): pretrain on the clean subset, then K rounds of
backward (denoise every noisy image from σ_ζ with the current EMA model) and forward (fine-tune
on the denoised ∪ clean set), on the shared ``Experiment`` machinery.

Run directory:
    checkpoints/          the training state (global step counts across phases)
    rounds/<k>/           each round's final state (0 = pretrained), kept
    denoised/round_<k>/   D^(k) as checksummed shards (+ progress.json while it is written)
    sfbd_progress.json    which phases are done
    sfbd_summary.json     per-round diagnostics
    data/                 the prepared data set, when config.corrupt.output_dir is empty

Kill it anywhere and re-run the same command: the latest checkpoint, the phase record and the
shards already denoised make it continue to the same result as an uninterrupted run.
Phase ends are global steps: pretrain ends at P = pretrain_images/B, round k's forward at
P + k·R with R = images_per_round/B, so the learning-rate warm-up (on the optimiser's step
count) does not restart unless ``sfbd.restart_warmup``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from sfbd_jax import config_checks
from sfbd_jax.data import pipeline, rows, shards
from sfbd_jax.data import prepare as prepare_lib
from sfbd_jax.data.prepared import PreparedDataset
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.diffusion import sampler as sampler_lib
from sfbd_jax.evaluation import denoising, training_sets
from sfbd_jax.evaluation import evaluator as evaluator_lib
from sfbd_jax.methods import backward
from sfbd_jax.training import loop
from sfbd_jax.training.state import TrainState
from sfbd_jax.utils import checkpoints, integrity, jsonfile
from sfbd_jax.utils import progress as progress_lib

PROGRESS = "sfbd_progress.json"
SUMMARY = "sfbd_summary.json"


def phase_steps(config) -> tuple[int, int]:
    """(pretrain steps P, steps per round R), whole dispatches."""
    b, k = config.train.batch_size, config.train.steps_per_dispatch
    p = config.sfbd.pretrain_images // b
    r = config.sfbd.images_per_round // b
    return p - p % k, r - r % k


def _write_json(path: str, value) -> None:
    """Run records are written by process 0 only."""
    if jax.process_index() == 0:
        jsonfile.write_json(path, value)


def union_dataset(denoised, noisy: ImageDataset, clean: ImageDataset,
                  clean_repeat: int) -> ImageDataset:
    """D^(k) ∪ D_clean for the forward step: denoised images clipped to [-1, 1], the clean
    subset repeated ``clean_repeat`` times (1 = uniform over the union, as the reference).

    An index-level union (``rows.ConcatenatedRows``): the denoised set (memory-mapped shards
    or an array) and the clean subset are read per batch, never concatenated or repeated in
    host memory; only the labels (int32) are."""
    images = rows.ConcatenatedRows(
        [denoised] + [clean.images] * clean_repeat,
        [rows.clip_to_image_range] + [None] * clean_repeat, name="denoised+clean")
    labels = None
    if noisy.labels is not None and clean.labels is not None:
        labels = np.concatenate([noisy.labels] + [clean.labels] * clean_repeat)
    return ImageDataset(images, labels, clean.num_classes, "denoised+clean")


class SFBDRun:
    """One SFBD run in ``workdir`` (see the module docstring)."""

    def __init__(self, config, workdir: str):
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.experiment = loop.Experiment(config)
        config_checks.check_sfbd(config)
        self.pretrain_steps, self.round_steps = phase_steps(config)
        self.data_dir = config.corrupt.output_dir or os.path.join(self.workdir, "data")
        # Per-round metrics: built now, so a missing weight file or unlabelled data for the
        # feature classifier stops the run before any training.
        self._evaluator = (evaluator_lib.Evaluator(config, self.experiment.mesh)
                           if config.eval.round_num_samples > 0 else None)

    def plan(self, num_noisy: int, sigma_zeta: float, writer=None) -> progress_lib.RunProgress:
        """The run's phases for the progress line: pretraining, then per round the backward
        pass over every noisy image and the forward fine-tuning (and the round's metrics when
        eval.round_num_samples > 0)."""
        cfg, b = self.config, self.config.train.batch_size
        rounds = cfg.sfbd.rounds
        evaluations, gradients = backward.cost_per_image(cfg, sigma_zeta)
        sample_cost = sampler_lib.num_evaluations(self.experiment.sample_grid())
        Phase = progress_lib.Phase

        def metrics(k: int) -> list:
            n = cfg.eval.round_num_samples
            return ([Phase(f"round{k}/metrics", f"round {k}/{rounds} metrics", "sample", n,
                           sample_cost)] if n > 0 else [])

        phases = [Phase("pretrain", "pretrain", "train", self.pretrain_steps * b), *metrics(0)]
        for k in range(1, rounds + 1):
            phases += [Phase(f"round{k}/backward", f"round {k}/{rounds} backward", "denoise",
                             num_noisy, evaluations + 2 * gradients),
                       Phase(f"round{k}", f"round {k}/{rounds} forward", "train",
                             self.round_steps * b), *metrics(k)]
        return progress_lib.RunProgress(phases, writer=writer,
                                        every_secs=cfg.train.progress_every_secs)

    def end_step(self, k: int) -> int:
        """Global step at which round k (0 = pretraining) ends."""
        return self.pretrain_steps + k * self.round_steps

    def run(self) -> TrainState:
        config, exp = self.config, self.experiment
        loop.write_run_config(config, self.workdir)
        config = prepare_lib.with_output_dir(config, self.workdir)  # self.data_dir
        prepare_lib.prepare_on_main_process(config)  # a no-op when already prepared
        # Both sets memory-mapped: pretraining and every forward step read their batches'
        # rows from the shards (the denoised sets too), never a whole-set copy.
        data = PreparedDataset(self.data_dir, lazy=True)
        clean = data.clean()
        noisy, _ = data.noisy()
        sigma_zeta = float(data.manifest["settings"]["corruption"]["sigma"])
        self._sigma_zeta, self._num_noisy = sigma_zeta, len(noisy)
        logging.info("SFBD on %s: %d clean + %d noisy images, σ_ζ = %g, %d rounds.",
                     data.manifest["source_name"], len(clean), len(noisy), sigma_zeta,
                     config.sfbd.rounds)

        writer = metric_writers.create_default_writer(self.workdir,
                                                      just_logging=jax.process_index() > 0)
        self.progress = self.plan(len(noisy), sigma_zeta,
                                  progress_lib.tensorboard_writer(self.workdir))
        ckpt = checkpoints.Checkpointer.for_training(
            os.path.join(self.workdir, "checkpoints"), config.train)
        rounds_ckpt = checkpoints.Checkpointer(os.path.join(self.workdir, "rounds"), None,
                                               enable_async=False)
        self.rounds_ckpt = rounds_ckpt
        progress_path = os.path.join(self.workdir, PROGRESS)
        progress = jsonfile.read_json(progress_path, {"done": []})
        summary = jsonfile.read_json(os.path.join(self.workdir, SUMMARY), [])
        try:
            state = self._restore_or_init(ckpt, progress)
            with metric_writers.ensure_flushes(writer):
                # Pretraining (round 0).
                if int(state.step) < self.end_step(0):
                    state = exp.train(state, clean, end_step=self.end_step(0),
                                      phase_start_step=0, data_seed=config.seed,
                                      checkpointer=ckpt, writer=writer, workdir=self.workdir,
                                      tag="pretrain", progress=self.progress)
                if "pretrain" not in progress["done"]:
                    summary = self._finish_round(0, state, rounds_ckpt, writer, summary, None)
                    progress["done"].append("pretrain")
                    _write_json(progress_path, progress)
                for k in range(1, config.sfbd.rounds + 1):
                    if f"round{k}/forward" in progress["done"]:
                        continue
                    denoised = self._backward(k, state, noisy, sigma_zeta)
                    if f"round{k}/backward" not in progress["done"]:
                        progress["done"].append(f"round{k}/backward")
                        _write_json(progress_path, progress)
                    start = self.end_step(k - 1)
                    if config.sfbd.restart_warmup and int(state.step) == start:
                        state = state.replace(opt_state=exp.optimizer.init(state.params))
                    if int(state.step) < self.end_step(k):
                        train_set = union_dataset(denoised, noisy, clean,
                                                  config.sfbd.clean_repeat)
                        state = exp.train(state, train_set, end_step=self.end_step(k),
                                          phase_start_step=start,
                                          data_seed=config.seed + 7919 * k, checkpointer=ckpt,
                                          writer=writer, workdir=self.workdir,
                                          tag=f"round{k}", progress=self.progress)
                    summary = self._finish_round(k, state, rounds_ckpt, writer, summary,
                                                 denoised)
                    progress["done"].append(f"round{k}/forward")
                    _write_json(progress_path, progress)
        finally:
            ckpt.close()
            rounds_ckpt.close()
            self.progress.close()
        self._log_table(summary)
        return state

    def _restore_or_init(self, ckpt: checkpoints.Checkpointer, progress: dict) -> TrainState:
        """Resume within the current phase. With the fallback switch on, a damaged checkpoint
        is replaced by the newest intact one of this phase, else by the state that ended the
        last finished round (rounds/<k>), never by one of an earlier phase."""
        done = [0] if "pretrain" in progress["done"] else []
        done += [k for k in range(1, self.config.sfbd.rounds + 1)
                 if f"round{k}/forward" in progress["done"]]
        earliest = self.end_step(max(done)) if done else 0
        try:
            return self.experiment.restore_or_init(ckpt, earliest)
        except checkpoints.CheckpointError as err:
            if not (ckpt.fallback and done):
                raise
            ckpt.set_aside(list(err.damaged_steps))
            logging.warning("No intact checkpoint of the current phase: resuming from the "
                            "state that ended round %d (rounds/%d).", max(done), max(done))
            return self.rounds_ckpt.restore(max(done), self.experiment.abstract_state())

    # ----- phases -----------------------------------------------------------------------
    def _backward(self, k: int, state: TrainState, noisy: ImageDataset,
                  sigma_zeta: float) -> shards.ShardedArray:
        """D^(k): every noisy image denoised from σ_ζ with the EMA of the state that ended
        round k−1 (restored from rounds/<k−1> when the run resumes mid-forward), as its
        memory-mapped shards."""
        cfg = self.config.sfbd
        if int(state.step) != self.end_step(k - 1):
            state = self.rounds_ckpt.restore(k - 1, self.experiment.abstract_state())
        sampler = backward.shared_backward_sampler(self.experiment, sigma_zeta)
        settings = {"round": k, "sigma_zeta": sigma_zeta, **backward.backward_settings(self.config),
                    "num_steps": cfg.backward_num_steps, "churn": cfg.backward_churn,
                    "batch_size": cfg.denoise_batch_size, "seed": self.config.seed,
                    "model_step": self.end_step(k - 1),
                    "model_sha256": integrity.tree_digest(state.ema_params),
                    "noisy_shards": prepare_lib.shards_digest(
                        prepare_lib.read_manifest(self.data_dir), ("noisy",))}
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 1000 + k)
        labels = None
        if self.config.model.num_classes > 0:  # conditional SFBD: denoise given each label
            pipeline.validate_labels(noisy.labels, self.config.model.num_classes, "noisy")
            labels = noisy.labels
        out_dir = os.path.join(self.workdir, "denoised", f"round_{k}")
        self.progress.begin(f"round{k}/backward")
        self.progress.note(f"Round {k}/{cfg.rounds} backward: denoising {len(noisy):,} noisy "
                           f"images from σ_ζ = {sigma_zeta:g} ({sampler.evaluations_per_image} "
                           "network evaluations each; the first batch compiles the sampler).")
        entries = backward.denoise_set(sampler.sample, state.ema_params, noisy.images, out_dir,
                                       mesh=self.experiment.mesh,
                                       batch_size=cfg.denoise_batch_size,
                                       shard_size=cfg.denoise_shard_size, key=key,
                                       settings=settings, labels=labels,
                                       on_progress=self.progress.update,
                                       store_dtype=cfg.denoised_dtype)
        self.progress.end()
        # Memory-mapped: the forward step reads its batches' rows from the shards.
        return shards.ShardedArray(out_dir, entries, verify=jax.process_index() == 0)

    def _finish_round(self, k, state, rounds_ckpt, writer, summary, denoised) -> list:
        """Keep round k's state, write its samples and diagnostics."""
        if k not in rounds_ckpt.all_steps():
            rounds_ckpt.save(k, state)
            rounds_ckpt.wait()
        row = {"round": k, "step": int(state.step), "images_seen": int(state.images_seen),
               "train_loss": loop.phase_end_loss(self.workdir, "pretrain" if k == 0
                                                 else f"round{k}", int(state.step))}
        if k > 0:  # the backward passes' cost so far (rounds 1..k, every noisy image)
            evaluations, gradients = backward.cost_per_image(self.config, self._sigma_zeta)
            row.update(denoise_evaluations=k * self._num_noisy * evaluations,
                       denoise_gradients=k * self._num_noisy * gradients)
        if denoised is not None:
            quality = denoising.against_originals(self.data_dir, denoised)
            row.update(denoised_mse=quality["mse"], denoised_psnr=quality["psnr"],
                       denoised_clipped_fraction=quality["clipped_fraction"])
        elif k == 0:
            noisy, _ = PreparedDataset(self.data_dir, lazy=True).noisy()
            quality = denoising.against_originals(self.data_dir, noisy.images)
            row.update(noisy_mse=quality["mse"], noisy_psnr=quality["psnr"])
        if self.config.eval.round_num_samples > 0:
            self.progress.begin(f"round{k}/metrics", timed_from_start=True)
            row.update(self._metrics(state, k))
            self.progress.end()
        if self.config.sfbd.eval_every_round or k == self.config.sfbd.rounds:
            row["samples"] = self.experiment.write_samples(state, self.workdir, writer,
                                                           f"round{k}")
        writer.write_scalars(k, {f"sfbd/{n}": v for n, v in row.items()
                                 if isinstance(v, float)})
        summary = [r for r in summary if r["round"] != k] + [row]
        _write_json(os.path.join(self.workdir, SUMMARY), summary)
        return summary

    def _metrics(self, state: TrainState, k: int) -> dict:
        """config.eval.metrics of round samples (the same key every round); memorisation
        against the clean subset, the most-copied samples in eval/copies_round<k>.png."""
        train = training_sets.run_training_images(self.config, self.workdir)
        result = self._evaluator.evaluate_model(
            self.experiment, state.ema_params, self.config.eval.round_num_samples,
            evaluator_lib.evaluation_key(self.config), train=train,
            copies_path=os.path.join(self.workdir, "eval", f"copies_round{k}.png"))
        return evaluator_lib.without_timings(result)

    @staticmethod
    def _log_table(summary: list) -> None:
        short = {"classifier_fd": "classifier_fd", "swd": "swd", "fid": "fid", "kid": "kid",
                 "noise_sigma": "noise",
                 "memorised_fraction_train_pixel": "memorised", "d1_ratio_train_pixel": "d1_ratio",
                 "precision": "precision", "recall": "recall", "coverage": "coverage"}
        metric_names = [m for m in short if any(m in r for r in summary)]
        lines = ["round  step     train_loss  denoised_PSNR  denoised_MSE"
                 + "".join(f"  {short[m]:>13}" for m in metric_names)]
        for r in sorted(summary, key=lambda r: r["round"]):
            psnr = r.get("denoised_psnr", r.get("noisy_psnr", float("nan")))
            mse = r.get("denoised_mse", r.get("noisy_mse", float("nan")))
            note = "  (noisy set)" if "noisy_psnr" in r else ""
            lines.append(f"{r['round']:>5}  {r['step']:>7}  {r['train_loss']:>10.3f}  "
                         f"{psnr:>13.2f}  {mse:>12.5f}"
                         + "".join(f"  {r.get(m, float('nan')):>13.4g}" for m in metric_names)
                         + note)
        logging.info("SFBD summary:\n%s", "\n".join(lines))


def run_sfbd(config, workdir: str) -> TrainState:
    """Entry for config.mode == 'sfbd'."""
    return SFBDRun(config, workdir).run()
