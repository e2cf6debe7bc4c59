"""The training data path against torchxrayvision's, side by side in one interleaved run.

Same files, same labels, same output (224 px, batches of 32) and comparable augmentation (random
affine: ±7°, ±5 % shift, 0.9-1.1 scale, plus a horizontal flip with p = 0.5):

- torchxrayvision: ``xrv.datasets.NIH_Dataset`` over the folder with its ``XRayCenterCrop`` +
  ``XRayResizer(224)`` transform and the augmentation of its training script (``ToPILImage``,
  ``RandomAffine``, ``RandomHorizontalFlip``, ``ToTensor``), in a ``DataLoader``; every epoch decodes
  and resizes every file again.
- cxrlab: ``nih:`` source over the same folder and label file → ``prepare`` (once; counted in the
  first epoch) → ``ImageSet`` + ``make_loader`` → the batch as the trainer sees it (uint8 → float
  [0, 1]) → ``BatchAugment`` weak with ``hflip=0.5``, i.e. what a training step gets.

The image set: N files (half 1024² 8-bit PNG as NIH ships them, half 1024² JPEG) made from the real
fixtures in ../shared/data (resized up, each with its own small shift and contrast so no two files are
equal), written to a temp dir and deleted afterwards. Per core = ``num_workers=0`` (and ``prepare``
with one worker), one torch thread; "2 workers" = ``num_workers=2`` (and ``prepare`` with 2). Epochs
of the two tools alternate so drift in machine load hits both alike; steady state is the median of
the later epochs.

    pip install -e '.[bench]'
    OMP_NUM_THREADS=1 python benchmarks/bench_vs_txv.py [--n 300] [--epochs 3]
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE, BATCH = 224, 32
AFFINE = {"degrees": 7.0, "translate": 0.05, "scale": (0.9, 1.1)}


def make_images(folder: Path, n: int, side: int = 1024) -> None:
    """n files (even rows PNG, odd rows JPEG) + a Data_Entry CSV of the real NIH label rows."""
    from PIL import Image

    from cxrlab.data.images import read_image

    bases = [read_image(SHARED / "nih" / "00000001_000.png"), read_image(SHARED / "nih" / "00027426_000.png"),
             read_image(SHARED / "covid" / "16747_3_1.jpg"),
             read_image(SHARED / "dicom" / "siim_pneumothorax_example.dcm")]
    bases = [np.asarray(Image.fromarray(np.round(b * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC),
                        dtype=np.float32) for b in bases]
    rng = np.random.default_rng(0)
    with gzip.open(SHARED / "nih" / "Data_Entry_2017_v2020.csv.gz", "rt") as f:
        table = pd.read_csv(f, nrows=n)
    names = []
    for i in range(n):
        image = np.roll(bases[i % len(bases)], tuple(rng.integers(-20, 21, 2)), axis=(0, 1))
        image = np.clip(image * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10), 0, 255).astype(np.uint8)
        name = f"{i:08d}_000.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(image).save(folder / name, **({} if name.endswith("png") else {"quality": 92}))
        names.append(name)
    table["Image Index"] = names
    table["View Position"] = "PA"
    table.to_csv(folder / "Data_Entry_2017_v2020.csv", index=False)


# ------------------------------------------------------------------------------------ torchxrayvision

class TxvPath:
    def __init__(self, folder: Path, workers: int):
        import torchvision.transforms as T
        import torchxrayvision as xrv

        transform = T.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(SIZE)])
        augment = T.Compose([xrv.datasets.ToPILImage(),
                             T.RandomAffine(AFFINE["degrees"], translate=(AFFINE["translate"],) * 2,
                                            scale=AFFINE["scale"]),
                             T.RandomHorizontalFlip(), T.ToTensor()])
        self.data = xrv.datasets.NIH_Dataset(imgpath=str(folder), csvpath=str(folder / "Data_Entry_2017_v2020.csv"),
                                             views=["PA"], unique_patients=False, transform=transform,
                                             data_aug=augment)
        self.loader = torch.utils.data.DataLoader(self.data, batch_size=BATCH, shuffle=True, num_workers=workers,
                                                  drop_last=True)

    def first_epoch(self) -> tuple[float, int]:
        return self.epoch()

    def epoch(self) -> tuple[float, int]:
        start, seen = time.perf_counter(), 0
        for batch in self.loader:
            assert batch["img"].shape[1:] == (1, SIZE, SIZE)
            seen += batch["img"].shape[0]
        return time.perf_counter() - start, seen


# ------------------------------------------------------------------------------------ cxrlab

class CxrlabPath:
    def __init__(self, folder: Path, cache: Path, workers: int):
        from cxrlab.data.transforms import build_augment

        self.folder, self.cache, self.workers = folder, cache, workers
        self.augment = build_augment({"name": "weak", "hflip": 0.5})
        self.loader = None

    def first_epoch(self) -> tuple[float, int]:
        """``prepare`` (decoding every file once) and the first epoch over the cache."""
        from cxrlab.data.cache import open_cache, prepare
        from cxrlab.data.dataset import ImageSet
        from cxrlab.data.sources import parse_source
        from cxrlab.engine.trainer import make_loader

        start = time.perf_counter()
        prepare(parse_source(f"nih:{self.folder}"), self.cache, size=SIZE, workers=max(1, self.workers),
                progress=False)
        images, index, labels, _ = open_cache(self.cache)
        target = index[list(labels.names)].to_numpy(np.float32)
        self.loader = make_loader(ImageSet(images, target, np.ones_like(target)), BATCH, shuffle=True, seed=0,
                                  num_workers=self.workers, distributed=False)
        self.epoch()
        first = time.perf_counter() - start
        # Steady state: an epoch of REPEAT passes over the cache, so that the loader's worker start-up
        # (make_loader does not keep workers between epochs) weighs what it weighs in a real epoch of
        # tens of thousands of images, not what it weighs in one of a few hundred.
        rows = np.tile(np.arange(len(images)), self.REPEAT)
        self.loader = make_loader(ImageSet(images, target[rows], np.ones_like(target[rows]), rows=rows), BATCH,
                                  shuffle=True, seed=0, num_workers=self.workers, distributed=False)
        return first, len(images)

    REPEAT = 10

    def epoch(self) -> tuple[float, int]:
        start, seen = time.perf_counter(), 0
        for batch in self.loader:
            x = self.augment(batch["image"].float().div_(255.0))  # Trainer._to_device + the regime's weak view
            assert x.shape[1:] == (1, SIZE, SIZE)
            seen += x.shape[0]
        return time.perf_counter() - start, seen


def compare(folder: Path, work: Path, workers: int, epochs: int) -> dict:
    txv, cxr = TxvPath(folder, workers), CxrlabPath(folder, work / f"cache_w{workers}", workers)
    first = {"txv": txv.first_epoch(), "cxrlab": cxr.first_epoch()}
    steady: dict[str, list[float]] = {"txv": [], "cxrlab": []}
    for e in range(epochs - 1):
        order = [("txv", txv), ("cxrlab", cxr)][:: 1 if e % 2 else -1]
        for name, path in order:
            seconds, seen = path.epoch()
            steady[name].append(seen / seconds)
    return {"first": first, "steady": {k: statistics.median(v) for k, v in steady.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="images (half PNG, half JPEG)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per tool and setting (the first included)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torchxrayvision as xrv

    work = Path(tempfile.mkdtemp(prefix="cxrlab-vs-txv-"))
    try:
        folder = work / "nih"
        folder.mkdir()
        start = time.perf_counter()
        make_images(folder, args.n)
        print(f"{args.n} images of 1024² (half PNG, half JPEG) from the fixtures in {time.perf_counter() - start:.0f} s; "
              f"torchxrayvision {xrv.__version__}; output {SIZE} px, batch {BATCH}, random affine + flip")
        print(f"{'setting':22s} {'tool':8s} {'first epoch s':>13s} {'steady img/s':>13s}")
        for workers in args.workers:
            r = compare(folder, work, workers, args.epochs)
            label = "per core (0 workers)" if workers == 0 else f"{workers} workers"
            for tool in ("txv", "cxrlab"):
                seconds, seen = r["first"][tool]
                first_note = " (prepare included)" if tool == "cxrlab" else ""
                print(f"{label:22s} {tool:8s} {seconds:13.1f} {r['steady'][tool]:13.1f}{first_note}")
            t, c = r["first"]["txv"][0], r["first"]["cxrlab"][0]
            print(f"{'':22s} ratio cxrlab/txv: steady {r['steady']['cxrlab'] / r['steady']['txv']:.1f}×, "
                  f"first epoch {t / c:.2f}× faster")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
