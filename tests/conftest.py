"""Test set-up: 2 CPU host devices for every test (before JAX initialises its backends), so
1-device and 2-device meshes can be compared in one process."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import pytest  # noqa: E402

from sfbd_jax.utils import devices  # noqa: E402

devices.configure_cpu_devices(2)

# Many tests build the same tiny networks in fresh Experiments (new jitted closures, the same
# HLO): a persistent compilation cache for the session lets them reuse the compiled programs.
_CACHE_DIR = tempfile.mkdtemp(prefix="sfbd_jax_test_xla_cache_")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
# The command-line tests' subprocesses share it (JAX reads its options from the environment).
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def tiny_config(image_size: int = 8, channels: int = 1) -> ml_collections.ConfigDict:
    """The default config shrunk to a network that compiles and steps in seconds."""
    from configs import default

    c = default.get_config()
    c.data.image_size = image_size
    c.data.channels = channels
    c.model.base_channels = 8
    c.model.channel_mult = (1, 2)
    c.model.num_blocks = 1
    c.model.attn_resolutions = (image_size // 2,)
    c.model.channels_per_head = 8
    c.model.emb_mult = 2
    c.sampler.num_steps = 4
    c.optim.warmup_images = 64
    c.ema.halflife_images = 64
    c.train.batch_size = 8
    c.train.total_images = 64
    c.train.log_every_steps = 2
    c.train.checkpoint_every_steps = 4
    c.train.sample_every_steps = 0
    c.train.num_samples = 4
    c.train.async_checkpoints = False
    return c


def largest_data_file(step_dir) -> str:
    """The largest file of a checkpoint step directory (its array data)."""
    from sfbd_jax.utils import integrity

    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names
             if name != integrity.RECORD]
    return max(files, key=os.path.getsize)


def flip_bytes(path: str, count: int = 16) -> None:
    """Invert ``count`` bytes in the middle of the file (size unchanged)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(count)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))



@pytest.fixture
def two_devices():
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 host devices")
    return jax.devices()[:2]


def kill_after_checkpoint(at_step: int):
    """A replacement for ``Checkpointer.save`` that saves, waits, then raises
    KeyboardInterrupt after the training checkpoint of ``at_step`` (a kill at that point)."""
    from sfbd_jax.utils import checkpoints

    real_save = checkpoints.Checkpointer.save

    def save(self, step, state, force=True):
        real_save(self, step, state, force)
        if step == at_step and "checkpoints" in self.directory:
            self.wait()
            raise KeyboardInterrupt(f"killed after checkpoint {step}")
    return save


def make_image_folder(folder, count: int, seed: int) -> str:
    """``count`` smooth 8×8 grey PNGs (upsampled random 2×2 patterns) in ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.uniform(0, 255, (2, 2))
        Image.fromarray(np.kron(coarse, np.ones((4, 4))).astype(np.uint8)).save(
            folder / f"{i:02d}.png")
    return str(folder)
