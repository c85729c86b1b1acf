"""The PyTorch side of benchmarks/vs_pytorch.py (run with a Python that has torch).

    python benchmarks/torch_worker.py --reference /tmp/sfbd_ref --threads 2   # JSON lines on stdin

Builds the reference's own network (``training.networks.EDMPrecond`` with ``SongUNet``, from
the checkout given by ``--reference``; nothing of it is copied here) with the SongUNet arguments
the driver sends (config A or EDM's CIFAR-10 DDPM++), trains it with EDM's loss as written in
the reference's ``training/loss.py`` and Adam, and times what the driver asks: ``setup``,
``train`` (steps), ``sample`` (Heun probability-flow ODE on the Karras grid, no churn),
``memory``. Eager PyTorch, ``--threads`` intra-op threads, on ``--device`` (cpu or cuda; on
cuda with cuDNN's autotuner on, as EDM's ``--bench`` default) at ``--precision``: f32 (TF32 off,
the reference training loop's setting), tf32 (TF32 on) or bf16 (the SongUNet inside
EDMPrecond run under autocast to bfloat16, its output cast back to float32 — EDMPrecond
asserts a float32 output unless its own fp16 switch is on — as sfbd_jax's bf16 compute: the
preconditioning, loss and optimiser stay float32).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def main() -> None:
    t0 = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("f32", "tf32", "bf16"), default="f32")
    args = parser.parse_args()
    sys.path.insert(0, args.reference)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = args.precision != "f32"
        torch.backends.cuda.matmul.allow_tf32 = args.precision != "f32"
    where = torch.cuda.get_device_name(device) if args.device == "cuda" else "cpu"
    from training import networks  # the reference's code
    from training.loss import EDMLoss

    net = opt = loss_fn = images = None
    step_index = 0
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "setup":
            torch.manual_seed(0)
            net = networks.EDMPrecond(
                img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet",
                embedding_type="positional", encoder_type="standard", decoder_type="standard",
                channel_mult_noise=1, resample_filter=[1, 1], **msg["network"]).to(device)
            if args.precision == "bf16":
                _compute_in_bf16(net.model, args.device)
            net.train()
            opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
            loss_fn = EDMLoss()
            rng = np.random.default_rng(0)
            images = [torch.from_numpy(rng.uniform(-1, 1, (msg["batch"], 3, 32, 32))
                                       .astype(np.float32)).to(device) for _ in range(4)]
            _train_step(net, opt, loss_fn, images[0])
            reply = {"params": int(sum(p.numel() for p in net.parameters())),
                     "setup_seconds": time.perf_counter() - t0,
                     "versions": f"torch {torch.__version__}, {args.threads} threads, {where}"}
        elif msg["cmd"] == "train":
            times = []
            for _ in range(msg["steps"]):
                step_index += 1
                t = time.perf_counter()
                loss = _train_step(net, opt, loss_fn, images[step_index % 4])
                times.append(time.perf_counter() - t)
            reply = {"seconds": times, "loss": loss}
        elif msg["cmd"] == "sample":
            net.eval()
            gen = torch.Generator().manual_seed(1)
            x = torch.randn((msg["n"], 3, 32, 32), generator=gen).to(device)
            _heun(net, x, msg["levels"])  # warm-up, as on the JAX side
            _sync(device)
            t = time.perf_counter()
            _heun(net, x, msg["levels"])
            _sync(device)
            reply = {"seconds": time.perf_counter() - t}
            net.train()
        elif msg["cmd"] == "memory":
            if args.device == "cuda":
                reply = {"memory_kind": "device 0 peak",
                         "peak_bytes": int(torch.cuda.max_memory_allocated(device))}
            else:
                reply = {"memory_kind": "host max RSS",
                         "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        else:
            return
        print(json.dumps(reply), flush=True)


def _compute_in_bf16(model, device: str) -> None:
    """Run ``model`` (the SongUNet inside EDMPrecond) under bf16 autocast, returning float32."""
    import torch

    forward = model.forward

    def bf16_forward(*args, **kwargs):
        with torch.autocast(device, dtype=torch.bfloat16):
            return forward(*args, **kwargs).float()

    model.forward = bf16_forward


def _train_step(net, opt, loss_fn, images) -> float:
    """One Adam step on EDM's loss; ``loss.item()`` waits for the device, as the JAX side's
    ``block_until_ready``."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net=net, images=images).mean()
    loss.backward()
    opt.step()
    return loss.item()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _heun(net, x, levels: int, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's deterministic Heun sampler (S_churn = 0): 2·levels − 1 network evaluations."""
    import torch

    i = torch.arange(levels, dtype=torch.float64, device=x.device)
    t = (sigma_max ** (1 / rho) + i / (levels - 1)
         * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros_like(t[:1])])
    x = x.to(torch.float64) * t[0]
    with torch.no_grad():
        for k in range(levels):
            d = (x - net(x.float(), t[k].float()).to(torch.float64)) / t[k]
            x_next = x + (t[k + 1] - t[k]) * d
            if k < levels - 1:
                d2 = (x_next - net(x_next.float(), t[k + 1].float()).to(torch.float64)) / t[k + 1]
                x_next = x + (t[k + 1] - t[k]) * (0.5 * d + 0.5 * d2)
            x = x_next
    return x


if __name__ == "__main__":
    main()
