"""The shared training machinery (one ``Experiment`` for every method) and the plain EDM run.

An ``Experiment`` owns what a config fixes: the mesh, the network and its EDM denoiser, the
optimiser, the jitted sharded train step and sampler. Methods (SFBD, Ambient-Omni, CEP) reuse
``Experiment.train`` on their own data and phases instead of writing another loop.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from sfbd_jax.config_checks import validate_config
from sfbd_jax.data import pipeline, rows, sources
from sfbd_jax.diffusion import sampler as sampler_lib
from sfbd_jax.models import precond, unet
from sfbd_jax.training import optim, step
from sfbd_jax.training.state import TrainState, create_train_state
from sfbd_jax.utils import checkpoints, devices, images, jsonfile
from sfbd_jax.utils import progress as progress_lib

# Independent PRNG streams derived from config.seed.
_STREAM_INIT, _STREAM_TRAIN, _STREAM_SAMPLES = 0, 1, 2


class Programs:
    """What a config compiles, once per process: the network, its EDM denoiser, the
    optimiser, the loss, the jitted sharded train step, the compiled initialisation, the
    abstract state and the samplers (``derived``: any further program built from these).

    Built from ``program_config(config)``: a frozen copy of only the keys that define
    programs (a program that read any other key would fail, not be shared wrongly), so
    changing the caller's config later cannot change a program. Shared by every
    ``Experiment`` whose config has equal values of those keys on an equal mesh
    (``programs_for``): a resumed run (also one given a larger budget), SFBD's rounds and a
    test's repeated runs trace and compile each program once instead of once per
    ``Experiment``.
    """

    def __init__(self, config: ml_collections.FrozenConfigDict, mesh):
        self.config = config  # program_config of the Experiment's config (frozen)
        self.mesh = mesh
        self.image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
        self.model = unet.build_unet(config.model, config.data.image_size, config.data.channels)
        self.denoise = precond.make_denoiser(self.model, config.diffusion.sigma_data)
        self.optimizer = optim.make_optimizer(config.optim, config.train.batch_size)
        self.lr_schedule = optim.lr_schedule(config.optim, config.train.batch_size)
        self.with_labels = config.model.num_classes > 0
        condition = (step.condition_transform(config.model, config.cep) if self.with_labels and (
            config.model.label_dropout > 0 or config.cep.kind != "none") else None)
        self.loss_fn = step.edm_loss_fn(self.denoise, config.diffusion, condition)
        # Sampling never perturbs the condition (CEP is training-only); guidance needs the null
        # class learned under label dropout.
        self.sample_denoise = (precond.guided_denoiser(self.denoise, config.sampler.guidance,
                                                       config.model.num_classes)
                               if self.with_labels else self.denoise)
        self.train_step = step.make_train_step(self.loss_fn, self.optimizer, config.ema,
                                               self.mesh, config.train.unroll_dispatch)
        self.train_step_compiled = False  # set after the first dispatch has run
        self.derived: dict[Any, Any] = {}

    def init(self, key):
        """A fresh TrainState from ``key`` (uncompiled; see ``Experiment.init_state``)."""
        k_init, k_train = jax.random.fold_in(key, _STREAM_INIT), jax.random.fold_in(
            key, _STREAM_TRAIN)
        params = precond.init_params(self.model, k_init, self.image_shape,
                                     with_labels=self.with_labels)
        return create_train_state(params, self.optimizer, k_train)

    def get(self, key, build: Callable[[], Any]) -> Any:
        """The program cached under ``key`` (hashable), built by ``build()`` the first time."""
        if key not in self.derived:
            self.derived[key] = build()
        return self.derived[key]


# The config keys that define compiled programs: the network, the loss (diffusion, CEP), the
# optimiser and EMA with the global batch, the samplers and SFBD's backward samplers.
# Budgets, schedules of logging/checkpoints, data paths and seeds are left out: those change
# no program. (config.seed is only an argument of the compiled initialisation.)
PROGRAM_SECTIONS = ("model", "diffusion", "cep", "optim", "ema", "sampler")
PROGRAM_KEYS = {"data": ("image_size", "channels"), "train": ("batch_size", "unroll_dispatch")}
PROGRAM_PREFIXES = {"sfbd": ("backward", "dps_")}  # the backward step's sampler


def program_config(config) -> ml_collections.FrozenConfigDict:
    """The part of ``config`` that defines its compiled programs (frozen)."""
    part = {name: config[name].to_dict() for name in PROGRAM_SECTIONS}
    for section, keys in PROGRAM_KEYS.items():
        part[section] = {k: config[section][k] for k in keys}
    for section, prefixes in PROGRAM_PREFIXES.items():
        if section in config:
            part[section] = {k: v for k, v in config[section].items() if k.startswith(prefixes)}
    return ml_collections.FrozenConfigDict(part)


# Programs of the last few configs this process used (an LRU: a long benchmark that goes
# through many configs keeps a bounded number of compiled programs alive).
_PROGRAMS: collections.OrderedDict[tuple, Programs] = collections.OrderedDict()
_PROGRAMS_KEPT = 8


def programs_for(config, mesh) -> Programs:
    """The shared ``Programs`` of ``config`` on ``mesh``; a new one when no config with the
    same values on the same devices was seen (among the last few)."""
    part = program_config(config)
    key = (part.to_json_best_effort(sort_keys=True),
           tuple(d.id for d in mesh.devices.flat), mesh.devices.shape, tuple(mesh.axis_names))
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
    else:
        _PROGRAMS[key] = Programs(part, mesh)
        while len(_PROGRAMS) > _PROGRAMS_KEPT:
            _PROGRAMS.popitem(last=False)
    return _PROGRAMS[key]


class Experiment:
    """Model, optimiser, jitted step and sampler for ``config`` on ``mesh`` (all devices).

    The compiled parts come from ``programs_for`` (shared with earlier Experiments of an
    equal config in this process); what changes during a run (``last_scalars``) is its own.
    """

    def __init__(self, config, mesh=None):
        validate_config(config)
        self.config = config
        mesh = mesh if mesh is not None else devices.make_data_mesh()
        devices.check_divisible(config.train.batch_size, mesh,
                                "config.train.batch_size (global batch)")
        self.programs = programs_for(config, mesh)
        p = self.programs
        self.mesh = p.mesh
        self.image_shape = p.image_shape
        self.model, self.denoise, self.sample_denoise = p.model, p.denoise, p.sample_denoise
        self.optimizer, self.lr_schedule, self.loss_fn = p.optimizer, p.lr_schedule, p.loss_fn
        self.train_step = p.train_step
        self.base_key = jax.random.PRNGKey(config.seed)
        self.last_scalars: dict[str, float] = {}  # the last metrics ``train`` logged

    # ----- state -------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        """A fresh state, replicated over the mesh.

        Compiled at XLA backend optimisation level 0: the initialisation runs once and takes
        a fraction of a second either way, while the optimised compile of a graph that holds
        the whole forward pass costs seconds (7.3 s → 3.4 s for the 7M-parameter config of
        benchmarks/vs_pytorch.py on 2 CPU cores; the parameters are bit-identical, tested)."""

        def compile_init():
            logging.info("Initialising the parameters (compiling the initialisation first).")
            init = jax.jit(self.programs.init, out_shardings=devices.replicated(self.mesh))
            return init.lower(self.base_key).compile(
                compiler_options={"xla_backend_optimization_level": 0})

        return self.programs.get("init", compile_init)(self.base_key)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, without allocating it."""

        def build():
            shapes = jax.eval_shape(self.programs.init, self.base_key)
            return checkpoints.abstract_like(shapes, devices.replicated(self.mesh))

        return self.programs.get("abstract_state", build)

    def restore_or_init(self, checkpointer: checkpoints.Checkpointer,
                        earliest_step: int = 0) -> TrainState:
        """The latest checkpoint under ``checkpointer`` if any, else a fresh state. A damaged
        one raises, unless the checkpointer falls back (then the newest intact one at or after
        ``earliest_step``)."""
        state = checkpointer.restore_latest(self.abstract_state(), earliest_step)
        if state is None:
            logging.info("No checkpoint in %s: starting from scratch.", checkpointer.directory)
            return self.init_state()
        logging.info("Resumed from %s at step %d.", checkpointer.directory, int(state.step))
        return state

    # ----- sampling ----------------------------------------------------------------------
    def sampler(self, sigmas) -> Any:
        """The jitted sharded sampler for the grid ``sigmas`` (cached per grid)."""
        cfg = self.programs.config.sampler  # the frozen values its programs are shared by
        sigmas = np.asarray(sigmas, np.float32)
        return self.programs.get(("sampler", tuple(sigmas.tolist())),
                                 lambda: sampler_lib.make_sharded_sampler(
                                     self.sample_denoise, self.mesh, sigmas, s_churn=cfg.s_churn,
                                     s_tmin=cfg.s_tmin, s_tmax=cfg.s_tmax, s_noise=cfg.s_noise))

    def sample_grid(self) -> np.ndarray:
        """The σ grid of ``generate`` (config.sampler's Karras grid, decreasing, ending in 0)."""
        cfg = self.config.sampler
        return sampler_lib.karras_sigmas(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)

    def generate(self, params, num: int, key: jax.Array, labels=None) -> np.ndarray:
        """``num`` samples from noise at σ_max, as a host array (num, H, W, C)."""
        sigmas = self.sample_grid()
        n_dev = self.mesh.devices.size
        padded = -(-num // n_dev) * n_dev
        k_noise, k_churn = jax.random.split(key)
        sharding = devices.batch_sharding(self.mesh)
        start = self.programs.get(("start_noise", padded, float(sigmas[0])), lambda: jax.jit(
            lambda k: jax.random.normal(k, (padded, *self.image_shape)) * sigmas[0],
            out_shardings=sharding))
        x = start(k_noise)
        if labels is not None:
            labels = devices.put_global(np.resize(np.asarray(labels, np.int32), padded),
                                        sharding)
        out = self.sampler(sigmas)(params, x, labels, k_churn)
        return devices.to_host(out)[:num]

    def sample_labels(self, num: int) -> np.ndarray | None:
        """Class labels 0, 1, 2, … for a sample grid of a conditional model (None otherwise)."""
        k = self.config.model.num_classes
        return (np.arange(num) % k).astype(np.int32) if k else None

    def write_samples(self, state: TrainState, workdir: str, writer, tag: str) -> str:
        """Sample a grid from the EMA parameters with a fixed key; PNG + TensorBoard image.
        Returns the PNG's path relative to ``workdir`` (run records stay valid when the run
        directory moves)."""
        num = self.config.train.num_samples
        key = jax.random.fold_in(self.base_key, _STREAM_SAMPLES)
        samples = self.generate(state.ema_params, num, key, self.sample_labels(num))
        grid = images.make_grid(samples)
        path = os.path.join("samples", f"{tag}.png")
        if jax.process_index() == 0:
            images.save_png(grid, os.path.join(workdir, path))
        writer.write_images(int(state.step), {"samples": grid[None]})
        return path

    # ----- training ----------------------------------------------------------------------
    def train(self, state: TrainState, dataset: sources.ImageDataset, *, end_step: int,
              phase_start_step: int, data_seed: int, checkpointer: checkpoints.Checkpointer,
              writer, workdir: str, tag: str = "train",
              batches: pipeline.TrainBatches | None = None,
              before_dispatch: Callable[[int, TrainState], None] | None = None,
              progress: progress_lib.RunProgress | None = None) -> TrainState:
        """Train ``state`` on ``dataset`` until ``state.step == end_step``.

        Batch ``i`` of the phase is drawn for step ``phase_start_step + i`` from ``data_seed``,
        so a resumed phase sees exactly the batches an uninterrupted one would. ``batches``
        replaces the uniform batches over ``dataset`` (e.g. Ambient-Omni's
        ``eligibility.AmbientBatches``, whose maker validates its data). ``before_dispatch``
        is called with (global step, state) before every dispatch (online SFBD refreshes its
        buffer there; batches are then gathered in line, since the data change between
        dispatches; otherwise a ``pipeline.Prefetcher`` thread makes the next
        ``train.prefetch_dispatches`` batches while the devices compute). ``progress``: the
        run's plan, holding a phase named ``tag`` (without one, a plan of this phase alone);
        its line counts this phase's training images.
        """
        cfg = self.config.train
        if batches is None:
            pipeline.validate_images(dataset.images, self.image_shape, dataset.name,
                                     check_values=isinstance(dataset.images, np.ndarray))
            batches = pipeline.TrainBatches(dataset, cfg.batch_size, cfg.steps_per_dispatch,
                                            data_seed, self.mesh,
                                            num_classes=self.config.model.num_classes,
                                            random_flip=self.config.data.random_flip)
        step_now = int(state.step)
        if (end_step - phase_start_step) % cfg.steps_per_dispatch:
            raise ValueError(f"the phase length {end_step - phase_start_step} steps is not a "
                             f"multiple of train.steps_per_dispatch={cfg.steps_per_dispatch}")
        k = cfg.steps_per_dispatch
        images_of = lambda step_: (step_ - phase_start_step) * cfg.batch_size
        own_progress = progress is None
        if own_progress:
            progress = progress_lib.single_phase(
                tag, images_of(end_step), writer=progress_lib.tensorboard_writer(workdir),
                every_secs=cfg.progress_every_secs)
        progress.begin(tag, images_of(step_now))
        # Batches made ahead by a thread, unless the data change between dispatches.
        depth = cfg.prefetch_dispatches if before_dispatch is None else 0
        with pipeline.Prefetcher(batches.get, range(step_now - phase_start_step,
                                                    end_step - phase_start_step, k),
                                 depth) as source:
            state = self._train_loop(state, source, step_now, end_step, phase_start_step,
                                     checkpointer, writer, workdir, tag, before_dispatch,
                                     progress)
        progress.end()
        if own_progress:
            progress.close()
        return state

    def _train_loop(self, state, source, step_now, end_step, phase_start_step, checkpointer,
                    writer, workdir, tag, before_dispatch, progress) -> TrainState:
        """The dispatches of ``train`` (see there), batches from ``source``."""
        cfg = self.config.train
        k = cfg.steps_per_dispatch
        images_of = lambda step_: (step_ - phase_start_step) * cfg.batch_size
        t_last, step_last, wait_last = time.time(), step_now, source.wait_seconds
        first_nonfinite = jnp.full((2,), -1, jnp.int32)  # (loss, gradient): see step.py
        while step_now < end_step:
            if before_dispatch is not None:
                before_dispatch(step_now, state)
            if not self.programs.train_step_compiled:
                progress.note("Compiling the train step and running its first dispatch (a "
                              "minute or more on a busy CPU; XLA may call it a 'very slow "
                              "compile', which is harmless).")
                t_compile = time.time()
            state, metrics = self.train_step(state, source.get(step_now - phase_start_step))
            if not self.programs.train_step_compiled:
                jax.block_until_ready(metrics)
                self.programs.train_step_compiled = True
                progress.note(f"Train step compiled and run in {time.time() - t_compile:.1f} s.")
            first_nonfinite = step.track_first_nonfinite(
                first_nonfinite, metrics.pop("first_nonfinite"), jnp.int32(step_now))
            step_now += k
            progress.update(images_of(step_now))
            due = lambda every, now=step_now: bool(every) and now % every < k
            if due(cfg.log_every_steps) or step_now == end_step:
                check_nonfinite(first_nonfinite, checkpointer)
                scalars = {name: float(v) for name, v in jax.device_get(metrics).items()}
                elapsed = time.time() - t_last
                scalars["lr"] = float(self.lr_schedule(step_now - 1))
                scalars["images_seen"] = float(state.images_seen)
                scalars["images_per_sec"] = (step_now - step_last) * cfg.batch_size / elapsed
                # The share of the loop's time spent waiting for batches (gather + transfer
                # not hidden behind the devices' work).
                scalars["input_wait_fraction"] = (source.wait_seconds - wait_last) / elapsed
                writer.write_scalars(step_now, {f"{tag}/{n}": v for n, v in scalars.items()})
                self.last_scalars = scalars
                if step_now == end_step:  # before the checkpoint that ends the phase
                    record_phase_end(workdir, tag, step_now, scalars["loss"])
                t_last, step_last, wait_last = time.time(), step_now, source.wait_seconds
            if due(cfg.checkpoint_every_steps) or step_now == end_step:
                if not due(cfg.log_every_steps) and step_now != end_step:
                    check_nonfinite(first_nonfinite, checkpointer)
                checkpointer.save(step_now, state)
            if due(cfg.sample_every_steps) and step_now != end_step:
                self.write_samples(state, workdir, writer, f"{tag}_step{step_now:07d}")
        return state


def check_nonfinite(first_nonfinite, checkpointer: checkpoints.Checkpointer) -> None:
    """Stop with a clear error naming the first step whose training loss was NaN/inf, however
    many steps ago that was (``first_nonfinite``: int32[2] from ``step.track_first_nonfinite``).
    Non-finite gradient entries alone are zeroed and counted, as in EDM; the step where they
    first appeared is named too."""
    loss_step, grad_step = (int(v) for v in jax.device_get(first_nonfinite))
    if loss_step >= 0:
        grads = (f"; gradient entries were first non-finite at step {grad_step}"
                 if grad_step >= 0 else "")
        raise FloatingPointError(
            f"training loss is not finite (NaN/inf) at step {loss_step}{grads}; stopping "
            f"before saving this state. The last checkpoint ({checkpointer.latest_step()}) in "
            f"{checkpointer.directory} is untouched. Lower config.optim.lr, enable "
            "config.optim.grad_clip or check the data.")


def check_finite_loss(loss: float, step_now: int, checkpointer: checkpoints.Checkpointer):
    """Stop with a clear error when the training loss ``loss`` of step ``step_now`` is NaN/inf
    (the last good checkpoint is kept as it is)."""
    if not np.isfinite(loss):
        check_nonfinite(np.array([step_now, -1]), checkpointer)


PHASES = "phase_ends.json"


def record_phase_end(workdir: str, tag: str, step_now: int, loss: float) -> None:
    """Keep the last training loss of phase ``tag`` in ``workdir/phase_ends.json`` (process 0),
    written before the phase's final checkpoint, so a run resumed after that checkpoint reports
    the same loss as an uninterrupted one."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, PHASES)
    record = jsonfile.read_json(path, {})
    record[tag] = {"step": int(step_now), "loss": float(loss)}
    jsonfile.write_json(path, record)


def phase_end_loss(workdir: str, tag: str, step_now: int) -> float:
    """The loss recorded when phase ``tag`` ended at ``step_now`` (NaN if none was)."""
    entry = jsonfile.read_json(os.path.join(workdir, PHASES), {}).get(tag)
    return float(entry["loss"]) if entry and entry["step"] == int(step_now) else float("nan")


RUN_CONFIG = "config.json"  # the run's config as first recorded, with every seed


def read_run_config(workdir: str) -> dict:
    """The config the run in ``workdir`` recorded (``write_run_config``); {} when none."""
    return jsonfile.read_json(os.path.join(workdir, RUN_CONFIG), {})


def write_run_config(config, workdir: str) -> None:
    """Record the config (with every seed) in ``workdir/config.json``; when resuming, keep the
    first record and log the keys whose values changed."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, RUN_CONFIG)
    current = json.loads(config.to_json_best_effort())
    previous = read_run_config(workdir)
    if previous:
        if previous != current:
            logging.warning("Config differs from the one recorded in %s; resuming with the new "
                            "values. Recorded: %s", path, previous)
        return
    jsonfile.write_json(path, current, indent=2)  # atomic: a kill leaves no half-written record


def num_steps(config) -> int:
    """Training steps for config.train.total_images, rounded down to whole dispatches."""
    cfg = config.train
    steps = cfg.total_images // cfg.batch_size
    return steps - steps % cfg.steps_per_dispatch


def edm_dataset(config, workdir: str) -> sources.ImageDataset:
    """The training set of ``mode=edm``: the clean data set of config.data, or with
    ``data.use_prepared`` the clean group of the prepared data set of config.corrupt (prepared
    first, into ``workdir/data`` when corrupt.output_dir is empty), e.g. every image clean with
    a fraction of flipped labels (corrupt.clean_fraction=1, corrupt.label_flip=η); with
    ``data.prepared_group='noisy'`` the corrupted images as a user would have them (clipped
    to [-1, 1]) followed by the clean group (EDM on the corrupted data set)."""
    if not config.data.use_prepared:
        return sources.load_source(config.data)
    from sfbd_jax.data import prepare
    from sfbd_jax.data.prepared import PreparedDataset

    config = prepare.with_output_dir(config, workdir)
    prepare.prepare_on_main_process(config)
    data = PreparedDataset(config.corrupt.output_dir, lazy=True)  # batches read their rows
    clean = data.clean()
    if config.data.prepared_group == "clean":
        return clean
    noisy, _ = data.noisy()
    # An index-level union; NaN survives the clipping: the per-batch check names it.
    images = rows.ConcatenatedRows([noisy.images, clean.images],
                                   [rows.clip_to_image_range, None], name="noisy+clean")
    labels = (np.concatenate([noisy.labels, clean.labels])
              if noisy.labels is not None and clean.labels is not None else None)
    return sources.ImageDataset(images, labels, clean.num_classes, "noisy+clean")


def train_and_evaluate(config, workdir: str,
                       dataset: sources.ImageDataset | None = None) -> TrainState:
    """Plain EDM training (config.mode == 'edm'): train on the clean data set of config.data
    (or on ``dataset``, e.g. a corrupted set for a baseline), checkpoint, resume from the
    latest checkpoint in ``workdir``, and write sample grids."""
    workdir = os.path.abspath(workdir)
    experiment = Experiment(config)
    write_run_config(config, workdir)
    if dataset is None:
        dataset = edm_dataset(config, workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    checkpointer = checkpoints.Checkpointer.for_training(os.path.join(workdir, "checkpoints"),
                                                         config.train)
    try:
        state = experiment.restore_or_init(checkpointer)
        logging.info("Training on %d devices (%s), global batch %d, %d images of %s.",
                     experiment.mesh.devices.size, jax.devices()[0].platform,
                     config.train.batch_size, len(dataset), dataset.name)
        with metric_writers.ensure_flushes(writer):
            state = experiment.train(state, dataset, end_step=num_steps(config),
                                     phase_start_step=0, data_seed=config.seed,
                                     checkpointer=checkpointer, writer=writer, workdir=workdir)
            path = experiment.write_samples(state, workdir, writer, "final")
            logging.info("Wrote samples to %s", os.path.join(workdir, path))
    finally:
        checkpointer.close()
    return state
