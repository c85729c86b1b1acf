"""Ambient-Omni annotation commands (``mode=ambient`` runs them itself when needed):

    python -m sfbd_jax.annotate --config configs/ambient_mnist.py --workdir DIR \\
        --step=train_classifier          # the noise-conditional classifier → DIR/annotator/
    python -m sfbd_jax.annotate --config configs/ambient_mnist.py --workdir DIR \\
        --step=annotate                  # σ_min per low-quality image → the data manifest

Both prepare the data set first if needed (config.corrupt; DIR/data when corrupt.output_dir
is empty). ``--step=annotate`` uses ``config.ambient.annotation`` ('classifier' trains the
classifier when it is not cached; 'fixed', 'every_sigma', 'exclude' need none) and logs where
the annotation was saved and its σ_min quantiles.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (the classifier goes to DIR/annotator/).")
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_enum("step", "annotate", ["train_classifier", "annotate"], "What to do.")
flags.mark_flags_as_required(["config", "workdir"])


def annotate_command(config, workdir: str, step: str) -> dict:
    """Run ``step`` for ``config`` in ``workdir``; returns what it made (for notebooks/tests)."""
    import os

    import jax
    from clu import metric_writers

    from sfbd_jax import run
    from sfbd_jax.config_checks import validate_config
    from sfbd_jax.data import annotations as annotations_lib
    from sfbd_jax.data import prepare as prepare_lib
    from sfbd_jax.methods import ambient
    from sfbd_jax.utils import devices

    validate_config(config)
    run._setup()
    config = prepare_lib.with_output_dir(config, workdir)
    prepare_lib.prepare_on_main_process(config)
    mesh = devices.make_data_mesh()
    os.makedirs(workdir, exist_ok=True)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    with metric_writers.ensure_flushes(writer):
        if step == "train_classifier":
            _, meta = ambient.train_classifier(config, workdir, mesh, writer)
            return {"classifier": meta}
        name = ambient.annotate(config, workdir, mesh, writer)
    record = annotations_lib.record(config.corrupt.output_dir, name)
    logging.info("Annotation %s saved in %s: %s", name, config.corrupt.output_dir,
                 record["summary"])
    return {"annotation": name, "record": record}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sfbd_jax.utils import devices

    devices.configure_cpu_devices(FLAGS.config.num_cpu_devices)
    annotate_command(FLAGS.config, FLAGS.workdir, FLAGS.step)


if __name__ == "__main__":
    from sfbd_jax import cli

    cli.run(main, lambda: FLAGS.workdir)
