"""Parity of the Flax FID Inception (sfbd_jax/evaluation/inception.py) with pytorch-fid.

Needs torch, torchvision and pytorch-fid, which the project does not depend on; run it in an
environment that has them and the project (or in two, sharing DIR):

    python benchmarks/inception_parity.py torch DIR   # random-weight pytorch-fid net → DIR
    python benchmarks/inception_parity.py jax DIR     # convert DIR's .pth, compare features

Random weights (He-scaled, BN statistics calibrated on a random batch) exercise every layer,
the converter (legacy torch format, as pytorch-fid's published file) and the resize.
"""

import sys

import numpy as np


def torch_side(out_dir: str) -> None:
    import torch
    import torch.nn.functional as F
    from pytorch_fid import inception as pfi

    torch.manual_seed(0)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    # The same patches as pytorch_fid.inception.fid_inception_v3, without its download.
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    blocks = [net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, torch.nn.MaxPool2d(3, 2),
              net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, torch.nn.MaxPool2d(3, 2),
              net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
              net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c]

    def run(t):
        for block in blocks:
            t = block(t)
        return t

    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
        for m in net.modules():  # BN statistics = those of one calibration batch
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        net.train()
        rng = np.random.default_rng(1)
        run(torch.from_numpy(rng.uniform(-1, 1, (8, 3, 299, 299)).astype(np.float32)))
        net.eval()
        torch.save(net.state_dict(), f"{out_dir}/random_fid_inception.pth",
                   _use_new_zipfile_serialization=False)
        x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
        t = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                          mode="bilinear", align_corners=False)
        features = run(t).mean(dim=(2, 3)).numpy()
    np.save(f"{out_dir}/inputs.npy", x)
    np.save(f"{out_dir}/torch_features.npy", features)
    print(f"wrote {out_dir}/random_fid_inception.pth and the reference features")


def jax_side(out_dir: str) -> None:
    import jax

    from sfbd_jax.evaluation import inception

    inception.convert_file(f"{out_dir}/random_fid_inception.pth", f"{out_dir}/random.npz")
    variables = inception.load_variables(f"{out_dir}/random.npz")
    x = np.load(f"{out_dir}/inputs.npy")
    ours = np.asarray(jax.jit(inception.InceptionV3().apply)(variables, x))
    ref = np.load(f"{out_dir}/torch_features.npy")
    print(f"max |Flax - pytorch-fid| = {np.abs(ours - ref).max():.3g} "
          f"(features up to {np.abs(ref).max():.3g}, spread across inputs {ref.std(0).mean():.3g})")


if __name__ == "__main__":
    {"torch": torch_side, "jax": jax_side}[sys.argv[1]](sys.argv[2])
