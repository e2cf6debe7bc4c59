"""Data-path benchmark: what the prepared cache buys, measured in one run on this machine.

1. Throughput (images/s, one process) of decoding the real PNG / JPEG / DICOM fixtures and fitting
   them to SIZE px, as a raw-file data path does per sample, versus reading SIZE px images from a
   prepared cache and collating batches of 64 through a DataLoader; the ratio cache / raw.
2. Resident memory after one epoch over caches of 1k and 10k synthetic images, each in a fresh
   process: ImageSet (reads the file with preadv) stays flat; iterating the same memmap by fancy
   indexing, shown for comparison, maps every page it touched into the process.
3. ``prepare``'s decoding per core, before/after: the exact path ``fit_image(read_image(f))`` (what
   prepare ran before) against ``read_fitted(f)`` (uint8 throughout, JPEG draft decoding, Pillow for
   baseline-JPEG DICOM), interleaved, on files shaped as the datasets ship them (built from the
   fixtures in a temp dir), with the pixel difference between the two; then ``prepare`` end to end
   with 1 and 2 workers, and the projected time for ChestX-ray14 and CheXpert-small.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data.py [--size 224] [--rss-size 128] [--only decode]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {"PNG": SHARED / "nih" / "00000001_000.png", "JPEG": SHARED / "covid" / "16747_3_1.jpg",
         "DICOM": SHARED / "dicom" / "siim_pneumothorax_example.dcm"}


def timed_rate(fn, min_seconds: float = 2.0) -> float:
    """Items per second of ``fn`` (returns how many items it did), repeated for ``min_seconds``."""
    fn()  # warm-up: imports, page cache, plugin initialisation
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        done += fn()
    return done / (time.perf_counter() - start)


def raw_rate(path: Path, size: int) -> float:
    from cxrlab.data.images import read_image
    from cxrlab.data.preprocess import fit_image

    def one() -> int:
        fit_image(read_image(path), size)
        return 1

    return timed_rate(one)


def real_file_cache(out: Path, size: int, copies: int) -> Path:
    """A cache of the three real files, repeated (the content does not change read speed)."""
    from cxrlab.data.cache import prepare
    from cxrlab.data.records import Records
    from cxrlab.labels import NIH14

    paths = [str(p) for p in FILES.values()] * copies
    n = len(paths)
    ids = [str(i) for i in range(n)]
    meta = pd.DataFrame({"path": paths, "patient_id": ids, "study_id": ids, "view": ["PA"] * n})
    records = Records("fixtures", NIH14, np.zeros((n, len(NIH14)), np.float32), meta)
    prepare(records, out, size=size, workers=1, progress=False)
    return out


def cache_rate(cache: Path, batch_size: int = 64) -> float:
    import torch
    from torch.utils.data import DataLoader

    from cxrlab.data.cache import open_cache
    from cxrlab.data.dataset import ImageSet

    images, index, labels, _ = open_cache(cache)
    target = index[list(labels.names)].to_numpy(np.float32)
    data = ImageSet(images, target, np.ones_like(target))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))

    def epoch() -> int:
        return sum(batch["image"].shape[0] for batch in loader)

    return timed_rate(epoch)


def memory_child(cache: str, how: str) -> dict:
    """One epoch over ``cache`` in batches of 64 (shuffled); this process's memory afterwards."""
    import torch
    from torch.utils.data import DataLoader

    from cxrlab.data.cache import open_cache
    from cxrlab.data.dataset import ImageSet

    images, index, labels, _ = open_cache(cache)
    target = index[list(labels.names)].to_numpy(np.float32)
    before = _memory()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).numpy()
    if how == "imageset":
        loader = DataLoader(ImageSet(images, target, np.ones_like(target)), batch_size=64, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        seen = sum(int(batch["image"].shape[0]) for batch in loader)
    else:  # plain memmap fancy indexing, for comparison
        seen = sum(len(images[np.sort(order[i:i + 64])]) for i in range(0, len(order), 64))
    return {"seen": seen, "before": before, "after": _memory()}


def _memory() -> dict:
    """VmRSS, RssAnon, RssFile and the peak VmHWM of this process, in MiB (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def synthetic_cache(out: Path, n: int, size: int) -> tuple[Path, float]:
    from cxrlab.data.cache import prepare
    from cxrlab.data.synthetic import load_synthetic

    start = time.perf_counter()
    prepare(load_synthetic(f"{n},seed=0,size=64"), out, size=size, workers=1, progress=False)
    return out, n / (time.perf_counter() - start)


# ------------------------------------------------------------------------------ prepare: before / after

NIH_IMAGES, CHEXPERT_SMALL_IMAGES = 112_120, 223_648  # ChestX-ray14; CheXpert-v1.0-small train + valid


def dataset_like_files(out: Path) -> dict[str, Path]:
    """Files shaped as the datasets ship them, made from the real fixtures: NIH (1024² 8-bit PNG),
    MIMIC-CXR-JPG-like (2500×2136 JPEG, stored RGB as users' copies often are), CheXpert-small
    (390×320 JPEG), the real 1024² JPEG-compressed DICOM."""
    from PIL import Image

    nih = Image.open(FILES["PNG"]).convert("L")
    covid = Image.open(FILES["JPEG"])
    files = {"PNG 1024² (NIH)": out / "nih.png", "JPEG 2500² RGB (MIMIC-JPG-like)": out / "mimic.jpg",
             "JPEG 390×320 (CheXpert-small)": out / "chexpert.jpg", "JPEG 1024² gray": out / "gray.jpg",
             "DICOM 1024² JPEG-baseline": FILES["DICOM"]}
    nih.resize((1024, 1024), Image.Resampling.BICUBIC).save(files["PNG 1024² (NIH)"])
    covid.resize((2500, 2136), Image.Resampling.BICUBIC).save(files["JPEG 2500² RGB (MIMIC-JPG-like)"], quality=92)
    nih.resize((320, 390), Image.Resampling.BICUBIC).save(files["JPEG 390×320 (CheXpert-small)"], quality=92)
    nih.resize((1024, 1024), Image.Resampling.BICUBIC).save(files["JPEG 1024² gray"], quality=92)
    return files


def interleaved_rates(fns: dict, rounds: int = 7, seconds: float = 1.0) -> dict[str, float]:
    """Median items/s of each ``fn`` over ``rounds`` alternating timings (load drift hits all alike)."""
    import statistics

    rates: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                done += fn()
            rates[name].append(done / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def decode_before_after(work: Path, size: int) -> dict[str, float]:
    from cxrlab.data.images import TOLERANCE, read_image
    from cxrlab.data.preprocess import fit_image, preprocess
    from cxrlab.model_card import InputSpec

    def read_fitted(path, size):  # the one preprocessing path (what prepare stores)
        return preprocess(InputSpec(size), path)

    files = dataset_like_files(work)
    print(f"## prepare decoding at {size} px, one core: exact path (before) vs read_fitted (after)")
    print(f"{'file':34s} {'before img/s':>12s} {'after img/s':>12s} {'speed-up':>9s}   |after - exact| grey levels")
    after_rates = {}
    for name, path in files.items():
        def before(path=path) -> int:
            fit_image(read_image(path), size)
            return 1

        def after(path=path) -> int:
            read_fitted(path, size)
            return 1

        r = interleaved_rates({"before": before, "after": after})
        d = np.abs(read_fitted(path, size).astype(np.int16) - fit_image(read_image(path), size))
        after_rates[name] = r["after"]
        print(f"{name:34s} {r['before']:12.1f} {r['after']:12.1f} {r['after'] / r['before']:8.1f}×   "
              f"mean {d.mean():.3f}  p99 {np.percentile(d, 99):.0f}  max {d.max()}")
    print(f"  (tolerance enforced by tests/test_read_fitted.py: {TOLERANCE})")
    return after_rates


def prepare_scaling(work: Path, size: int, n: int = 240) -> dict[int, float]:
    """``prepare`` end to end (workers 1 and 2) over n NIH-like PNGs, and the projected dataset times."""
    import shutil as _shutil

    from cxrlab.data.cache import prepare
    from cxrlab.data.records import Records
    from cxrlab.labels import NIH14

    source = work / "nih.png"
    folder = work / "prep_src"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):  # distinct files, so the page cache is not one file read n times
        paths.append(folder / f"{i:05d}.png")
        _shutil.copyfile(source, paths[-1])
    ids = [str(i) for i in range(n)]
    meta = pd.DataFrame({"path": [str(p) for p in paths], "patient_id": ids, "study_id": ids, "view": ["PA"] * n})
    records = Records("nih-like", NIH14, np.zeros((n, len(NIH14)), np.float32), meta)
    print(f"\n## prepare end to end, {n} NIH-like 1024² PNGs → {size} px")
    rates = {}
    for workers in (1, 2):
        out = work / f"prep_w{workers}"
        start = time.perf_counter()
        prepare(records, out, size=size, workers=workers, progress=False)
        rates[workers] = n / (time.perf_counter() - start)
        _shutil.rmtree(out)
        print(f"workers={workers}: {rates[workers]:7.1f} img/s")
    print(f"  scaling 2 workers / 1 = {rates[2] / rates[1]:.2f}× (2 cores, shared with other work)")
    return rates


def project(per_core: dict[str, float], measured_2: float | None) -> None:
    print("\n## projected prepare time (per-core rate × cores, i.e. assuming linear scaling)")
    for dataset, n, kind in (("ChestX-ray14", NIH_IMAGES, "PNG 1024² (NIH)"),
                             ("CheXpert-small", CHEXPERT_SMALL_IMAGES, "JPEG 390×320 (CheXpert-small)"),
                             ("MIMIC-CXR-JPG-like (per 100k)", 100_000, "JPEG 2500² RGB (MIMIC-JPG-like)")):
        rate = per_core[kind]
        print(f"{dataset:30s} {n:7d} images at {rate:6.1f} img/s/core: 2 cores {n / (2 * rate) / 60:6.1f} min, "
              f"16 cores {n / (16 * rate) / 60:6.1f} min")
    if measured_2:
        print(f"  (measured end to end with 2 workers: {measured_2:.1f} img/s → ChestX-ray14 in "
              f"{NIH_IMAGES / measured_2 / 60:.1f} min here)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="image side for the throughput part")
    parser.add_argument("--rss-size", type=int, default=128, help="image side of the memory-test caches")
    parser.add_argument("--only", choices=("decode",), help="run only the prepare before/after part")
    parser.add_argument("--memory-child", nargs=2, metavar=("CACHE", "HOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="cxrlab-bench-"))
    try:
        per_core = decode_before_after(work, args.size)
        rates = prepare_scaling(work, args.size)
        project(per_core, rates.get(2))
        if args.only == "decode":
            return
        print()
        print(f"## Throughput at {args.size} px, one process (cpu: {os.cpu_count()} cores visible)")
        raw = {}
        for kind, path in FILES.items():
            from cxrlab.data.images import read_image

            shape = read_image(path).shape
            raw[kind] = raw_rate(path, args.size)
            print(f"raw {kind:5s} {path.name} {shape[1]}×{shape[0]}: decode + fit {raw[kind]:9.1f} img/s")
        cache = real_file_cache(work / "fixtures", args.size, copies=100)
        cached = cache_rate(cache)
        print(f"cache (300 images, ImageSet + DataLoader, batches of 64): {cached:9.1f} img/s")
        for kind, rate in raw.items():
            print(f"  cache / raw {kind:5s} = {cached / rate:8.1f}×")

        print(f"\n## Memory after one epoch, fresh process per line ({args.rss_size} px synthetic caches)")
        for n in (1000, 10000):
            path, prep_rate = synthetic_cache(work / f"syn{n}", n, args.rss_size)
            size_mib = (path / "images.u8").stat().st_size / 2**20
            print(f"{n} images ({size_mib:.0f} MiB file; prepared at {prep_rate:.0f} img/s, render included)")
            for how in ("imageset", "memmap-index"):
                result = subprocess.run([sys.executable, __file__, "--memory-child", str(path), how],
                                        capture_output=True, text=True, check=True)
                m = json.loads(result.stdout.strip().splitlines()[-1])
                b, a = m["before"], m["after"]
                print(f"  {how:13s} RSS {b['VmRSS']:6.0f} → {a['VmRSS']:6.0f} MiB (anon {a['RssAnon']:5.0f}, "
                      f"file-mapped {a['RssFile']:5.0f}, peak {a['VmHWM']:6.0f}) over {m['seen']} images")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
