"""Evaluate a checkpoint: ``python -m sfbd_jax.evaluate --config C --workdir DIR``
(the same as ``python -m sfbd_jax.main --mode=eval``).

``--checkpoint``: ``latest`` (the newest state under DIR/checkpoints), ``step:N`` (that step) or
``round:K`` (an SFBD run's state after round K, kept under DIR/rounds). The EMA parameters
generate ``config.eval.num_samples`` images (batch-sharded over all devices, progress logged);
the metrics of ``config.eval.metrics`` go to DIR/eval/<tag>.json and TensorBoard (``eval/``);
memorisation is measured against the images the run trained on (``training_sets``) and the
most-copied samples beside their nearest training images go to DIR/eval/<tag>_copies.png.
A conditional model sampled with guidance w ≠ 1 is recorded beside the plain result, in
DIR/eval/<tag>_guidance<w>.json and under ``eval_guidance<w>/``; one sampled with another
``sampler.num_steps`` than the run recorded in DIR/config.json in DIR/eval/<tag>_steps<N>.json
(benchmarks/sampler_steps.py). Every record names its ``sampler_num_steps``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import jax
from absl import logging

from sfbd_jax.utils import checkpoints

if TYPE_CHECKING:
    from sfbd_jax.training import loop

# The modules that import TensorFlow (through clu) are imported where they are used, so that
# ``python -m sfbd_jax.evaluate`` reaches run.py's quiet TensorFlow import first.


def _resolve(workdir: str, checkpoint: str) -> tuple[str, int, str]:
    """(checkpoint directory, step, tag) for a --checkpoint spec."""
    kind, _, value = checkpoint.partition(":")
    if kind == "latest" and not value:
        return os.path.join(workdir, "checkpoints"), -1, "latest"
    if kind in ("step", "round") and value.isdigit():
        folder = "checkpoints" if kind == "step" else "rounds"
        return os.path.join(workdir, folder), int(value), f"{kind}{int(value)}"
    raise ValueError(f"--checkpoint={checkpoint!r} is not 'latest', 'step:N' or 'round:K'")


def load_params(experiment: loop.Experiment, workdir: str, checkpoint: str = "latest"):
    """(EMA parameters, step, tag) of the checkpoint named by ``checkpoint`` in ``workdir``."""
    directory, step, tag = _resolve(os.path.abspath(workdir), checkpoint)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints to evaluate: {directory} does not exist "
                                "(check --workdir, or train first)")
    ckpt = checkpoints.Checkpointer(directory, None, enable_async=False)
    try:
        steps = ckpt.all_steps()
        if step < 0:
            if not steps:
                raise FileNotFoundError(f"{directory} holds no checkpoint")
            step = max(steps)
            tag = f"step{step}"
        elif step not in steps:
            raise FileNotFoundError(f"checkpoint {step} is not in {directory} (have {steps})")
        state = ckpt.restore(step, experiment.abstract_state())
    finally:
        ckpt.close()
    return state.ema_params, int(state.step), tag


def run_sampler_steps(workdir: str, default: int) -> int:
    """The sampler step count the run in ``workdir`` recorded (its config.json: the one its
    own evaluations used); ``default`` when it recorded none."""
    from sfbd_jax.training import loop

    recorded = loop.read_run_config(workdir)
    return int(recorded.get("sampler", {}).get("num_steps", default))


def evaluate(config, workdir: str, checkpoint: str = "latest") -> dict:
    """Evaluate one checkpoint of the run in ``workdir``; returns (and records) the metrics."""
    from clu import metric_writers

    from sfbd_jax.evaluation import evaluator as evaluator_lib
    from sfbd_jax.evaluation import training_sets
    from sfbd_jax.training import loop

    workdir = os.path.abspath(workdir)
    experiment = loop.Experiment(config)
    params, step, checkpoint_tag = load_params(experiment, workdir, checkpoint)
    # A guided evaluation, or one with another sampler step count than the run trained with,
    # is recorded beside, not over, the plain one (file and TensorBoard).
    conditional = config.model.num_classes > 0
    suffix = (f"_guidance{config.sampler.guidance:g}"
              if conditional and config.sampler.guidance != 1.0 else "")
    if config.sampler.num_steps != run_sampler_steps(workdir, config.sampler.num_steps):
        suffix += f"_steps{config.sampler.num_steps}"
    tag = checkpoint_tag + suffix
    evaluator = evaluator_lib.Evaluator(config, experiment.mesh)
    logging.info("Evaluating %s (training step %d) with %d samples: %s.", tag, step,
                 config.eval.num_samples, ", ".join(evaluator.metrics))
    train = (training_sets.run_training_images(config, workdir)
             if "memorisation" in evaluator.metrics else None)
    result = evaluator.evaluate_model(
        experiment, params, config.eval.num_samples, evaluator_lib.evaluation_key(config),
        train=train, copies_path=os.path.join(workdir, "eval", f"{tag}_copies.png"))
    result.update(checkpoint=checkpoint_tag, step=step, sampler_num_steps=config.sampler.num_steps)
    if conditional:
        result["guidance"] = float(config.sampler.guidance)
    path = evaluator_lib.write_result(workdir, tag, result)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_scalars(step, {f"eval{suffix}/{k}": v for k, v in result.items()
                                if isinstance(v, float)})
    writer.flush()
    logging.info("Evaluation of %s: %s (written to %s)", tag,
                 {k: v for k, v in result.items() if isinstance(v, float)}, path)
    return result


if __name__ == "__main__":
    from sfbd_jax import cli, main

    cli.run(lambda argv: main.main(argv, mode="eval"), main.run_dir)
