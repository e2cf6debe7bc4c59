"""Training-step throughput of timm backbones under the linear head: which backbone the demo can afford.

One training step = forward, weighted BCE (the demo's loss), backward, AdamW step, 14 labels, random init.
Every model is built with ``cxrlab.models.build_model`` (timm backbone with cxrlab's 1-channel stem, linear
head), so the input is what cxrlab trains on: B×1×H×W grey images in [0, 1]. Defaults match the demo
recipe (64 px, batch 64).

All backbones are timed in one run with interleaved repeats (order rotated each repeat) so drift in
machine load hits all alike; the table gives parameters, median ms/step, images/s and the speed ratio
to ``resnet18`` (ms/step of resnet18 over ms/step of the backbone: 2.0 = twice as fast). resnet18 is
always measured, as the reference, even if ``--backbones`` leaves it out.

    python benchmarks/bench_backbones.py [--steps 5] [--repeats 5] [--threads 1] [--device cpu]
                                         [--backbones resnet18,resnet10t,...] [--size 64] [--batch 64]
"""
from __future__ import annotations

import argparse
import statistics

import torch
from bench_heads import NUM_LABELS, Step  # one training step: model, objective, AdamW
from timing import add_timing_args, interleaved_ms_per_step

REFERENCE = "resnet18"
DEFAULT_BACKBONES = ("resnet18,resnet10t,resnet14t,mobilenetv3_small_100,mobilenetv3_large_100,"
                     "efficientnet_b0,regnetx_002")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(parser)
    parser.add_argument("--backbones", default=DEFAULT_BACKBONES, help="comma-separated timm names")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n.strip() for n in args.backbones.split(",") if n.strip()]
    names = [REFERENCE] + [n for n in names if n != REFERENCE]
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.rand(args.batch, 1, args.size, args.size, generator=g).to(device),
                "target": (torch.rand(args.batch, NUM_LABELS, generator=g) < 0.2).float().to(device),
                "mask": torch.ones(args.batch, NUM_LABELS, device=device)} for _ in range(4)]
    runs = {name: Step(name, "linear", {"weighted_bce": 1.0}, device, batches) for name in names}
    times = interleaved_ms_per_step(runs, args.steps, args.repeats)
    base = statistics.median(times[REFERENCE])
    print(f"\nlinear head + weighted BCE + AdamW, {args.size} px, batch {args.batch}, {NUM_LABELS} labels, "
          f"{device}, {args.threads} thread(s), {args.steps} steps x {args.repeats} interleaved repeats "
          f"(median ms/step)")
    print(f"  {'backbone':<24}{'params':>9}{'ms/step':>10}{'min-max':>15}{'img/s':>9}{'vs ' + REFERENCE:>13}")
    for name in names:
        ms = statistics.median(times[name])
        n_params = sum(p.numel() for p in runs[name].model.parameters())
        spread = f"{min(times[name]):.0f}-{max(times[name]):.0f}"  # wide: the load moved during the run
        print(f"  {name:<24}{n_params / 1e6:>8.2f}M{ms:>10.1f}{spread:>15}{args.batch / ms * 1000:>9.1f}"
              f"{base / ms:>12.2f}x")


if __name__ == "__main__":
    main()
