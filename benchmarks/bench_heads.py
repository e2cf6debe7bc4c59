"""Extra cost per training step of the label-level heads over the linear head, same backbone.

One training step = forward, objective, backward, AdamW step. Variants (all built with
``cxrlab.models.build_model``, 14 labels):

  linear          linear head, loss {bce}
  lcl             lcl head, loss {bce, lcl_consistency 0.1, lcl_supcon 0.1}   (the LCL recipe's objective)
  label_query     label_query head, same objective as lcl
  lcl (bce only)  / label_query (bce only): the heads alone, to split head cost from loss cost
  bilinear        bilinear head (1x1 reduction to 256, full 65,536-d pooling), loss {bce}
  bilinear compact  bilinear head with tensor-sketch compact pooling (8192-d), loss {bce}
  with --can, two copies of the backbone (model.backbones):
  concat x2       both maps pooled and concatenated, linear layer, loss {bce}   (CAN's capacity control)
  CAN x2          cross_attention head (dim 512), loss {ml_balance, can_attention} (the CAN recipe's objective)

Besides ms/step, each variant's memory of one training step: on CUDA the peak allocated during the
step above what was allocated before it; on CPU the bytes of the tensors autograd saves for backward
(the activation memory, what grows with the head; counted per save, weights included). A config
``backbone:size:batch:stride`` sets timm's output stride (e.g. resnet18:64:32:8: an 8x8 map, not 2x2).

Repeats are interleaved (variant order rotated each repeat) so drift in machine load hits all alike; the
median ms/step over repeats is reported with the ratio to ``linear``.

    python benchmarks/bench_heads.py [--steps 5] [--repeats 5] [--threads 1] [--device cpu]
                                     [--configs resnet18:64:32:8,resnet50:224:8] [--no-split]
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from timing import add_timing_args, interleaved_ms_per_step

NUM_LABELS = 14
LCL_LOSS = {"bce": 1.0, "lcl_consistency": 0.1, "lcl_supcon": {"weight": 0.1, "in_dim": 512}}
CAN_LOSS = {"ml_balance": 1.0, "can_attention": 1.0}
TWO_BACKBONE_VARIANTS = [("concat x2", "concat", {"bce": 1.0}, {}),
                         ("CAN x2", "cross_attention", CAN_LOSS, {"dim": 512})]


def variants(split: bool) -> list[tuple[str, str, dict, dict]]:
    out = [("linear", "linear", {"bce": 1.0}, {}), ("lcl", "lcl", LCL_LOSS, {}),
           ("label_query", "label_query", LCL_LOSS, {}),
           ("bilinear", "bilinear", {"bce": 1.0}, {}), ("bilinear compact", "bilinear", {"bce": 1.0}, {"compact": True})]
    if split:
        out += [("lcl (bce only)", "lcl", {"bce": 1.0}, {}), ("label_query (bce only)", "label_query", {"bce": 1.0}, {})]
    return out


class Step:
    def __init__(self, backbone: str, head: str, loss: dict, device: torch.device, batches: list[dict],
                 head_args: dict | None = None, output_stride: int | None = None):
        from cxrlab.losses.base import LossContext, Objective
        from cxrlab.models import build_model

        torch.manual_seed(0)
        labels = tuple(f"label_{i}" for i in range(NUM_LABELS))
        target = torch.cat([b["target"] for b in batches]).cpu().numpy()
        ctx = LossContext.from_targets(labels, target, np.ones_like(target))
        self.model = build_model(backbone, head, NUM_LABELS, head_args=head_args,
                                 output_stride=output_stride).to(device).train()
        self.objective = Objective(loss, ctx).to(device)
        params = list(self.model.parameters()) + list(self.objective.parameters())
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5, fused=True if device.type == "cuda" else None)
        self.batches = batches
        self.device = device

    def run(self, steps: int) -> None:
        for k in range(steps):
            b = self.batches[k % len(self.batches)]
            loss, _ = self.objective(self.model(b["image"]), b)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def memory_mib(self) -> float:
        """Memory of one training step (see the module docstring)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.run(1)
            return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.run(1)
        return saved[0] / 2 ** 20


def bench(backbone: str, size: int, batch: int, args, device: torch.device, output_stride: int | None = None) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.rand(batch, 1, size, size, generator=g).to(device),
                "target": (torch.rand(batch, NUM_LABELS, generator=g) < 0.2).float().to(device),
                "mask": torch.ones(batch, NUM_LABELS, device=device)} for _ in range(4)]
    runs = {name: Step(backbone, head, loss, device, batches, head_args, output_stride)
            for name, head, loss, head_args in variants(not args.no_split)}
    if args.can:
        runs.update({name: Step([backbone, backbone], head, loss, device, batches, head_args, output_stride)
                     for name, head, loss, head_args in TWO_BACKBONE_VARIANTS})
    times = interleaved_ms_per_step(runs, args.steps, args.repeats)
    memory = {name: step.memory_mib() for name, step in runs.items()}
    names = list(runs)
    base = statistics.median(times["linear"])
    fmap = runs["linear"].model.features(batches[0]["image"][:1]).shape[-2:]
    print(f"\n{backbone} @ {size}px (feature map {fmap[0]}x{fmap[1]}), batch {batch}, {NUM_LABELS} labels, "
          f"{device}, {args.steps} steps x {args.repeats} repeats (median ms/step)")
    kind = "peak MiB" if device.type == "cuda" else "saved MiB"
    print(f"  {'variant':<24}{'ms/step':>10}{'ratio':>8}{'extra ms':>10}{'head params':>13}{kind:>11}{'ratio':>8}")
    for name in names:
        ms = statistics.median(times[name])
        n_params = sum(p.numel() for p in runs[name].model.head.parameters()) \
            + sum(p.numel() for p in runs[name].objective.parameters())
        print(f"  {name:<24}{ms:>10.1f}{ms / base:>8.3f}{ms - base:>10.1f}{n_params / 1e6:>12.2f}M"
              f"{memory[name]:>11.1f}{memory[name] / memory['linear']:>8.3f}")
    if args.can:
        can = statistics.median(times["CAN x2"])
        print(f"  CAN (two {backbone}) over one {backbone} + linear: {can / base:.2f}x step time "
              f"(goal <= 2.1x), {memory['CAN x2'] / memory['linear']:.2f}x memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(parser)
    parser.add_argument("--configs", default="resnet18:64:32:8,resnet50:224:8",
                        help="comma-separated backbone:size:batch[:output_stride]")
    parser.add_argument("--no-split", action="store_true", help="skip the bce-only variants")
    parser.add_argument("--can", action="store_true", help="add the two-backbone variants (concat, CAN)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for config in args.configs.split(","):
        backbone, size, batch, *stride = config.split(":")
        bench(backbone, int(size), int(batch), args, device, int(stride[0]) if stride else None)


if __name__ == "__main__":
    main()
