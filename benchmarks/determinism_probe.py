"""Are same-seed runs bit-identical on CPU, and what breaks it? Prints one line per training.

Each training runs in its own process, pinned to a set of CPU cores (XLA sizes its CPU thread
pool from the cores a process may use):

* ``classifier``: the evaluation's feature classifier (configs/reproduce_mnist.py,
  ``eval.classifier``: 2,000 AdamW steps on the 5,000 embedded digits);
* ``unet``: the table's 1.26 M-parameter U-Net (configs/reproduce_mnist.py) trained as plain
  EDM on the digits for ``--unet_images`` images.

For each, the sha256 of all trained parameters (``integrity.tree_digest``) and the classifier's
final loss, per core set.
Equal hashes within a core set say a re-run on the same machine repeats the run bit for bit;
differing hashes across core sets say the kernels' floating-point results depend on the thread
count, so a re-run on a machine with other cores (or another CPU) starts from different last
bits, which training amplifies.

    python benchmarks/determinism_probe.py                    # cores "0,1" twice, then "0"
    python benchmarks/determinism_probe.py --cores 0,1 0,1 0 --kinds classifier
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(kind: str, unet_images: int) -> dict:
    """One training in this process; its parameter hash (and loss where there is one)."""
    from configs import reproduce_mnist
    from sfbd_jax.data import sources
    from sfbd_jax.utils.integrity import tree_digest

    config = reproduce_mnist.get_config("sigma0.2")
    if kind == "classifier":
        from sfbd_jax.evaluation import classifier

        trained = classifier.train(config.eval.classifier, sources.load_mnist5k())
        return {"sha256": tree_digest(trained.params),
                "final_loss": trained.meta["final_loss"]}
    if kind == "unet":
        from sfbd_jax.run import run

        config.mode = "edm"
        config.train.total_images = unet_images
        config.train.num_samples = 4  # the final sample grid: 4 samples
        config.train.checkpoint_every_steps = 10_000
        with tempfile.TemporaryDirectory() as workdir:
            state = run(config, workdir)
            return {"sha256": tree_digest((state.params, state.ema_params)),
                    "final_loss": None}
    raise ValueError(f"unknown kind {kind!r}: 'classifier' or 'unet'")


def _pinned(cores: set[int]):
    return lambda: os.sched_setaffinity(0, cores)


def _run_child(kind: str, cores: str, unet_images: int) -> dict:
    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("determinism_probe pins processes to cores with os.sched_setaffinity, "
                         "which this platform lacks (it is Linux-only)")
    core_set = {int(c) for c in cores.split(",")}
    available = os.sched_getaffinity(0)
    if not core_set <= available:
        raise SystemExit(f"--cores {cores}: this process may use only cores {sorted(available)}")
    start = time.time()
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", kind,
         "--unet_images", str(unet_images)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True, text=True, preexec_fn=_pinned(core_set), check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {kind} training on cores {cores} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(result, kind=kind, cores=cores, seconds=time.time() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="classifier,unet")
    parser.add_argument("--cores", nargs="+", default=["0,1", "0,1", "0"],
                        help="one process per entry, pinned to these comma-separated cores")
    parser.add_argument("--unet_images", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.unet_images)), flush=True)
        return
    import tables

    print(f"# {tables.machine()}", flush=True)
    print("kind        cores  sha256 (16 hex)    final loss      same as first  seconds")
    for kind in args.kinds.split(","):
        first = None
        for cores in args.cores:
            row = _run_child(kind, cores, args.unet_images)
            first = first or row["sha256"]
            loss = "" if row["final_loss"] is None else f"{row['final_loss']:.10f}"
            print(f"{kind:<11} {cores:<6} {row['sha256']}   {loss:<15} "
                  f"{'yes' if row['sha256'] == first else 'NO':<14} {row['seconds']:.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
