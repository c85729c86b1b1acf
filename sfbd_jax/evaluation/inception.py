"""The FID Inception-v3 in Flax: 2048-d pool features, the network EDM and the SFBD paper use.

It is the TF "inception-2015-12-05" graph as ported by pytorch-fid (its FIDInceptionA/C/E
patches: average pools that ignore padding, a max pool in the last block), module for module,
so the converted weights load by name. Input: images (B, H, W, C) in [-1, 1], C ∈ {1, 3}
(grey images are repeated to RGB), bilinearly resized to 299×299 (align_corners=False).

Weights cannot be downloaded here. Convert the public pytorch-fid file once:

    python -m sfbd_jax.evaluation.inception convert \
        --src pt_inception-2015-12-05-6726825d.pth --dst ~/inception_fid.npz

(from https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/) and set
``config.eval.inception_weights`` to the .npz. No torch is needed: ``torch_pickle`` reads
both of torch's file formats.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sfbd_jax.evaluation import torch_pickle

FEATURE_DIM = 2048
INPUT_SIZE = 299
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")


def _pairs(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (inference statistics, ε = 1e-3) → ReLU."""

    features: int
    kernel: int | Sequence[int]
    stride: int = 1
    padding: int | Sequence[int] = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pairs(self.padding)
        x = nn.Conv(self.features, _pairs(self.kernel), _pairs(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x):
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
    """``max_pool``: the FID graph's last block pools with max instead of average."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """Images (B, H, W, 1|3) in [-1, 1] → pool features (B, 2048)."""

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        if x.shape[-1] != 3:
            raise ValueError(f"Inception takes 1 or 3 channels, got shape {images.shape}")
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear",
                             antialias=False)
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_valid(x)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_valid(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def abstract_variables() -> dict:
    """Shapes of the network's variables ({'params', 'batch_stats'}), nothing allocated."""
    dummy = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(lambda x: InceptionV3().init(jax.random.PRNGKey(0), x), dummy)


def random_variables(seed: int = 0) -> dict:
    """Random weights (tests, benchmarks): the features are meaningless but the statistics
    pipeline runs exactly as with the real weights. Kernels are He-scaled (√2 × Flax's LeCun
    init) so that activations keep their scale through the ReLU stack instead of vanishing."""
    # Jitted: XLA drops the unused forward pass (the same values as eager init, ~25% sooner).
    variables = jax.jit(InceptionV3().init)(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(x) * np.float32(np.sqrt(2.0) if path[-1].key == "kernel" else 1),
        variables)


# ----- weights ---------------------------------------------------------------------------
_TORCH_TO_FLAX = {
    "conv.weight": ("params", "conv", "kernel"),
    "bn.weight": ("params", "bn", "scale"),
    "bn.bias": ("params", "bn", "bias"),
    "bn.running_mean": ("batch_stats", "bn", "mean"),
    "bn.running_var": ("batch_stats", "bn", "var"),
}


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict:
    """pytorch-fid's Inception state dict → this module's variables (conv kernels OIHW → HWIO).

    The classifier head (``fc.*``) and ``num_batches_tracked`` are not used. Raises KeyError
    naming the missing or unexpected entries, ValueError for a wrong shape.
    """
    flat = {}
    for name, value in state_dict.items():
        if name.startswith("fc.") or name.endswith("num_batches_tracked"):
            continue
        parts = name.split(".")
        tail = ".".join(parts[-2:])
        if tail not in _TORCH_TO_FLAX:
            raise KeyError(f"unexpected entry {name!r} in the Inception weights")
        collection, layer, leaf = _TORCH_TO_FLAX[tail]
        array = np.asarray(value, np.float32)
        if leaf == "kernel":
            array = array.transpose(2, 3, 1, 0)
        flat[(collection, *parts[:-2], layer, leaf)] = array
    return _check_against_network(flat, "the converted state dict")


def _check_against_network(flat: dict, what: str) -> dict:
    expected = traverse_util.flatten_dict(abstract_variables())
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    extra = sorted("/".join(k) for k in flat.keys() - expected.keys())
    if missing or extra:
        raise KeyError(f"{what} does not match the FID Inception network: missing "
                       f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
                       f"{extra[:5]}{'…' if len(extra) > 5 else ''}")
    for key, spec in expected.items():
        if flat[key].shape != spec.shape:
            raise ValueError(f"{what}: {'/'.join(key)} has shape {flat[key].shape}, the network "
                             f"needs {spec.shape}")
    return traverse_util.unflatten_dict(flat)


def save_variables(variables: dict, path: str) -> None:
    """Write converted variables as an .npz keyed 'params/Mixed_5b/branch1x1/conv/kernel'."""
    flat = traverse_util.flatten_dict(variables)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{"/".join(k): np.asarray(v) for k, v in flat.items()})
    os.replace(tmp, path)


def load_variables(path: str) -> dict:
    """Variables from a converted .npz; a clear error when it is missing or does not fit."""
    if not path:
        raise FileNotFoundError(
            "FID/KID need the Inception weights: set config.eval.inception_weights to a "
            f"converted .npz. Download {WEIGHTS_URL} on a machine with internet, then run "
            "`python -m sfbd_jax.evaluation.inception convert --src <that .pth> --dst <.npz>`.")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Inception weights {path!r} (config.eval.inception_weights) do not exist. Convert "
            f"{WEIGHTS_URL} with `python -m sfbd_jax.evaluation.inception convert --src <.pth> "
            f"--dst {path}` and copy the result there (no download is possible at run time).")
    try:
        with np.load(path) as data:
            flat = {tuple(k.split("/")): data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"Inception weights {path!r} are not a readable .npz ({err}); "
                         "convert them again") from err
    return _check_against_network(flat, f"Inception weights {path!r}")


def file_fingerprint(path: str) -> str:
    """sha256 of a weights file: part of the key of cached reference statistics."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_file(src: str, dst: str) -> None:
    """pytorch-fid .pth (either torch format) → converted .npz."""
    save_variables(convert_state_dict(torch_pickle.load_state_dict(src)), dst)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert pytorch-fid's .pth to this module's .npz")
    convert.add_argument("--src", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    convert.add_argument("--dst", required=True, help="output .npz")
    args = parser.parse_args(argv)
    convert_file(args.src, args.dst)
    print(f"wrote {args.dst} (sha256 {file_fingerprint(args.dst)[:16]}…)")


if __name__ == "__main__":
    main()
