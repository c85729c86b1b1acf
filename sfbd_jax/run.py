"""``run(config, workdir)``: dispatch on ``config.mode`` (usable from a notebook)."""

from __future__ import annotations

import logging as logging_std
import os

import jax
from absl import logging

from sfbd_jax import config_checks


def _hide_accelerators_from_tensorflow() -> None:
    """tf.data must never take GPU/TPU memory from JAX. TensorFlow itself is required (clu's
    metric writers import it) but installed as an extra, so that an environment which has it
    already (Colab) keeps its own: name the missing package instead of failing later."""
    try:
        import tensorflow as tf
    except ImportError as err:
        raise RuntimeError(
            "TensorFlow is not installed (clu's TensorBoard writers and tfds need it): "
            "pip install -e '.[cpu]' (or pip install -r requirements.txt)") from err
    tf.config.experimental.set_visible_devices([], "GPU")
    tf.config.experimental.set_visible_devices([], "TPU")


class _DropOrbaxInfo(logging_std.Filter):
    """Orbax logs every step of every save at INFO; keep its warnings and errors only."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def _quiet_orbax() -> None:
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
        handler.addFilter(_DropOrbaxInfo())


def _setup() -> None:
    _hide_accelerators_from_tensorflow()
    _quiet_orbax()
    logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.devices())


def run(config, workdir: str):
    """Run the job ``config.mode`` in ``workdir``; returns the final training state."""
    config_checks.validate_config(config)  # before JAX starts or any data is read
    _setup()
    os.makedirs(workdir, exist_ok=True)
    from sfbd_jax.utils import devices

    devices.check_shared_directory(workdir)
    if config.mode == "edm":
        from sfbd_jax.training import loop

        return loop.train_and_evaluate(config, workdir)
    if config.mode == "sfbd":
        from sfbd_jax.methods import sfbd

        return sfbd.run_sfbd(config, workdir)
    if config.mode == "online_sfbd":
        from sfbd_jax.methods import online_sfbd

        return online_sfbd.run_online_sfbd(config, workdir)
    if config.mode == "ambient":
        from sfbd_jax.methods import ambient

        return ambient.run_ambient(config, workdir)
    raise ValueError(f"config.mode={config.mode!r} is unknown; known modes: 'edm', 'sfbd', "
                     "'online_sfbd', 'ambient'")


def run_evaluation(config, workdir: str, checkpoint: str = "latest") -> dict:
    """Metrics of one checkpoint of the run in ``workdir`` (sfbd_jax/evaluate.py)."""
    config_checks.validate_config(config)
    _setup()
    from sfbd_jax import evaluate

    return evaluate.evaluate(config, workdir, checkpoint)
