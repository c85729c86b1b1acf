"""Cost of the nearest-neighbour metrics at evaluation scale (time and memory, host float64).

    python benchmarks/bench_neighbours.py --samples 50000 --references 50000 --dim 2048
    python benchmarks/bench_neighbours.py --samples 10000 --references 10000 --dim 784

Random Gaussian rows stand in for pixels or features (the cost depends on the sizes only).
Prints seconds and peak memory of memorisation (d₁, d₂ of every sample + the leave-one-out
baseline of the references) and of precision/recall + density/coverage, with the size of the
full distance matrix that the blocks avoid.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from sfbd_jax.evaluation import neighbours  # noqa: E402


def measure(name: str, fn) -> dict:
    tracemalloc.start()
    start = time.time()
    fn()
    seconds = time.time() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"step": name, "seconds": seconds, "numpy_peak_mib": peak / 2**20}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--references", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--block_elements", type=int, default=neighbours.DEFAULT_BLOCK_ELEMENTS)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(args.samples, args.dim))
    refs = rng.normal(size=(args.references, args.dim))
    block = args.block_elements
    rows = [measure("memorisation (d1, d2 + leave-one-out baseline)",
                    lambda: neighbours.memorisation(samples, refs, block_elements=block)),
            measure("precision/recall + density/coverage",
                    lambda: neighbours.manifold_metrics(refs, samples, block_elements=block))]
    full = args.samples * args.references * 8 / 2**20
    print(f"{args.samples} samples × {args.references} references × {args.dim} dims, blocks of "
          f"{block} entries ({block * 8 / 2**20:.0f} MiB); the full distance matrix would be "
          f"{full:.0f} MiB; {os.cpu_count()} CPUs")
    print("| step | seconds | peak NumPy allocations (MiB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']:.1f} | {r['numpy_peak_mib']:.0f} |")
    print(f"process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB"
          " (inputs included)")
    return rows


if __name__ == "__main__":
    main()
