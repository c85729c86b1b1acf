"""Cost of the checkpoint integrity record (sha256 of every file) next to the save and restore.

    python benchmarks/bench_checkpoint_integrity.py                       # CIFAR-10 network
    python benchmarks/bench_checkpoint_integrity.py --config configs/demo.py --repeats 3

Builds the training state of the config's network (parameters, EMA, Adam moments), saves it
synchronously with Orbax, then times: the save, writing the integrity record, verifying it and
the restore (median of --repeats). The record is written on a background thread after an
asynchronous save, so its time is off the training path; the verification runs before every
restore.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cifar10_sfbd.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="", help="where to write (default: a temporary dir)")
    parser.add_argument("--trained_like", action="store_true",
                        help="fill every float leaf with random values, as after training (a "
                             "fresh state's zero Adam moments compress to almost nothing)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from sfbd_jax import cli
    from sfbd_jax.training.loop import Experiment
    from sfbd_jax.utils import devices, integrity
    from sfbd_jax.utils.checkpoints import Checkpointer

    config = cli.load_config_file(args.config)
    experiment = Experiment(config, devices.make_data_mesh(1))
    state = experiment.init_state()
    if args.trained_like:
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
        state = jax.tree.unflatten(treedef, [
            jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
            else x for k, x in zip(keys, leaves, strict=True)])
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    times: dict[str, list[float]] = {"save": [], "write_record": [], "verify": [],
                                     "restore": []}
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        for r in range(args.repeats):
            ckpt = Checkpointer(os.path.join(tmp, f"ckpt{r}"), enable_async=False)
            start = time.time()
            ckpt.manager.save(1, args=ocp.args.StandardSave(state), force=True)
            ckpt.manager.wait_until_finished()
            times["save"].append(time.time() - start)
            step_dir = ckpt.step_directory(1)
            start = time.time()
            integrity.write_record(step_dir)
            times["write_record"].append(time.time() - start)
            start = time.time()
            assert integrity.verify_record(step_dir)
            times["verify"].append(time.time() - start)
            start = time.time()
            restored = ckpt.manager.restore(
                1, args=ocp.args.StandardRestore(experiment.abstract_state()))
            jax.block_until_ready(restored)
            times["restore"].append(time.time() - start)
            ckpt.close()
        size = sum(os.path.getsize(os.path.join(root, n))
                   for root, _, names in os.walk(step_dir) for n in names)
    result = {k: float(np.median(v)) for k, v in times.items()}
    print(f"config {args.config}{' (trained-like state)' if args.trained_like else ''}: "
          f"{num_params / 1e6:.1f} M parameters, checkpoint "
          f"{size / 2**20:.0f} MiB on disk, {jax.devices()[0].platform}")
    for k, v in result.items():
        print(f"  {k:13s} {v:7.2f} s (median of {args.repeats})")
    print(f"  record + verify = {(result['write_record'] + result['verify']):.2f} s, "
          f"{100 * result['verify'] / result['restore']:.0f}% of a restore, "
          f"{100 * result['write_record'] / result['save']:.0f}% of a save")
    return {**result, "bytes": size, "parameters": num_params}


if __name__ == "__main__":
    main()
