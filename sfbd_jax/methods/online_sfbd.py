"""Online SFBD (SFBD flow, Lu, Lo & Yu 2026; METHODS.md §2, "online"): SFBD without rounds.

Pretrain on the clean subset (exactly ``mode=sfbd``'s round 0), then train without stopping on
the clean subset ∪ a *denoised buffer* holding one entry per noisy image:

- before every m-th online step (m = ``online.refresh_every_steps``; online steps count from
  the end of pretraining, the first refresh comes before online step 0), refresh j denoises
  ``online.refresh_count`` = c noisy images with SFBD's backward step (the probability-flow ODE
  from σ_ζ, ``sfbd.backward_*`` and the sampler's grid options) using the current EMA
  parameters (``online.denoise_with``), and writes them over their buffer entries. Refresh j
  takes positions j·c … j·c + c − 1 (mod N) of one seeded permutation of the N noisy images,
  so every ⌈N/c⌉ refreshes cover every image, each once per cycle;
- each example of a training batch is a buffer entry with probability w·n / (N_clean + w·n)
  (n = entries denoised so far; never-denoised entries are never drawn), else a clean image,
  all drawn uniformly with replacement from a generator seeded by (seed, step); w ramps
  linearly from 0 at online step ``ramp_start`` to 1 at ``ramp_end`` (w = 1: uniform over
  clean ∪ buffer, as round-based SFBD). ``online.clean_share`` > 0 makes the buffer share
  w·(1 − clean_share) instead. Training sees denoised images clipped to [-1, 1], as SFBD;
- ``online.refresh_rule``: 'fixed' writes every denoised image of a refresh. 'adaptive' treats
  them as candidates: of the k candidates whose rows were denoised before, a share
  q = clip((KID_old − KID_new) / KID_old, 0, 1) is written (a seeded choice of round(q·k)),
  KID_old / KID_new the unbiased MMD² (KID's cubic kernel, all rows, no subsets) of the
  entries they would replace / of the candidates against the clean subset, in
  ``online.adaptive_features`` (pixels or Inception); candidates for rows never denoised are
  always written (so coverage is the fixed rule's), and so are all when k < 2.

Run directory (beside the usual checkpoints/, samples/, eval/):
    online/refresh_<j>.npy  refresh j's committed denoised images (≤ c, H, W, C), unclipped
    online/refresh_<j>.json its step, committed rows (noisy-set indices), sha256 and, for the
                            adaptive rule, its KIDs and q (written last: the refresh is
                            complete)
    online/settings.json    what the refreshes depend on; a resumed run must match it
    online_summary.json     metrics at the end of pretraining, every online.eval_every_steps
                            and at the end

The buffer is held in host memory (N images; 50,000 CIFAR-10 images: 0.6 GB) and is a function
of the refreshes made before the current step, so it is not checkpointed: a resumed run rebuilds
it from the refresh files before its checkpoint's step, taking each entry from the latest
refresh that committed it (one cycle of ⌈N/c⌉ files under the fixed rule; files made after that
step are dropped and recomputed identically), which makes a killed run end bit-identical to an
uninterrupted one. Files no retained checkpoint can need (every row they committed was committed
again before the oldest retained checkpoint) are deleted as training goes on.
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from sfbd_jax import config_checks
from sfbd_jax.data import pipeline, shards
from sfbd_jax.data import prepare as prepare_lib
from sfbd_jax.data import rows as rows_lib
from sfbd_jax.data.eval_only import load_clean_originals
from sfbd_jax.data.prepared import PreparedDataset
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.evaluation import denoising, distances, training_sets
from sfbd_jax.evaluation import evaluator as evaluator_lib
from sfbd_jax.evaluation import features as features_lib
from sfbd_jax.methods import backward
from sfbd_jax.methods.sfbd import phase_steps
from sfbd_jax.training import loop
from sfbd_jax.training.state import TrainState
from sfbd_jax.utils import checkpoints, devices, integrity, jsonfile
from sfbd_jax.utils import progress as progress_lib

SUMMARY = "online_summary.json"
_ORDER_STREAM, _BATCH_STREAM, _REFRESH_STREAM, _COMMIT_STREAM = 4099, 31337, 2_000_003, 7727


# ----- the schedule: pure functions of the config --------------------------------------------
def refresh_order(num_noisy: int, seed: int) -> np.ndarray:
    """The seeded permutation of the noisy images that the refreshes walk through, cyclically."""
    return np.random.default_rng([seed, _ORDER_STREAM]).permutation(num_noisy)


def refresh_rows(order: np.ndarray, j: int, count: int) -> np.ndarray:
    """Noisy-set rows (count,) that refresh j denoises: positions j·count … (mod N) of
    ``order``; distinct while count ≤ N."""
    return order[np.arange(j * count, (j + 1) * count) % len(order)]


def refreshes_before(online_step: int, every: int) -> int:
    """Refreshes made before training step ``online_step`` runs (one before steps 0, m, 2m…,
    so ⌈online_step / m⌉ of them precede a checkpoint taken at that step)."""
    return -(-online_step // every) if online_step > 0 else 0


def covered(num_refreshes: int, count: int, num_noisy: int) -> int:
    """Buffer entries denoised at least once after ``num_refreshes`` refreshes: the first
    that-many positions of the order."""
    return min(num_noisy, num_refreshes * count)


def buffer_weight(online_step: int, ramp_start: int, ramp_end: int) -> float:
    """w ∈ [0, 1]: 0 up to ``ramp_start``, linear to 1 at ``ramp_end``, 1 after."""
    if online_step >= ramp_end:
        return 1.0
    if online_step <= ramp_start:
        return 0.0
    return (online_step - ramp_start) / (ramp_end - ramp_start)


def buffer_probability(weight: float, num_covered: int, num_clean: int,
                       clean_share: float) -> float:
    """Probability that a training example is a buffer entry."""
    if num_covered == 0 or weight == 0.0:
        return 0.0
    if clean_share > 0.0:
        return weight * (1.0 - clean_share)
    return weight * num_covered / (num_clean + weight * num_covered)


def commit_fraction(kid_replaced: float, kid_candidates: float) -> float:
    """q ∈ [0, 1] of the adaptive rule: the candidates' relative KID improvement over the
    entries they would replace, (KID_old − KID_new) / KID_old clipped to [0, 1]; 0 when the
    candidates are no closer, 1 when they are closer and KID_old ≤ 0 (estimator noise)."""
    gain = kid_replaced - kid_candidates
    if not gain > 0.0:
        return 0.0
    if kid_replaced <= 0.0:
        return 1.0
    return min(1.0, gain / kid_replaced)


def committed_positions(previously_denoised: np.ndarray, q: float, seed: int,
                        j: int) -> np.ndarray:
    """Bool (c,): which of refresh j's c candidates are written — all whose rows were never
    denoised (``previously_denoised`` False), and round(q·k) (halves up) of the k others, the
    first of a permutation seeded by (seed, j)."""
    mask = ~np.asarray(previously_denoised, bool)
    before = np.flatnonzero(previously_denoised)
    take = math.floor(q * len(before) + 0.5)
    mask[np.random.default_rng([seed, _COMMIT_STREAM, j]).permutation(before)[:take]] = True
    return mask


def adaptive_commit(before: np.ndarray, replaced: np.ndarray, candidates: np.ndarray,
                    clean_features: np.ndarray, features, seed: int,
                    j: int) -> tuple[np.ndarray, dict]:
    """The adaptive rule for refresh j (module docstring): bool (c,) — which candidates to
    commit — and the numbers behind the choice. ``before``: (c,) whether each row was denoised
    before; ``replaced`` / ``candidates``: the rows' current entries and new images as training
    sees them; ``features``: images → (n, D), applied only when q is needed (k ≥ 2)."""
    decision = {"candidates_seen_before": int(before.sum())}
    q = 1.0
    if before.sum() >= 2:
        kid_new = distances.mmd2_unbiased(features(candidates[before]), clean_features)
        kid_old = distances.mmd2_unbiased(features(replaced[before]), clean_features)
        q = commit_fraction(kid_old, kid_new)
        decision.update(kid_replaced=kid_old, kid_candidates=kid_new)
    commit = committed_positions(before, q, seed, j)
    decision.update(commit_fraction=q, committed=int(commit.sum()))
    return commit, decision


class OnlineBatches(pipeline.TrainBatches):
    """Batches over ``union`` = clean images (rows 0..N_clean−1) then the buffer (one row per
    noisy image); ``draw(u)`` for online step u follows the module docstring."""

    def __init__(self, union: ImageDataset, num_clean: int, order: np.ndarray, online_cfg,
                 batch_size: int, steps_per_dispatch: int, seed: int, mesh, num_classes: int,
                 random_flip: bool):
        super().__init__(union, batch_size, steps_per_dispatch, seed, mesh, num_classes,
                         random_flip)
        self.num_clean, self.order, self.cfg = num_clean, order, online_cfg
        self.batch_size = batch_size

    def buffer_share(self, online_step: int) -> tuple[float, int, float]:
        """(w, entries covered, probability of a buffer example) at ``online_step``."""
        cfg = self.cfg
        n = covered(online_step // cfg.refresh_every_steps + 1, cfg.refresh_count,
                    len(self.order))
        w = buffer_weight(online_step, cfg.ramp_start, cfg.ramp_end)
        return w, n, buffer_probability(w, n, self.num_clean, cfg.clean_share)

    def draw(self, step: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        _, n, p = self.buffer_share(step)
        rng = np.random.default_rng([self.seed, _BATCH_STREAM, step])
        from_buffer = rng.random(self.batch_size) < p
        clean_rows = rng.integers(self.num_clean, size=self.batch_size)
        buffer_rows = self.num_clean + self.order[rng.integers(max(n, 1), size=self.batch_size)]
        return np.where(from_buffer, buffer_rows, clean_rows), {}


# ----- the run ------------------------------------------------------------------------------
class OnlineSFBDRun:
    """One online SFBD run in ``workdir`` (see the module docstring)."""

    def __init__(self, config, workdir: str):
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.experiment = loop.Experiment(config)
        config_checks.check_online(config)
        devices.check_divisible(config.sfbd.denoise_batch_size, self.experiment.mesh,
                                "config.sfbd.denoise_batch_size")
        self.pretrain_steps, _ = phase_steps(config)
        b, k = config.train.batch_size, config.train.steps_per_dispatch
        online_steps = config.online.train_images // b
        self.end_step = self.pretrain_steps + online_steps - online_steps % k
        self.data_dir = config.corrupt.output_dir or os.path.join(self.workdir, "data")
        self.refresh_dir = os.path.join(self.workdir, "online")
        self._evaluator = (evaluator_lib.Evaluator(config, self.experiment.mesh)
                           if config.eval.round_num_samples > 0 else None)

    # ----- driver -----------------------------------------------------------------------
    def run(self) -> TrainState:
        config, exp = self.config, self.experiment
        loop.write_run_config(config, self.workdir)
        config = prepare_lib.with_output_dir(config, self.workdir)
        prepare_lib.prepare_on_main_process(config)
        data = PreparedDataset(self.data_dir, lazy=True)  # batches read their rows
        clean = data.clean()
        noisy, _ = data.noisy()
        self.noisy = noisy
        self.sigma_zeta = float(data.manifest["settings"]["corruption"]["sigma"])
        oc = config.online
        if oc.refresh_count > len(noisy):
            raise ValueError(f"config.online.refresh_count={oc.refresh_count} is larger than "
                             f"the noisy set ({len(noisy)} images)")
        labels = None
        if config.model.num_classes > 0:
            pipeline.validate_labels(noisy.labels, config.model.num_classes, "noisy")
            labels = np.concatenate([clean.labels, noisy.labels])
        self.noisy_labels = noisy.labels if config.model.num_classes > 0 else None
        self.order = refresh_order(len(noisy), config.seed)
        self.num_clean = len(clean)
        # The buffer: the latest denoised version of every noisy image (unclipped), in a
        # writable memory map of this process (rebuilt from the refresh files on every start);
        # training reads clean ∪ buffer by index, the buffer clipped to [-1, 1].
        os.makedirs(self.refresh_dir, exist_ok=True)
        self.raw = np.lib.format.open_memmap(
            os.path.join(self.refresh_dir, f"buffer-process{jax.process_index()}.npy"),
            mode="w+", dtype=config.sfbd.denoised_dtype,
            shape=(len(noisy), *noisy.images.shape[1:]))
        parts = [clean.images, self.raw] if len(clean) else [self.raw]
        union = rows_lib.ConcatenatedRows(parts, [None, rows_lib.clip_to_image_range][-len(parts):],
                                      name="clean+buffer")
        self.union = union
        self.last_refresh_step = np.full(len(noisy), -1, np.int64)
        self._records: dict[int, dict] = {}  # refresh j → its record (committed rows, …)
        self._sample = self._make_sampler()
        self.refresh_seconds = 0.0  # this process's time in refreshes (not kept across resumes)
        self._check_settings()
        logging.info("Online SFBD on %s: %d clean + %d noisy images, σ_ζ = %g; %d images per "
                     "refresh every %d steps (%d network evaluations per image).",
                     data.manifest["source_name"], len(clean), len(noisy), self.sigma_zeta,
                     oc.refresh_count, oc.refresh_every_steps, self.evaluations_per_image)

        self.writer = metric_writers.create_default_writer(
            self.workdir, just_logging=jax.process_index() > 0)
        b = config.train.batch_size
        # Refreshes and evaluations run inside the online phase: its rate includes them.
        progress = progress_lib.RunProgress(
            [progress_lib.Phase("pretrain", "pretrain", "train", self.pretrain_steps * b),
             progress_lib.Phase("online", "online training with buffer refreshes", "train",
                                (self.end_step - self.pretrain_steps) * b)],
            writer=progress_lib.tensorboard_writer(self.workdir),
            every_secs=config.train.progress_every_secs)
        self.ckpt = checkpoints.Checkpointer.for_training(
            os.path.join(self.workdir, "checkpoints"), config.train)
        try:
            state = exp.restore_or_init(self.ckpt, 0)
            with metric_writers.ensure_flushes(self.writer):
                if int(state.step) < self.pretrain_steps:
                    state = exp.train(state, clean, end_step=self.pretrain_steps,
                                      phase_start_step=0, data_seed=config.seed,
                                      checkpointer=self.ckpt, writer=self.writer,
                                      workdir=self.workdir, tag="pretrain",
                                      progress=progress)
                if not self._evaluated(self.pretrain_steps):
                    self._evaluate(state, "pretrain")
                self._rebuild_buffer(int(state.step))
                batches = OnlineBatches(
                    ImageDataset(union, labels, clean.num_classes, "clean+buffer"),
                    len(clean), self.order, oc, config.train.batch_size,
                    config.train.steps_per_dispatch, config.seed + 7919, exp.mesh,
                    config.model.num_classes, config.data.random_flip)
                self._batches = batches
                if int(state.step) < self.end_step:
                    state = exp.train(state, batches.dataset, end_step=self.end_step,
                                      phase_start_step=self.pretrain_steps,
                                      data_seed=config.seed, checkpointer=self.ckpt,
                                      writer=self.writer, workdir=self.workdir, tag="online",
                                      batches=batches, before_dispatch=self._before_dispatch,
                                      progress=progress)
                if not self._evaluated(self.end_step):
                    self._evaluate(state, "online")
        finally:
            self.ckpt.close()
            progress.close()
        return state

    # ----- refreshes --------------------------------------------------------------------
    def _make_sampler(self):
        sampler = backward.shared_backward_sampler(self.experiment, self.sigma_zeta)
        self.evaluations_per_image = sampler.evaluations_per_image
        self.gradients_per_image = sampler.gradients_per_image
        return sampler.sample

    def _settings(self) -> dict:
        c = self.config
        return {"seed": c.seed, "refresh_every_steps": c.online.refresh_every_steps,
                "refresh_count": c.online.refresh_count, "pretrain_steps": self.pretrain_steps,
                "num_noisy": len(self.noisy), "sigma_zeta": self.sigma_zeta,
                **backward.backward_settings(c),
                "backward_num_steps": c.sfbd.backward_num_steps,
                "backward_churn": c.sfbd.backward_churn,
                "denoise_batch_size": c.sfbd.denoise_batch_size,
                "denoise_with": c.online.denoise_with,
                **({"refresh_rule": "adaptive",
                    "adaptive_features": c.online.adaptive_features}
                   if c.online.refresh_rule == "adaptive" else {}),
                "noisy_shards": prepare_lib.shards_digest(
                    prepare_lib.read_manifest(self.data_dir), ("noisy",))}

    def _check_settings(self) -> None:
        path = os.path.join(self.refresh_dir, "settings.json")
        settings = self._settings()
        old = jsonfile.read_json(path, None)
        if old is not None and old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{self.refresh_dir} holds refreshes made with other settings ("
                + "; ".join(f"{k}: {old.get(k)!r} → {settings.get(k)!r}" for k in changed)
                + "): resume with the run's own config, or use a new workdir")
        if jax.process_index() == 0:
            jsonfile.write_json(path, settings)

    def _path(self, j: int) -> str:
        return os.path.join(self.refresh_dir, f"refresh_{j:08d}")

    def _refresh(self, j: int, state: TrainState) -> None:
        """Refresh j: denoise its rows with ``state``'s EMA (or live, ``online.denoise_with``)
        parameters; choose what to commit (``online.refresh_rule``); write the committed
        images, then their record; update the buffer."""
        start = time.perf_counter()
        oc = self.config.online
        rows = refresh_rows(self.order, j, oc.refresh_count)
        # One batch shape for every refresh: the denoising batch, or the refresh rounded up to
        # a multiple of the device count when it is smaller (padding rows are dropped).
        n_dev = self.experiment.mesh.devices.size
        batch = min(self.config.sfbd.denoise_batch_size, -(-oc.refresh_count // n_dev) * n_dev)
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), _REFRESH_STREAM + j)
        params = state.ema_params if oc.denoise_with == "ema" else state.params
        denoised = backward.denoise_rows(self._sample, params, self.noisy.images, rows,
                                         mesh=self.experiment.mesh, batch_size=batch, key=key,
                                         labels=self.noisy_labels)
        bad = shards.nonfinite_rows(denoised)
        if bad.size:
            raise FloatingPointError(
                f"online SFBD refresh {j} (step {int(state.step)}) produced NaN or infinite "
                f"images for {bad.size} noisy row(s) ({', '.join(map(str, rows[bad][:10]))}); "
                "the model has diverged: check the training loss")
        # As stored (config.sfbd.denoised_dtype): the rule judges what training will read.
        denoised = denoised.astype(self.raw.dtype).astype(np.float32)
        decision: dict = {}
        commit = np.ones(len(rows), bool)
        if oc.refresh_rule == "adaptive":
            commit, decision = adaptive_commit(
                self.last_refresh_step[rows] >= 0, self.union[self.num_clean + rows],
                np.clip(denoised, -1.0, 1.0), self._adaptive_clean_features(),
                self._adaptive_features, self.config.seed, j)
        rows, denoised = rows[commit], denoised[commit]
        record = {"refresh": j, "step": int(state.step), "committed_rows": rows.tolist(),
                  **decision}
        if jax.process_index() == 0:
            path = self._path(j)
            entry = shards.write_shard(self.refresh_dir, os.path.basename(path) + ".npy.tmp",
                                       denoised.astype(self.raw.dtype))
            os.replace(path + ".npy.tmp", path + ".npy")
            jsonfile.write_json(path + ".json", {**record, "rows": entry["rows"],
                                                 "sha256": entry["sha256"]})
        self._records[j] = record
        self._apply(rows, denoised, int(state.step))
        seconds = time.perf_counter() - start
        self.refresh_seconds += seconds
        if decision:
            self.writer.write_scalars(int(state.step), {
                f"online/{k}": float(v) for k, v in decision.items()})
        logging.info("Online SFBD refresh %d (step %d): %d images in %.1f s (%.0f network "
                     "evaluations/s)%s.", j, int(state.step), oc.refresh_count, seconds,
                     oc.refresh_count * self.evaluations_per_image / max(seconds, 1e-9),
                     f"; {decision}" if decision else "")

    def _adaptive_features(self, images: np.ndarray) -> np.ndarray:
        """(n, D) features of images in [-1, 1] for the adaptive rule's KID."""
        if self.config.online.adaptive_features == "pixels":
            return images.reshape(len(images), -1)
        if not hasattr(self, "_inception"):
            ec = self.config.eval
            self._inception = features_lib.inception_extractor(
                ec.inception_weights, self.experiment.mesh, ec.batch_size)
        return self._inception.features(images)

    def _adaptive_clean_features(self) -> np.ndarray:
        if not hasattr(self, "_clean_features"):
            self._clean_features = self._adaptive_features(
                self.union[np.arange(self.num_clean)])
        return self._clean_features

    def _apply(self, rows: np.ndarray, denoised: np.ndarray, step: int) -> None:
        self.raw[rows] = denoised  # stored as config.sfbd.denoised_dtype
        self.last_refresh_step[rows] = step

    def _record(self, j: int) -> dict | None:
        """Refresh j's record (cached), None when its file is absent."""
        if j not in self._records:
            record = jsonfile.read_json(self._path(j) + ".json", None)
            if record is None:
                return None
            if "committed_rows" not in record:  # runs made before the adaptive rule existed
                record["committed_rows"] = refresh_rows(
                    self.order, j, self.config.online.refresh_count).tolist()
            self._records[j] = record
        return self._records[j]

    def _latest_commits(self, made: int) -> dict[int, np.ndarray]:
        """The buffer after the first ``made`` refreshes, as {refresh j: positions in j's file
        of the rows whose latest commit is j}. Walks back from refresh made − 1 until every
        covered row (the first covered(made) positions of the order: every refresh commits the
        rows never denoised) is found; a missing file is skipped (pruned, every row it
        committed was committed again later), unless a row then stays unfound."""
        oc = self.config.online
        remaining = covered(made, oc.refresh_count, len(self.noisy))
        found = np.zeros(len(self.noisy), bool)
        plan, missing = {}, []
        for j in range(made - 1, -1, -1):
            if remaining == 0:
                break
            record = self._record(j)
            if record is None:
                missing.append(j)
                continue
            rows = np.asarray(record["committed_rows"], np.int64)
            fresh = ~found[rows]
            if fresh.any():
                plan[j] = np.flatnonzero(fresh)
                found[rows[fresh]] = True
                remaining -= int(fresh.sum())
        if remaining:
            names = ", ".join(os.path.basename(self._path(j)) + ".json" for j in missing[:5])
            raise FileNotFoundError(
                f"online SFBD: {remaining} buffer entries after {made} refreshes are in no "
                f"refresh file in {self.refresh_dir} (missing: {names}); refresh files must "
                "stay beside the checkpoints")
        return plan

    def _rebuild_buffer(self, step: int) -> None:
        """The buffer as it was before training step ``step``: its refresh files, verified;
        later ones are removed (they are redone)."""
        oc = self.config.online
        made = refreshes_before(step - self.pretrain_steps, oc.refresh_every_steps)
        devices.sync_processes(f"online-rebuild:{step}")
        self._records.clear()  # read from the files, with their digests
        plan = self._latest_commits(made)
        for j in sorted(plan):
            path, record = self._path(j), self._records[j]
            entry = {"file": os.path.basename(path) + ".npy", "rows": record["rows"],
                     "sha256": record["sha256"]}
            shards.verify_shard(self.refresh_dir, entry)
            positions = plan[j]
            rows = np.asarray(record["committed_rows"], np.int64)[positions]
            self._apply(rows, np.load(path + ".npy")[positions], record["step"])
        if plan:
            logging.info("Online SFBD: buffer rebuilt from %d refresh files, %d..%d (step %d).",
                         len(plan), min(plan), max(plan), step)
        devices.sync_processes(f"online-rebuilt:{step}")
        if jax.process_index() == 0:
            self._remove_refreshes(lambda j: j >= made)

    def _remove_refreshes(self, which) -> None:
        if not os.path.isdir(self.refresh_dir):
            return
        for name in sorted(os.listdir(self.refresh_dir)):
            if name.startswith("refresh_") and name.endswith(".json"):
                j = int(name[len("refresh_"):-len(".json")])
                if which(j):
                    os.remove(os.path.join(self.refresh_dir, name))  # the record first
                    self._records.pop(j, None)
                    npy = self._path(j) + ".npy"
                    if os.path.exists(npy):
                        os.remove(npy)

    def _prune(self) -> None:
        """Delete refresh files that no retained checkpoint can need: those before the oldest
        retained checkpoint's refreshes that hold none of its buffer's entries."""
        steps = [s for s in self.ckpt.all_steps() if s >= self.pretrain_steps]
        if steps:
            made = refreshes_before(min(steps) - self.pretrain_steps,
                                    self.config.online.refresh_every_steps)
            needed = self._latest_commits(made)
            self._remove_refreshes(lambda j: j < made and j not in needed)

    def _before_dispatch(self, step: int, state: TrainState) -> None:
        oc, tc = self.config.online, self.config.train
        u = step - self.pretrain_steps
        if u % oc.refresh_every_steps == 0:
            self._refresh(u // oc.refresh_every_steps, state)
            if jax.process_index() == 0:
                self._prune()
        if tc.log_every_steps and u % tc.log_every_steps < tc.steps_per_dispatch:
            made = u // oc.refresh_every_steps + 1
            self.writer.write_scalars(step, {f"online/{k}": v
                                             for k, v in self.diagnostics(step, made).items()})
        every = oc.eval_every_steps
        if every and u and u % every == 0 and not self._evaluated(step):
            self._evaluate(state, f"online_step{step:07d}")

    # ----- diagnostics and evaluation ---------------------------------------------------
    def diagnostics(self, step: int, refreshes: int) -> dict[str, float]:
        """Buffer coverage, mean age of denoised entries (steps), buffer MSE/PSNR against the
        evaluation-only originals (denoised entries, clipped), the buffer weight and share,
        the ``refreshes`` made so far."""
        u = step - self.pretrain_steps
        done = self.last_refresh_step >= 0
        w, _, p = self._batches.buffer_share(u)
        out = {"coverage": float(done.mean()), "buffer_weight": w, "buffer_probability": p,
               "refreshes": float(refreshes)}
        if done.any():
            out["mean_age_steps"] = float(np.mean(step - self.last_refresh_step[done]))
            if not hasattr(self, "_originals"):  # opened (and verified) once per run
                self._originals = load_clean_originals(self.data_dir, lazy=True)
            quality = denoising.against_originals(self.data_dir, self.raw,
                                                  which=np.flatnonzero(done),
                                                  originals=self._originals)
            out.update(buffer_mse=quality["mse"], buffer_psnr=quality["psnr"])
        return out

    def _summary(self) -> list:
        return jsonfile.read_json(os.path.join(self.workdir, SUMMARY), [])

    def _evaluated(self, step: int) -> bool:
        return any(r["step"] == step for r in self._summary())

    def _evaluate(self, state: TrainState, tag: str) -> None:
        """A summary row: compute so far (training images, denoising evaluations), buffer
        diagnostics, config.eval metrics when eval.round_num_samples > 0, a sample grid."""
        step = int(state.step)
        u = step - self.pretrain_steps
        refreshes = refreshes_before(u, self.config.online.refresh_every_steps) if u > 0 else 0
        row = {"tag": tag, "step": step, "images_seen": int(state.images_seen),
               "refreshes": refreshes,
               "denoise_evaluations": refreshes * self.config.online.refresh_count
               * self.evaluations_per_image}
        if self.gradients_per_image:
            row["denoise_gradients"] = (refreshes * self.config.online.refresh_count
                                        * self.gradients_per_image)
        if u >= 0 and hasattr(self, "_batches"):
            row.update(self.diagnostics(step, refreshes))
            row["refreshes"] = refreshes
        if self._evaluator is not None:
            train = training_sets.run_training_images(self.config, self.workdir)
            result = self._evaluator.evaluate_model(
                self.experiment, state.ema_params, self.config.eval.round_num_samples,
                evaluator_lib.evaluation_key(self.config), train=train,
                copies_path=os.path.join(self.workdir, "eval", f"copies_{tag}.png"))
            row.update(evaluator_lib.without_timings(result))
        if hasattr(self, "_batches"):
            row["refresh_seconds_this_process"] = self.refresh_seconds
        row["samples"] = self.experiment.write_samples(state, self.workdir, self.writer, tag)
        row["model_sha256"] = integrity.tree_digest(state.ema_params)
        summary = [r for r in self._summary() if r["step"] != step] + [row]
        if jax.process_index() == 0:
            jsonfile.write_json(os.path.join(self.workdir, SUMMARY),
                                sorted(summary, key=lambda r: r["step"]))
        logging.info("Online SFBD %s: %s", tag, {k: v for k, v in row.items()
                                                 if isinstance(v, (int, float))})


def run_online_sfbd(config, workdir: str) -> TrainState:
    """Entry for config.mode == 'online_sfbd'."""
    return OnlineSFBDRun(config, workdir).run()
