"""GPU readiness: model training throughput vs the data pipeline's rate, through cxrlab's own Trainer.

1. Training throughput (images/s) of DenseNet-121 and ResNet-50 at 224 px, bf16 autocast,
   ``train.channels_last=true``, with and without ``train.compile``: ``Trainer.train_epoch`` over
   batches already on the device (weak augmentation off), so the figure is the model's ceiling.
2. The data pipeline's rate at the same batch size: a 224 px uint8 cache (synthetic, written straight
   into the memmap) → ``ImageSet`` + ``make_loader`` (``--workers`` processes) → device → float →
   weak augmentation on the device (``BatchAugment``), no model: what the trainer can be fed.
3. Their ratio: pipeline / model ≥ 1 means the GPU never waits for data.

``--cpu-smoke`` runs every section on the CPU at toy sizes (32 px, batch 2, the ``eager`` compile
backend so graph capture is exercised without code generation) in seconds: it checks the script, not
the speed. The LCL/MPC step-time ratios come from bench_heads.py / bench_regimes.py (gpu_check.sh).

    python benchmarks/gpu_check.py [--batch 64] [--steps 20] [--workers 8] [--cpu-smoke]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LABELS = tuple(f"label_{i}" for i in range(14))


def recipe_for(backbone: str, size: int, batch: int, compile_value, amp: str, device: str):
    from cxrlab.config import from_dict

    return from_dict({"model": {"backbone": backbone, "head": "linear"}, "loss": {"bce": 1.0},
                      "data": {"image_size": size},
                      "train": {"epochs": 1, "batch_size": batch, "amp": amp, "channels_last": True,
                                "compile": compile_value, "device": device}})


def model_rate(backbone: str, size: int, batch: int, steps: int, warmup: int, compile_value, amp: str,
               device: torch.device, out: Path) -> tuple[float, float]:
    """(images/s over ``steps`` timed steps, seconds of the warm-up steps, compilation included)."""
    from cxrlab.engine.trainer import Trainer, seed_everything
    from cxrlab.losses.base import LossContext, Objective
    from cxrlab.models import build_model
    from cxrlab.regimes.base import Supervised

    recipe = recipe_for(backbone, size, batch, compile_value, amp, device.type)
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(batch, len(LABELS), generator=g) < 0.2).float()
    batches = [{"image": torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=g).to(device),
                "target": target.to(device), "mask": torch.ones_like(target).to(device)} for _ in range(4)]
    model = build_model(backbone, "linear", len(LABELS))
    objective = Objective(recipe.loss, LossContext.from_targets(LABELS, target.numpy(), np.ones_like(target.numpy())))
    identity = lambda x: x  # noqa: E731 - model throughput only; the pipeline section times augmentation
    trainer = Trainer(recipe, model, objective, Supervised(identity, identity), out, LABELS, device=device)
    trainer.prepare(warmup + steps)
    start = time.perf_counter()
    trainer.train_epoch([batches[i % 4] for i in range(warmup)])
    warm_s = time.perf_counter() - start
    result = trainer.train_epoch([batches[i % 4] for i in range(steps)])  # synchronises CUDA before timing ends
    return result["train_img_s"], warm_s


def synthetic_cache(folder: Path, n: int, size: int) -> Path:
    """A finished cxrlab cache of n random-texture images, written straight into images.u8."""
    import json

    import pandas as pd

    from cxrlab.data.cache import FORMAT, CacheInfo
    from cxrlab.labels import NIH14

    folder.mkdir(parents=True)
    images = np.memmap(folder / "images.u8", np.uint8, "w+", shape=(n, size, size))
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (64, size, size), dtype=np.uint8)
    for i in range(0, n, 64):
        images[i:i + 64] = block[: min(64, n - i)]
    images.flush()
    del images
    ids = [str(i) for i in range(n)]
    index = pd.DataFrame({"path": ids, "patient_id": ids, "study_id": ids, "view": "PA"})
    for name in NIH14.names:
        index[name] = (rng.random(n) < 0.1).astype(np.float32)
    index.to_csv(folder / "index.csv", index=False)
    info = CacheInfo(folder, size, "pad", n, n, 0, NIH14, "synthetic", "bench")
    (folder / "cache.json").write_text(json.dumps({**info.to_json(), "format": FORMAT}))
    return folder


def pipeline_rate(cache: Path, batch: int, steps: int, workers: int, device: torch.device) -> float:
    from cxrlab.data.cache import open_cache
    from cxrlab.data.dataset import ImageSet
    from cxrlab.data.transforms import build_augment
    from cxrlab.engine.trainer import make_loader

    images, index, labels, _ = open_cache(cache)
    target = index[list(labels.names)].to_numpy(np.float32)
    loader = make_loader(ImageSet(images, target, np.ones_like(target)), batch, shuffle=True, seed=0,
                         num_workers=workers, distributed=False)
    augment = build_augment("weak")
    seen, start, it = 0, None, iter(loader)
    for k in range(steps + 2):
        b = next(it)
        x = augment(b["image"].to(device, non_blocking=True).float().div_(255.0))
        if k == 1:  # the first batches include the workers' start-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        elif k > 1:
            seen += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--backbones", default="densenet121,resnet50")
    parser.add_argument("--cpu-smoke", action="store_true", help="every section on the CPU at toy sizes, in seconds")
    args = parser.parse_args()
    if args.cpu_smoke:
        device, size, compile_on, amp = torch.device("cpu"), 32, "eager", "bf16"
        args.batch, args.steps, args.warmup, args.workers = 2, 1, 1, 1
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --cpu-smoke to check the script on the CPU)")
        device, size, compile_on, amp = torch.device("cuda"), 224, True, "bf16"
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="cxrlab-gpu-check-"))
    print(f"\n## training throughput, {size} px, batch {args.batch}, bf16 autocast, channels-last "
          f"({args.steps} timed steps after {args.warmup} warm-up)")
    best = 0.0
    for backbone in args.backbones.split(","):
        rates = {}
        for label, value in (("eager", False), ("compile", compile_on)):
            rate, warm = model_rate(backbone, size, args.batch, args.steps, args.warmup, value, amp, device,
                                    work / f"{backbone}-{label}")
            rates[label] = rate
            print(f"{backbone:12s} {label:8s} {rate:9.1f} img/s   (warm-up {warm:5.1f} s)")
            torch._dynamo.reset()
        print(f"{backbone:12s} compile / eager = {rates['compile'] / rates['eager']:.2f}×")
        best = max(best, *rates.values())
    n = 512 if args.cpu_smoke else 20000
    cache = synthetic_cache(work / "cache", n, size)
    pipe = pipeline_rate(cache, args.batch, max(args.steps, 3) if args.cpu_smoke else 100, args.workers, device)
    print(f"\n## data pipeline: cache → ImageSet → make_loader ({args.workers} workers) → {device.type} → weak augment")
    print(f"pipeline {pipe:9.1f} img/s at batch {args.batch}")
    print(f"pipeline / model (fastest model above) = {pipe / best:.2f}×"
          f"{'  (the GPU waits for data)' if pipe < best else '  (no stall)'}")


if __name__ == "__main__":
    main()
