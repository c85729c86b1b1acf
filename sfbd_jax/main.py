"""Entry point: ``python -m sfbd_jax.main --config configs/NAME.py --workdir DIR``.

Override any config key with ``--config.a.b=value``. ``--mode=eval`` evaluates a checkpoint
of the run in DIR instead of training (see sfbd_jax/evaluate.py). All logic lives in
importable modules.
"""

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-host TPU pods, SLURM or "
                  "multi-node GPU: coordinator and process ids come from the environment, "
                  "or from the three flags below).")
flags.DEFINE_string("coordinator_address", None,
                    "--distributed by hand (e.g. localhost:12345): process 0's address; with "
                    "--num_processes and --process_id.")
flags.DEFINE_integer("num_processes", None, "--distributed by hand: the number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed by hand: this process, 0-based.")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train: run config.mode (edm, sfbd, online_sfbd, ambient); eval: metrics of a "
                  "checkpoint.")
flags.DEFINE_string("checkpoint", "latest",
                    "--mode=eval: 'latest', 'step:N' or 'round:K' (an SFBD round).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv, mode: str | None = None):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    logging.info("sfbd_jax: %s %s in %s; loading JAX and TensorFlow (up to a minute or more "
                 "on a busy machine).", FLAGS.config.mode,
                 "evaluation" if (mode or FLAGS.mode) == "eval" else "run", FLAGS.workdir)
    from sfbd_jax.utils import devices

    devices.configure_cpu_devices(FLAGS.config.num_cpu_devices)
    if FLAGS.distributed:
        devices.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                       FLAGS.process_id)
    from sfbd_jax import run

    if (mode or FLAGS.mode) == "eval":
        run.run_evaluation(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)
    else:
        run.run(FLAGS.config, FLAGS.workdir)


def run_dir() -> str | None:
    """Where errors.log goes: the run directory."""
    return FLAGS.workdir


if __name__ == "__main__":
    from sfbd_jax import cli

    cli.run(main, run_dir)
