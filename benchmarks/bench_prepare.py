"""Speed of preparing a corrupted data set (``sfbd_jax.data.prepare``) at CIFAR-10 size.

    python benchmarks/bench_prepare.py --images 50000                  # 32×32×3, 4% clean
    python benchmarks/bench_prepare.py --images 2000 --corruptions gaussian_noise

Writes ``--images`` random 32×32 RGB PNGs into a folder once (untimed; smooth random patterns,
so PNG decoding costs what it costs for real photos of that size), then prepares the set from
that folder with each corruption and prints images/s, the seconds spent and the number of XLA
compilations (a compilation per chunk shape would show up here). The time should be spent
reading/decoding the images, the corruption's arithmetic and writing the shards.
"""

from __future__ import annotations

import argparse
import logging as logging_std
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


class _CompileCounter(logging_std.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if "Finished XLA compilation" in record.getMessage():
            self.count += 1


def write_folder(folder: str, count: int, size: int = 32, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        coarse = rng.integers(0, 256, (size // 4, size // 4, 3)).astype(np.uint8)
        img = np.kron(coarse, np.ones((4, 4, 1), np.uint8))
        Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.png"))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--corruptions", default="gaussian_noise,gaussian_blur")
    parser.add_argument("--clean_fraction", type=float, default=0.04)
    parser.add_argument("--shard_size", type=int, default=10_000)
    parser.add_argument("--dir", default="", help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)

    import jax

    from configs import default
    from sfbd_jax.data import prepare

    scratch = tempfile.mkdtemp(dir=args.dir or None, prefix="bench_prepare_")
    try:
        folder = os.path.join(scratch, "images")
        start = time.time()
        write_folder(folder, args.images)
        print(f"wrote {args.images} PNGs of 32×32×3 in {time.time() - start:.0f} s (untimed)")
        jax.config.update("jax_log_compiles", True)
        counter = _CompileCounter()
        logging_std.getLogger("jax").addHandler(counter)
        results = []
        for kind in args.corruptions.split(","):
            c = default.get_config()
            c.data.source, c.data.folder = "folder", folder
            c.data.image_size, c.data.channels = 32, 3
            c.corrupt.type = kind
            c.corrupt.clean_count, c.corrupt.clean_fraction = 0, args.clean_fraction
            c.corrupt.shard_size = args.shard_size
            c.corrupt.output_dir = os.path.join(scratch, f"prepared_{kind}")
            counter.count = 0
            start = time.time()
            manifest = prepare.prepare(c)
            seconds = time.time() - start
            row = {"corruption": kind, "images": args.images, "seconds": seconds,
                   "images_per_sec": args.images / seconds, "compilations": counter.count,
                   "noisy": manifest["counts"]["noisy"]}
            results.append(row)
            print(f"{kind:15s} {args.images} images in {seconds:6.1f} s = "
                  f"{row['images_per_sec']:7.0f} images/s, {counter.count} XLA compilations")
        return results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
