"""Benchmark GAN-AE (``gan-ae.txt`` §II): training-step time of both stages and scoring speed.

For each image size (64 and 128 px by default) the networks of ``conf/model/ganae.yaml``
(overridable: ``--base-channels``, ``--channels``, ``--latent-dim``) are built and timed on
random images in [0, 1] (model time only, no data loading):

* **critic+generator step** — one generator iteration of stage 1: ``n_critic`` critic steps
  (eq. 2 with the gradient penalty's double backward) and one generator step (eq. 1), Adam
  as configured; also per critic step and per generator step;
* **encoder step** — one stage-2 step: x̂ = G(E(x)) with G and D frozen, ``loss=ssim_feat``
  (eq. 3: SSIM + the critic's penultimate features), backward into E, Adam;
* **scoring images/s** — eq. 7 (``score=mse_ssim_feat``) with the localisation map, no grad.

Each time is the median of ``--repeat`` runs after ``--warmup`` untimed ones.

    .venv/bin/python experiments/bench_ganae.py
    .venv/bin/python experiments/bench_ganae.py --sizes 64 128 256 --batch-size 32 --device cuda
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from elinspect.losses.reconstruction import SsimFeatureLoss  # noqa: E402
from elinspect.models.anomaly.ganae import GanAe, critic_loss, generator_loss  # noqa: E402

CONFIG = REPO / "conf" / "model" / "ganae.yaml"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def adam(node, params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=float(node.lr), betas=tuple(node.betas))


def bench_size(args: argparse.Namespace, cfg, size: int, device: torch.device) -> dict[str, object]:
    torch.manual_seed(args.seed)
    net = GanAe.build(
        channels=args.channels,
        image_size=size,
        latent_dim=args.latent_dim,
        base_channels=args.base_channels,
        generator_norm=cfg.generator_norm,
        encoder_norm=cfg.encoder_norm,
        score="mse_ssim_feat",
    ).to(device)
    g, d, e = net.generator, net.critic, net.encoder
    opt_c, opt_g = adam(cfg.critic_optimizer, d.parameters()), adam(cfg.generator_optimizer, g.parameters())
    opt_e = adam(cfg.encoder_optimizer, e.parameters())
    n = args.batch_size
    real = torch.rand(n, args.channels, size, size, device=device)
    loss_e = SsimFeatureLoss()

    def critic_step() -> None:
        with torch.no_grad():
            fake = g(g.sample_latent(n))
        loss, _ = critic_loss(d, net.to_net(real), fake, float(cfg.gp_lambda), float(cfg.gp_k))
        opt_c.zero_grad()
        loss.backward()
        opt_c.step()

    def generator_step() -> None:
        d.requires_grad_(False)
        loss = generator_loss(d, g(g.sample_latent(n)))
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        d.requires_grad_(True)

    def gan_iteration() -> None:
        for _ in range(int(cfg.n_critic)):
            critic_step()
        generator_step()

    net.train()
    critic_s = timed(critic_step, device, args.warmup, args.repeat)
    generator_s = timed(generator_step, device, args.warmup, args.repeat)
    gan_s = timed(gan_iteration, device, 1, max(1, args.repeat // 2))

    g.requires_grad_(False).eval()
    d.requires_grad_(False).eval()

    def encoder_step() -> None:
        x_hat = net.reconstruct(real)
        with torch.no_grad():
            feat_x = net.features(real)
        loss = loss_e(real, x_hat, feat_x, net.features(x_hat))
        opt_e.zero_grad()
        loss.backward()
        opt_e.step()

    encoder_s = timed(encoder_step, device, args.warmup, args.repeat)
    net.eval()

    def score() -> None:
        with torch.no_grad():
            net(real)

    score_s = timed(score, device, args.warmup, args.repeat)
    params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in (("G", g), ("D", d), ("E", e))}
    return {
        "size": f"{size}×{size}",
        "params M (G/D/E)": "/".join(f"{v:.2f}" for v in params.values()),
        f"critic+generator step s (n_critic={cfg.n_critic})": f"{gan_s:.3f}",
        "critic step s": f"{critic_s:.3f}",
        "generator step s": f"{generator_s:.3f}",
        "encoder step s": f"{encoder_s:.3f}",
        "scoring img/s": f"{n / score_s:.1f}",
    }


def main(argv: list[str] | None = None) -> None:
    cfg = OmegaConf.load(CONFIG)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=int(cfg.channels or 1))
    parser.add_argument("--latent-dim", type=int, default=int(cfg.latent_dim))
    parser.add_argument("--base-channels", type=int, default=int(cfg.base_channels))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the printed table to this Markdown file")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [bench_size(args, cfg, size, device) for size in args.sizes]
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    text = "\n".join(
        [
            f"command: `{' '.join([Path(sys.executable).name, 'experiments/bench_ganae.py', *sys.argv[1:]])}`",
            "",
            f"date: {dt.date.today()}; machine: {machine}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, load average {load:.1f} at the start; batch {args.batch_size}, "
            f"{args.channels} channel(s), latent {args.latent_dim}, base channels {args.base_channels}; "
            f"median of {args.repeat}",
            "",
            tabulate(rows, headers="keys", tablefmt="github"),
        ]
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# GAN-AE step times (`make bench`)\n\n{text}\n")


if __name__ == "__main__":
    main()
