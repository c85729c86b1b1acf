"""``run(config, workdir)``: dispatch on ``config.mode`` (usable from a notebook)."""

from __future__ import annotations

import contextlib
import logging as logging_std
import os
import re
import sys
import tempfile

import jax
from absl import logging

from sfbd_jax import config_checks

# Lines TensorFlow's C++ runtime prints to stderr while it is imported, before any logging is
# set up (so no log level hides them), that say nothing a user must act on.
_HARMLESS_STARTUP_LINES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called|oneDNN custom operations are "
    r"on|cpu_feature_guard|This TensorFlow binary is optimized|To enable the following "
    r"instructions|rebuild TensorFlow with the appropriate compiler flags|Unable to register "
    r"cu(DNN|FFT|BLAS) factory|computation placer already registered|TF-TRT Warning|Could not "
    r"find cuda drivers|Unable to initialize backend 'tpu'")


@contextlib.contextmanager
def harmless_stderr_dropped():
    """Capture what C++ code writes to the stderr file descriptor meanwhile; pass every line on
    except the known-harmless start-up messages above (all of it if the block raises)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (a notebook): leave it
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), fd)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = [ln for ln in lines if failed or not _HARMLESS_STARTUP_LINES.search(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _hide_accelerators_from_tensorflow() -> None:
    """tf.data must never take GPU/TPU memory from JAX. TensorFlow itself is required (clu's
    metric writers import it) but installed as an extra, so that an environment which has it
    already (Colab) keeps its own: name the missing package instead of failing later."""
    try:
        with harmless_stderr_dropped():
            import tensorflow as tf
    except ImportError as err:
        raise RuntimeError(
            "TensorFlow is not installed (clu's TensorBoard writers and tfds need it): "
            "pip install -e '.[cpu]' (or pip install -r requirements.txt)") from err
    tf.config.experimental.set_visible_devices([], "GPU")
    tf.config.experimental.set_visible_devices([], "TPU")


class _DropNoisyInfo(logging_std.Filter):
    """Orbax logs every step of every save at INFO, and JAX says at INFO that it found no TPU
    on every machine without one: keep their warnings and errors only."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if record.levelno >= logging_std.WARNING:
            return True
        return "/orbax/" not in record.pathname and not (
            record.pathname.endswith("xla_bridge.py")
            and "Unable to initialize backend" in str(record.msg))


def _quiet_logs() -> None:
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropNoisyInfo) for f in handler.filters):
        handler.addFilter(_DropNoisyInfo())


def _setup() -> None:
    _quiet_logs()
    _hide_accelerators_from_tensorflow()
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
    from sfbd_jax.evaluation import report

    result = evaluate.evaluate(config, workdir, checkpoint)
    if jax.process_index() == 0:
        print(report.summary_text(result, f"Evaluation of {workdir}, checkpoint "
                                  f"{result['checkpoint']} (training step {result['step']}):"),
              flush=True)
    return result
