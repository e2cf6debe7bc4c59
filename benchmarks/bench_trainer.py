"""Training throughput of cxrlab's Trainer relative to a bare PyTorch loop (target ≥ 0.97).

Both train a timm resnet18 (1 input channel, 14 labels) with AdamW on the same in-memory uint8
batches (32 × 64 px) for the same number of steps; repeats are interleaved (alternating which goes
first) so drift in machine load hits both alike, and the median per-repeat ratio is reported.

    python benchmarks/bench_trainer.py [--steps 15] [--repeats 7] [--threads 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

LABELS = tuple(f"label_{i}" for i in range(14))


def make_batches(n: int, batch: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=g),
             "target": (torch.rand(batch, len(LABELS), generator=g) < 0.2).float(),
             "mask": torch.ones(batch, len(LABELS)),
             "index": torch.arange(i * batch, (i + 1) * batch)} for i in range(n)]


class BareLoop:
    """The loop anyone would write: model, BCE, AdamW, nothing else."""

    def __init__(self, device: torch.device, lr: float, weight_decay: float):
        import timm

        self.device = device
        self.model = timm.create_model("resnet18", num_classes=len(LABELS), in_chans=1).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay,
                                     fused=True if device.type == "cuda" else None)

    def run(self, batches: list[dict]) -> None:
        for b in batches:
            x = b["image"].to(self.device, non_blocking=True).float().div_(255.0)
            y = b["target"].to(self.device, non_blocking=True)
            loss = F.binary_cross_entropy_with_logits(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss.item()  # the trainer logs the loss every step; so would any loop that prints it


def make_trainer(device: torch.device, out_dir: str, steps: int):
    from cxrlab.config import from_dict
    from cxrlab.engine.trainer import Trainer, seed_everything
    from cxrlab.losses.base import LossContext, Objective
    from cxrlab.models import build_model
    from cxrlab.regimes.base import Supervised

    recipe = from_dict({"model": {"backbone": "resnet18", "head": "linear"}, "loss": {"bce": 1.0},
                        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4},
                        "schedule": {"name": "cosine", "warmup_epochs": 0.0},
                        "train": {"epochs": 1000, "batch_size": 32, "amp": "off"}})
    seed_everything(0)
    model = build_model("resnet18", "linear", len(LABELS))
    ctx = LossContext.from_targets(LABELS, torch.zeros(2, len(LABELS)).numpy(), torch.ones(2, len(LABELS)).numpy())
    trainer = Trainer(recipe, model, Objective(recipe.loss, ctx), Supervised(lambda x: x, lambda x: x), out_dir,
                      LABELS, device=device)
    trainer.prepare(steps)
    return trainer


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = make_batches(args.steps, args.batch, args.size)
    warm = batches[:3]

    bare = BareLoop(device, 1e-3, 1e-4)
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(device, out, args.steps)
        bare.run(warm)
        trainer.train_epoch(warm)
        images = args.steps * args.batch
        bare_ips, trainer_ips, ratios = [], [], []
        for r in range(args.repeats):
            runs = [("bare", lambda: bare.run(batches)), ("trainer", lambda: trainer.train_epoch(batches, r))]
            times = dict((name, timed(fn, device)) for name, fn in (runs if r % 2 == 0 else runs[::-1]))
            bare_ips.append(images / times["bare"])
            trainer_ips.append(images / times["trainer"])
            ratios.append(trainer_ips[-1] / bare_ips[-1])
            print(f"repeat {r + 1}: bare {bare_ips[-1]:7.1f} img/s  trainer {trainer_ips[-1]:7.1f} img/s  "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"device {device}, threads {args.threads}, resnet18 {args.size} px, batch {args.batch}, "
          f"{args.steps} steps x {args.repeats} repeats")
    print(f"median: bare {statistics.median(bare_ips):.1f} img/s, trainer {statistics.median(trainer_ips):.1f} img/s, "
          f"trainer/bare ratio {statistics.median(ratios):.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
