"""Cost per training step of the two-view ``mpc`` regime (with and without FPC / BTC) against the plain
``supervised`` regime, same model.

One training step = the regime's forward(s), the objective, backward, AdamW step. Model:
``cxrlab.models.build_model(backbone, "linear", 14)`` (default resnet18 at 64 px, batch 32). Variants:

  supervised        Supervised regime, loss {an}                                  (1 forward)
  mpc (ipc)         MPC fpc=False btc=False, loss {spml_observed, mpc_ipc}         (weak + strong, both with gradient)
  mpc +fpc          MPC fpc=True  btc=False, + mpc_fpc        (+ the head on the channel-dropped weak map)
  mpc +btc          MPC fpc=False btc=True,  + mpc_btc        (+ 1-layer Transformer over the batch + head)
  mpc +fpc +btc     the full MPC

Both augmentations are the same cheap tensor ops for every variant (weak: identity; strong: noise and
a flip), so the figures isolate the regimes' model compute, not augmentation cost (RED etc. run on
the batch and add the same cost to any two-view method).

Repeats are interleaved (variant order rotated each repeat) so drift in machine load hits all alike;
the median ms/step over repeats is reported with the ratio to ``supervised``.

    python benchmarks/bench_regimes.py [--steps 5] [--repeats 5] [--threads 1] [--device cpu]
                                       [--backbone resnet18] [--size 64] [--batch 32] [--amp]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import numpy as np
import torch
from timing import add_timing_args, interleaved_ms_per_step

NUM_LABELS = 14
OBS = {"spml_observed": {"neg_weight": 1.0}}


def variants() -> list[tuple[str, str, dict, dict]]:
    ipc = {**OBS, "mpc_ipc": 1.0}
    return [("supervised", "supervised", {}, {"an": 1.0}),
            ("mpc (ipc)", "mpc", {"fpc": False, "btc": False}, ipc),
            ("mpc +fpc", "mpc", {"fpc": True, "btc": False}, {**ipc, "mpc_fpc": 1.0}),
            ("mpc +btc", "mpc", {"fpc": False, "btc": True}, {**ipc, "mpc_btc": 1.0}),
            ("mpc +fpc +btc", "mpc", {"fpc": True, "btc": True}, {**ipc, "mpc_fpc": 1.0, "mpc_btc": 1.0})]


def weak(x: torch.Tensor) -> torch.Tensor:
    return x


def strong(x: torch.Tensor) -> torch.Tensor:
    return (x.flip(-1) + 0.05 * torch.randn_like(x)).clamp(0, 1)


class Step:
    def __init__(self, backbone: str, regime: str, regime_args: dict, loss: dict, device: torch.device,
                 batches: list[dict], amp: bool):
        from cxrlab.losses.base import LossContext, Objective
        from cxrlab.models import build_model
        from cxrlab.registry import REGIMES

        torch.manual_seed(0)
        labels = tuple(f"label_{i}" for i in range(NUM_LABELS))
        target = torch.cat([b["target"] for b in batches]).cpu().numpy()
        ctx = LossContext.from_targets(labels, target, target)
        self.model = build_model(backbone, "linear", NUM_LABELS).to(device).train()
        args = dict(regime_args)
        if regime == "mpc":
            args["feature_dim"] = self.model.backbone.num_features
        self.regime = REGIMES.get(regime)(weak, strong, **args)
        self.regime.modules.to(device).train()
        self.objective = Objective(loss, ctx).to(device)
        params = [p for m in (self.model, self.regime.modules, self.objective) for p in m.parameters()]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5, fused=True if device.type == "cuda" else None)
        self.batches = batches
        self.device = device
        self.amp = amp

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def run(self, steps: int) -> None:
        for k in range(steps):
            b = self.batches[k % len(self.batches)]
            with self.autocast():
                loss, _ = self.objective(self.regime.step(self.model, b), b)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if hasattr(self.regime, "epoch_stats"):
            self.regime.epoch_stats()


def make_batches(size: int, batch: int, device: torch.device, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        full = (torch.rand(batch, NUM_LABELS, generator=g) < 0.2).float()
        full[torch.arange(batch), torch.randint(NUM_LABELS, (batch,), generator=g)] = 1.0
        observed = torch.zeros_like(full)  # one observed positive per image (SPML)
        for i in range(batch):
            pos = full[i].nonzero().flatten()
            observed[i, pos[torch.randint(len(pos), (1,), generator=g)]] = 1.0
        out.append({"image": torch.rand(batch, 1, size, size, generator=g).to(device),
                    "target": observed.to(device), "mask": observed.clone().to(device), "full_target": full.to(device),
                    "index": torch.arange(k * batch, (k + 1) * batch, device=device)})
    return out


def bench(args, device: torch.device) -> None:
    batches = make_batches(args.size, args.batch, device)
    runs = {name: Step(args.backbone, regime, rargs, loss, device, batches, args.amp)
            for name, regime, rargs, loss in variants()}
    times = interleaved_ms_per_step(runs, args.steps, args.repeats)
    names = list(runs)
    base = statistics.median(times["supervised"])
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    print(f"\n{args.backbone} + linear @ {args.size}px, batch {args.batch}, {NUM_LABELS} labels, {device}{threads}"
          f"{', amp' if args.amp else ''}; {args.steps} steps x {args.repeats} repeats (median ms/step, "
          f"[min-max over repeats])")
    print(f"  {'variant':<16}{'ms/step':>10}{'ratio':>8}{'range':>18}{'regime params':>15}")
    for name in names:
        ms = statistics.median(times[name])
        n_params = sum(p.numel() for p in runs[name].regime.modules.parameters())
        spread = f"[{min(times[name]):.1f}-{max(times[name]):.1f}]"
        print(f"  {name:<16}{ms:>10.1f}{ms / base:>8.2f}{spread:>18}{n_params / 1e6:>14.2f}M")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(parser)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, bf16/fp16 on CUDA)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    bench(args, torch.device(args.device))


if __name__ == "__main__":
    main()
