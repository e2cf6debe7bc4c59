"""Memory of training from the prepared cache: flat in the number of cached images, not copied per worker.

Synthetic 224 px caches of 10k and 100k images (the uint8 memmap written directly, 0.5 and 5 GB; the
content does not matter for memory) are opened in a fresh process each, which then

1. trains: ``Trainer.train_epoch`` for ``--steps`` steps (timm ``test_resnet``, batch 64, weak
   augmentation) on batches from ``ImageSet`` + ``make_loader``, then reads one full shuffled epoch
   through the loader (every page of the cache file passes through) — and reports its peak resident
   memory (VmHWM) and how much of the final RSS is file-backed (mapped cache pages) or anonymous;
2. iterates a ``make_loader`` with 2 worker processes over the whole cache and, at 3/4 of the epoch,
   reads each worker's ``/proc/<pid>/smaps_rollup``: RSS, PSS and USS (private pages: what the worker
   alone costs). For comparison the same with a plain Dataset that indexes the memmap (what a
   hand-written loader does), whose workers map the file pages they touch.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--sizes 10000 100000] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SIZE = 224


def write_cache(folder: Path, n: int) -> Path:
    """A finished cache of n images (random texture blocks, tiled), written straight into images.u8."""
    import pandas as pd

    from cxrlab.data.cache import FORMAT, CacheInfo
    from cxrlab.labels import NIH14

    folder.mkdir(parents=True)
    images = np.memmap(folder / "images.u8", np.uint8, "w+", shape=(n, SIZE, SIZE))
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (500, SIZE, SIZE), dtype=np.uint8)
    for i in range(0, n, len(block)):
        images[i:i + len(block)] = block[: n - i]
    images.flush()
    del images
    ids = [f"{i:08d}" for i in range(n)]
    index = pd.DataFrame({"path": [f"/data/images/{i}.png" for i in ids], "patient_id": ids, "study_id": ids,
                          "view": "PA"})
    for name in NIH14.names:
        index[name] = (rng.random(n) < 0.1).astype(np.float32)
    index.to_csv(folder / "index.csv", index=False)
    info = CacheInfo(folder, SIZE, "pad", n, n, 0, NIH14, "synthetic", f"memory-bench-{n}")
    (folder / "cache.json").write_text(json.dumps({**info.to_json(), "format": FORMAT}))
    return folder


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def _rollup(pid: int) -> dict:
    """RSS, PSS and USS (private clean + dirty) of a process, MiB, from /proc/<pid>/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


class MemmapIndexing:
    """The hand-written alternative: ``images[i]`` of the memmap in ``__getitem__``."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        import torch

        return {"image": torch.from_numpy(np.array(self.images[i]))[None]}


class Steps:
    """The first ``n`` batches of a loader, as a loader of n batches."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __len__(self):
        return self.n

    def __iter__(self):
        for k, batch in enumerate(self.loader):
            if k == self.n:
                return
            yield batch


def train_child(cache: str, steps: int) -> dict:
    import torch

    from cxrlab.config import from_dict
    from cxrlab.data.cache import open_cache
    from cxrlab.data.dataset import ImageSet
    from cxrlab.data.transforms import build_augment
    from cxrlab.engine.trainer import Trainer, make_loader, seed_everything
    from cxrlab.losses.base import LossContext, Objective
    from cxrlab.models import build_model
    from cxrlab.regimes.base import Supervised

    torch.set_num_threads(1)
    images, index, labels, _ = open_cache(cache)
    target = index[list(labels.names)].to_numpy(np.float32)
    mask = np.ones_like(target)
    opened = _status()
    recipe = from_dict({"model": {"backbone": "test_resnet", "head": "linear"}, "loss": {"bce": 1.0},
                        "train": {"epochs": 1, "batch_size": 64, "amp": "off", "device": "cpu"}})
    seed_everything(0)
    model = build_model("test_resnet", "linear", len(labels))
    objective = Objective(recipe.loss, LossContext.from_targets(labels.names, target, mask))
    weak = build_augment("weak")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(recipe, model, objective, Supervised(weak, weak), Path(out), labels.names)
        loader = make_loader(ImageSet(images, target, mask), 64, shuffle=True, seed=0)
        trainer.train_epoch(Steps(loader, steps))
    trained = _status()
    seen = sum(int(b["image"].shape[0]) for b in loader)  # every page of the file passes through once
    return {"opened": opened, "trained": trained, "epoch": _status(), "seen": seen}


def workers_child(cache: str, how: str) -> dict:
    from cxrlab.data.cache import open_cache
    from cxrlab.data.dataset import ImageSet
    from cxrlab.engine.trainer import make_loader

    images, index, labels, _ = open_cache(cache)
    target = index[list(labels.names)].to_numpy(np.float32)
    data = ImageSet(images, target, np.ones_like(target)) if how == "imageset" else MemmapIndexing(images)
    loader = make_loader(data, 64, shuffle=True, seed=0, num_workers=2, distributed=False)
    it = iter(loader)
    at = int(len(loader) * 0.75)
    workers = {}
    for k, _ in enumerate(it):
        if k == at:
            workers = {str(w.pid): _rollup(w.pid) for w in it._workers}
    return {"main": _rollup(int(Path("/proc/self/stat").read_text().split()[0])), "workers": workers}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--steps", type=int, default=20, help="training steps before the full epoch")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, cache, extra = args.child
        print(json.dumps(train_child(cache, int(extra)) if kind == "train" else workers_child(cache, extra)))
        return
    work = Path(tempfile.mkdtemp(prefix="cxrlab-memory-"))
    try:
        rows = []
        for n in args.sizes:
            cache = write_cache(work / f"c{n}", n)
            gib = (cache / "images.u8").stat().st_size / 2**30
            t = run_child("train", str(cache), str(args.steps))
            w = {how: run_child("workers", str(cache), how) for how in ("imageset", "memmap-index")}
            rows.append((n, gib, t, w))
            shutil.rmtree(cache)
        print(f"## training from a {SIZE} px cache ({args.steps} Trainer steps, then one full epoch through "
              "the loader), fresh process per size")
        print(f"{'images':>8s} {'file GiB':>8s} {'RSS opened':>10s} {'after train':>11s} {'after epoch':>11s} "
              f"{'peak (HWM)':>10s} {'file-mapped':>11s}   MiB")
        for n, gib, t, _ in rows:
            print(f"{n:8d} {gib:8.2f} {t['opened']['VmRSS']:10.0f} {t['trained']['VmRSS']:11.0f} "
                  f"{t['epoch']['VmRSS']:11.0f} {t['epoch']['VmHWM']:10.0f} {t['epoch']['RssFile']:11.0f}")
        if len(rows) > 1:
            (n0, _, a, _), (n1, _, b, _) = rows[0], rows[-1]
            print(f"  peak {n1 // 1000}k / {n0 // 1000}k = {b['epoch']['VmHWM'] / a['epoch']['VmHWM']:.3f}× "
                  f"(+{b['epoch']['VmHWM'] - a['epoch']['VmHWM']:.0f} MiB for {n1 / n0:.0f}× the images)")
        print("\n## DataLoader with 2 workers, at 3/4 of an epoch: per worker RSS / PSS / USS (MiB)")
        for n, _, _, w in rows:
            for how, r in w.items():
                per = "; ".join(f"{v['rss']:.0f} / {v['pss']:.0f} / {v['uss']:.0f}" for v in r["workers"].values())
                print(f"{n:8d} {how:13s} workers {per}   (main process {r['main']['rss']:.0f} / "
                      f"{r['main']['pss']:.0f} / {r['main']['uss']:.0f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
