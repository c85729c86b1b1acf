"""Data at scale: host memory, input speed and disk of the streamed input as the set grows.

    python benchmarks/data_scale.py --out runs/data_scale --sizes 10000,100000 --image_size 32
    python benchmarks/data_scale.py --out runs/data_scale --sizes 1000000 --image_size 64

For each size a synthetic prepared data set (smooth random uint8 images, 10% clean, the rest
with σ_ζ = 0.2 Gaussian noise) is written by the project's own ``prepare`` (compact storage,
checksums, manifest) under OUT/data/ — never committed; then, each in a fresh process:

* ``sfbd_round``: one SFBD round (pretraining, the backward pass over *every* noisy image,
  the forward step on D^(1) ∪ D_clean) with a tiny network and a short backward grid;
* ``ambient``: an Ambient-Omni run (fixed annotation) over clean ∪ noisy;
* ``speed``: training images/s and the share of the loop's time spent waiting for input, for
  the streamed set (memory-mapped shards) with and without prefetch, and for the same images
  held in memory (only where they fit: the 10k set).

Memory is the process's peak RssAnon (anonymous memory: heap, arrays; file-backed pages of
the memory-mapped shards excluded), sampled every 50 ms. Disk: bytes per image of each group
against float32 storage. Rows already in OUT/results.jsonl (or ARCHIVE/results.jsonl with
``--archive``) are skipped (resumable row by row);
``--report`` prints the tables. ``--backward_evaluations 1`` gives the round's backward pass one
network evaluation per image instead of 3 (the grid [σ_ζ, 0]: one Euler step, i.e. the
denoiser's estimate D(y; σ_ζ); the same data path and denoising-batch memory in a third of the
time: how a 1 M × 64² round fits a CPU session); its rows are kept apart. The
``sfbd_round`` row also resumes *within* itself: its run directory is kept, and a killed worker
is continued by the next call (see ``worker``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tables  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("out", "runs/data_scale", "Output directory (data sets, results).")
flags.DEFINE_string("sizes", "10000,100000", "Data set sizes (images).")
flags.DEFINE_integer("image_size", 32, "Image side (3 channels).")
flags.DEFINE_string("kinds", "sfbd_round,ambient,speed", "What to measure.")
flags.DEFINE_integer("repeats", 1, "Speed measurements per variant, interleaved.")
flags.DEFINE_enum("backward_evaluations", "3", ["3", "1"], "Network evaluations per image in "
                  "the sfbd_round's backward pass: 3 (the default grid σ_ζ → σ_min → 0, Heun "
                  "then Euler) or 1 (σ_ζ → 0, one Euler step). One costs a third of the time "
                  "at the same data path and batch memory; rows of each setting are kept "
                  "apart.")
flags.DEFINE_string("archive", "", "Keep the rows (results.jsonl, a few kB) here instead of in "
                    "OUT, e.g. benchmarks/results/data_scale: committed, the table is built "
                    "across machines while the data sets stay in OUT.")
flags.DEFINE_bool("report", False, "Print the tables of the rows and exit.")
flags.DEFINE_string("worker", "", "Internal: run one measurement and print its JSON.")
flags.DEFINE_string("data", "", "Internal: the prepared data directory.")
FLAGS = flags.FLAGS

CLEAN_FRACTION = 0.1
SIGMA = 0.2
DEFAULT_EVALUATIONS = 3  # the backward cost of the default grid [σ_ζ, σ_min, 0]


def synthetic_chunks(num: int, size: int, chunk: int, seed: int = 0):
    """Smooth random RGB uint8 images (8×8 random patterns upsampled), chunk by chunk; the
    same images on every pass."""
    import numpy as np

    from sfbd_jax.data.pixels import uint8_to_unit_range

    for start in range(0, num, chunk):
        rows = min(chunk, num - start)
        rng = np.random.default_rng([seed, start])
        coarse = rng.integers(0, 256, (rows, 8, 8, 3), dtype=np.uint8)
        pixels = np.repeat(np.repeat(coarse, size // 8, axis=1), size // 8, axis=2)
        yield uint8_to_unit_range(pixels), None


def base_config(data_dir: str, size: int):
    from configs import default

    c = default.get_config()
    # Named as a tfds set (never loaded: the prepared set exists before any run reads it).
    c.data.image_size, c.data.channels, c.data.source = size, 3, "tfds"
    c.data.tfds_name = f"synthetic/{os.path.basename(data_dir)}"
    c.data.random_flip = False
    c.corrupt.output_dir = data_dir
    c.corrupt.clean_count, c.corrupt.clean_fraction = 0, CLEAN_FRACTION
    c.corrupt.sigma = SIGMA
    c.corrupt.shard_size = 10_000
    # Levels down to a 16×16 bottleneck at every image size: the U-Net's middle block always
    # attends over the bottleneck's pixels, and at 64² with two levels its (32·32)² attention
    # weights alone were ~8 GiB for the 1,000-image denoising batch (XLA's temporaries grew
    # 12× from 32² to 64²), which is the network's cost, not the data path's.
    c.model.base_channels, c.model.num_blocks = 8, 1
    c.model.channel_mult = (1,) + (2,) * (max(size // 16, 2).bit_length() - 1)
    c.model.attn_resolutions, c.model.channels_per_head, c.model.emb_mult = (), 8, 2
    c.train.batch_size, c.train.steps_per_dispatch = 64, 1
    c.train.log_every_steps, c.train.checkpoint_every_steps = 10, 10_000
    c.train.sample_every_steps, c.train.num_samples = 0, 4
    c.train.async_checkpoints = False
    c.sampler.num_steps = 4
    c.optim.warmup_images, c.ema.halflife_images = 640, 640
    return c


def prepare_synthetic(data_dir: str, num: int, size: int) -> dict:
    """Write (or find) the synthetic prepared set; returns its manifest."""
    from sfbd_jax.data import prepare, sources

    def fake_source(data_config, chunk_size=1024):
        return "synthetic", 0, synthetic_chunks(num, size, chunk_size)

    real = sources.iter_source
    sources.iter_source = fake_source
    try:
        return prepare.prepare(base_config(data_dir, size))
    finally:
        sources.iter_source = real


class PeakAnon:
    """The peak RssAnon (MiB) of this process, sampled every 50 ms by a thread.

    With ``progress_path`` the running peak and elapsed seconds are rewritten there every
    second, so a process killed part-way (a long row resumed across sessions) leaves its figures.
    """

    def __init__(self, progress_path: str | None = None):
        self.peak = 0.0
        self.timeline: list[tuple[float, float]] = []  # (unix time, RssAnon MiB) every 1 s
        self._progress_path = progress_path
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def _run(self):
        last = 0.0
        while not self._stop.is_set():
            value = self.now()
            self.peak = max(self.peak, value)
            if time.time() - last >= 1.0:
                last = time.time()
                self.timeline.append((last, value))
                if self._progress_path:
                    self._write_progress()
            time.sleep(0.05)

    def _write_progress(self) -> None:
        tmp = self._progress_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"peak_rss_anon_mib": self.peak,
                       "seconds": time.perf_counter() - self._start}, f)
        os.replace(tmp, self._progress_path)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())
        if self._progress_path:
            self._write_progress()
        return self.peak


def run_name(kind: str, data_dir: str, backward_evaluations: int) -> str:
    """The name of a measurement's run directory and log (an sfbd_round with another backward
    cost than the default 3 evaluations per image is another run)."""
    other = kind == "sfbd_round" and backward_evaluations != DEFAULT_EVALUATIONS
    cost = f"-eval{backward_evaluations}" if other else ""
    return f"{kind}-{os.path.basename(data_dir)}{cost}"


def row_key(row: dict) -> tuple:
    """What identifies a row of results.jsonl (rows written before the backward cost was a
    flag have the default 3 evaluations per image)."""
    cost = (row.get("backward_evaluations", DEFAULT_EVALUATIONS) if row["kind"] == "sfbd_round"
            else None)
    return row["kind"], row["images"], row["image_size"], cost


def worker(kind: str, data_dir: str, size: int,
           backward_evaluations: int = DEFAULT_EVALUATIONS) -> dict:
    import jax

    from sfbd_jax import run as run_lib

    run_lib._setup()
    config = base_config(data_dir, size)
    workdir = os.path.join(os.path.dirname(os.path.dirname(data_dir)), "work",
                           run_name(kind, data_dir, backward_evaluations))
    import shutil

    # One SFBD round at 1 M images outlasts a session on CPU: its run directory is kept and the
    # next call resumes it (committed denoised shards and checkpoints are reused, as in any
    # interrupted run); each process ("piece") leaves its peak and seconds in pieces/.
    resumable = kind == "sfbd_round"
    pieces = os.path.join(workdir, "pieces")
    if not (resumable and os.path.isdir(pieces)):
        shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(pieces, exist_ok=True)
    piece = os.path.join(pieces, f"piece-{len(os.listdir(pieces)):03d}.json")
    memory = PeakAnon(piece if resumable else None)
    start = time.perf_counter()
    out: dict = {}
    if kind == "sfbd_round":
        config.mode = "sfbd"
        config.sfbd.pretrain_images = config.sfbd.images_per_round = 640
        config.sfbd.rounds = 1
        # A short grid from σ_ζ: the data path is measured, not the denoising quality. The
        # default 4-level Karras grid keeps only σ_min below σ_ζ ([σ_ζ, σ_min, 0]: 3
        # evaluations); σ_min above σ_ζ leaves [σ_ζ, 0], one Euler step (1 evaluation).
        from sfbd_jax.methods import backward

        config.sfbd.backward_num_steps = 4
        if backward_evaluations == 1:
            config.sampler.sigma_min = 2 * SIGMA
        cost = backward.cost_per_image(config, SIGMA)[0]
        if cost != backward_evaluations:
            raise ValueError(f"the backward grid {backward.backward_grid(config, SIGMA)} costs "
                             f"{cost} evaluations per image, not {backward_evaluations}")
        out["backward_evaluations"] = cost
        config.sfbd.denoise_batch_size = 1000
        config.sfbd.denoise_shard_size = 10_000
        config.sfbd.eval_every_round = False
        run_lib.run(config, workdir)
    elif kind == "ambient":
        config.mode = "ambient"
        config.train.total_images = 1280
        config.ambient.annotation = "fixed"
        run_lib.run(config, workdir)
    elif kind.startswith("speed"):
        out.update(speed(config, data_dir, workdir, kind.split("#")[0]))
    elif kind == "gather":
        out.update(gather(data_dir))
    else:
        raise ValueError(kind)
    out.update(peak_rss_anon_mib=memory.stop(), seconds=time.perf_counter() - start,
               devices=jax.device_count())
    if resumable:  # the row covers every piece: the largest peak, the summed time
        figures = []
        for name in sorted(os.listdir(pieces)):
            with open(os.path.join(pieces, name)) as f:
                figures.append(json.load(f))
        out.update(peak_rss_anon_mib=max(x["peak_rss_anon_mib"] for x in figures),
                   seconds=sum(x["seconds"] for x in figures), pieces=len(figures))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "rss_anon_timeline.json"), "w") as f:
        json.dump(memory.timeline, f)  # beside the run's log (worker_log.txt), to find peaks
    return out


def speed(config, data_dir: str, workdir: str, kind: str) -> dict:
    """Images/s and input wait of ``kind`` = speed-{streamed,streamed_noprefetch,memory}."""
    import numpy as np

    from sfbd_jax.data import rows
    from sfbd_jax.data.prepared import PreparedDataset
    from sfbd_jax.data.sources import ImageDataset
    from sfbd_jax.training.loop import Experiment
    from sfbd_jax.utils.checkpoints import Checkpointer

    variant = kind.split("-", 1)[1]
    noisy, _ = PreparedDataset(data_dir, lazy=True).noisy()  # the largest group, clipped
    images = rows.ConcatenatedRows([noisy.images], [rows.clip_to_image_range], name="noisy")
    dataset = ImageDataset(images, None, 0, "noisy")
    if variant == "memory":
        dataset = ImageDataset(images.all_rows(), None, 0, "noisy in memory")
    config.train.prefetch_dispatches = 0 if variant == "streamed_noprefetch" else 2
    exp = Experiment(config)
    ckpt = Checkpointer(os.path.join(workdir, "ckpt"), enable_async=False)

    class Writer:
        scalars: list = []

        def write_scalars(self, step, scalars):
            self.scalars.append(scalars)

    writer = Writer()
    warm, steps = 20, 220  # the first 20 steps compile; measured: steps 20..220
    state = exp.train(exp.init_state(), dataset, end_step=warm, phase_start_step=0,
                      data_seed=0, checkpointer=ckpt, writer=writer, workdir=workdir)
    writer.scalars.clear()
    state = exp.train(state, dataset, end_step=steps, phase_start_step=0, data_seed=0,
                      checkpointer=ckpt, writer=writer, workdir=workdir)
    ckpt.close()
    rates = [s["train/images_per_sec"] for s in writer.scalars]
    waits = [s["train/input_wait_fraction"] for s in writer.scalars]
    return {"images_per_sec": float(np.mean(rates)), "input_wait_fraction": float(np.mean(waits)),
            "measured_steps": steps - warm}


def gather(data_dir: str, batch: int = 64, batches: int = 200) -> dict:
    """Milliseconds per batch of ``TrainBatches.get`` alone (rows read, decoded, checked and
    placed on the devices), streamed from the shards and from memory."""
    from sfbd_jax.data import pipeline, rows
    from sfbd_jax.data.prepared import PreparedDataset
    from sfbd_jax.data.sources import ImageDataset
    from sfbd_jax.utils import devices

    noisy, _ = PreparedDataset(data_dir, lazy=True).noisy()
    streamed = rows.ConcatenatedRows([noisy.images], [rows.clip_to_image_range])
    out = {}
    for name, images in (("streamed", streamed), ("memory", streamed.all_rows())):
        source = pipeline.TrainBatches(ImageDataset(images, None, 0, name), batch, 1, 0,
                                       devices.make_data_mesh(), 0)
        source.get(0)["image"].block_until_ready()
        start = time.perf_counter()
        for step in range(batches):
            source.get(step)["image"].block_until_ready()
        out[f"gather_ms_{name}"] = (time.perf_counter() - start) / batches * 1e3
    return out


def disk_figures(data_dir: str, manifest: dict) -> dict:
    """Bytes per image of each group as stored, and as float32 (the storage before)."""
    shape = manifest["image_shape"]
    float32 = 4 * shape[0] * shape[1] * shape[2]
    out = {}
    for group, name in (("clean", "images"), ("noisy", "images"), ("eval_only", "originals")):
        entries = manifest["shards"][group].get(name, [])
        rows = sum(e["rows"] for e in entries)
        if rows:
            size = sum(os.path.getsize(os.path.join(data_dir, e["file"])) for e in entries)
            out[group] = {"bytes_per_image": size / rows, "float32_bytes_per_image": float32,
                          "dtype": manifest["storage"][group]}
    return out


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def report(out: str) -> None:
    rows = _rows(os.path.join(FLAGS.archive or out, "results.jsonl"))
    print("| set | kind | peak RssAnon (MiB) | images/s | input wait | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] in ("disk", "gather"):
            continue
        kind = r["kind"] if row_key(r)[3] in (None, DEFAULT_EVALUATIONS) else \
            f"{r['kind']} ({r['backward_evaluations']} evaluation/image)"
        print(f"| {r['images']:,} × {r['image_size']}² | {kind} | "
              f"{r.get('peak_rss_anon_mib', float('nan')):.0f} | "
              f"{r.get('images_per_sec', float('nan')):.1f} | "
              f"{r.get('input_wait_fraction', float('nan')):.3f} | {r['seconds']:.0f} |")
    import numpy as np

    speeds: dict = {}
    for r in rows:
        if r["kind"].startswith("speed"):
            key = (r["images"], r["image_size"], r["kind"].split("#")[0])
            speeds.setdefault(key, []).append((r["images_per_sec"], r["input_wait_fraction"]))
    print("\n| set | input | runs | images/s (mean ± 95% t) | input wait fraction |")
    print("|---|---|---|---|---|")
    for (num, size, kind), values in sorted(speeds.items()):
        rate = np.array([v[0] for v in values])
        # One run has no interval: say so rather than print "± 0".
        spread = f" ± {tables.mean_ci(rate)[1]:.1f}" if len(rate) > 1 else " (no interval)"
        print(f"| {num:,} × {size}² | {kind[len('speed-'):]} | {len(rate)} | "
              f"{rate.mean():.1f}{spread} | "
              f"{np.mean([v[1] for v in values]):.4f} |")
    # Paired by repeat (the variants of a repeat ran back to back): streamed / in memory.
    by_repeat: dict = {}
    for r in rows:
        if r["kind"].startswith("speed"):
            kind, _, rep = r["kind"].partition("#")
            by_repeat.setdefault((r["images"], r["image_size"], rep or "0"), {})[kind] = r
    for variant in ("speed-streamed", "speed-streamed_noprefetch"):
        ratios = np.array([v[variant]["images_per_sec"] / v["speed-memory"]["images_per_sec"]
                           for v in by_repeat.values() if variant in v and "speed-memory" in v])
        if len(ratios) > 1:
            half = tables.mean_ci(ratios)[1]
            print(f"{variant[len('speed-'):]} / in memory, paired over {len(ratios)} repeats: "
                  f"{ratios.mean():.3f} ± {half:.3f} ({', '.join(f'{x:.3f}' for x in ratios)})")
    for r in rows:
        if r["kind"] == "gather":
            print(f"gather {r['images']:,} × {r['image_size']}²: streamed "
                  f"{r['gather_ms_streamed']:.2f} ms/batch, in memory "
                  f"{r['gather_ms_memory']:.2f} ms/batch (batch 64)")
    for r in rows:
        if r["kind"] == "disk":
            print(f"disk {r['images']:,} × {r['image_size']}²: " + "; ".join(
                f"{g} {v['dtype']} {v['bytes_per_image']:.0f} B/image (float32: "
                f"{v['float32_bytes_per_image']} B)" for g, v in r["groups"].items()))


def main(argv):
    del argv
    evaluations = int(FLAGS.backward_evaluations)
    if FLAGS.worker:
        print("RESULT " + json.dumps(worker(FLAGS.worker, FLAGS.data, FLAGS.image_size,
                                            evaluations)))
        return
    out = os.path.abspath(FLAGS.out)
    if FLAGS.report:
        report(out)
        return
    os.makedirs(out, exist_ok=True)
    if FLAGS.archive:
        os.makedirs(FLAGS.archive, exist_ok=True)
    results = os.path.join(FLAGS.archive or out, "results.jsonl")
    done = {row_key(r) for r in _rows(results)}
    for num in (int(s) for s in FLAGS.sizes.split(",")):
        data_dir = os.path.join(out, "data", f"synthetic{num}_{FLAGS.image_size}")
        t0 = time.perf_counter()
        manifest = prepare_synthetic(data_dir, num, FLAGS.image_size)
        kinds = ["disk"] + [k for k in FLAGS.kinds.split(",") if k != "speed"]
        if "speed" in FLAGS.kinds.split(","):
            variants = ["speed-streamed", "speed-streamed_noprefetch"]
            if num <= 10_000:
                variants.append("speed-memory")
            # Odd repeats run the variants in reverse order, so a machine that drifts
            # during a repeat does not always favour the same variant.
            kinds = [k for k in kinds if k != "gather"] + ["gather"] + [
                v if r == 0 else f"{v}#{r}" for r in range(FLAGS.repeats)
                for v in (variants if r % 2 == 0 else variants[::-1])]
        for kind in kinds:
            cost = evaluations if kind == "sfbd_round" else None
            if (kind, num, FLAGS.image_size, cost) in done:
                continue
            row = {"kind": kind, "images": num, "image_size": FLAGS.image_size,
                   "machine": tables.machine() + " at the start"}
            if kind == "disk":
                row.update(groups=disk_figures(data_dir, manifest),
                           seconds=time.perf_counter() - t0)
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--data",
                       data_dir, "--image_size", str(FLAGS.image_size),
                       "--backward_evaluations", FLAGS.backward_evaluations]
                log_path = os.path.join(out, "work", run_name(
                    kind, data_dir, evaluations) + ".log")
                os.makedirs(os.path.dirname(log_path), exist_ok=True)
                with open(log_path, "a") as log:  # a resumed row keeps each piece's log
                    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not lines:
                    raise RuntimeError(f"{kind} at {num} failed: see {log_path}")
                row.update(json.loads(lines[-1][len("RESULT "):]))
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    report(out)


if __name__ == "__main__":
    app.run(main)
