"""Inference speed: eager PyTorch against ONNX Runtime, and the HTTP service under a bounded load.

Part 1, side by side in one process: for each backbone (linear head, 14 labels, 224 px, random
weights; speed does not depend on the values) the exported graph is timed in eager PyTorch
(``torch.inference_mode``) and through an ONNX Runtime CPU session, at batch 1 and 16, with the same
number of threads (``--threads``, both intra-op). Repeats are interleaved so load drift hits both alike;
the median ms per batch and the ratio eager / ORT are printed. ``--profile`` adds ORT's per-operator
time shares (from its own profiler) and torch's top operators for the first backbone at batch 1.

Part 2: ``cxrlab serve model.onnx`` in a subprocess (``--workers`` inference threads), loaded by
``--clients`` concurrent loopback clients posting a real radiograph (the NIH fixture when present)
to ``/predict``, ``--requests`` in all: requests/s, p50/p95 latency, errors (anything but 200) and the
server's resident memory after the first 100 requests and at the end.

    flock /tmp/cxrlab-cpu.lock python benchmarks/bench_inference.py [--threads 2] [--repeats 5]
        [--backbones resnet50,densenet121] [--requests 1000] [--clients 4] [--serve-backbone resnet18]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "data" / "nih" / "00000001_000.png"
NIH14 = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
         "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")


def make_checkpoint(folder: Path, backbone: str, size: int) -> Path:
    from cxrlab.checkpoint import module_tensors, save_checkpoint
    from cxrlab.config import from_dict
    from cxrlab.models import build_model

    torch.manual_seed(0)
    recipe = from_dict({"model": {"backbone": backbone, "head": "linear"}, "loss": {"bce": 1.0},
                        "data": {"image_size": size}})
    model = build_model(backbone, "linear", len(NIH14)).eval()
    info = {"recipe": recipe.to_dict(), "labels": list(NIH14), "thresholds": None, "metrics": {}, "epoch": 0,
            "step": 0, "ema": False, "trainer": {}}
    save_checkpoint(folder, module_tensors({"model": model}), {}, {}, info)
    return folder


class Eager:
    def __init__(self, graph, x):
        self.graph, self.x = graph, x

    def run(self, n):
        with torch.inference_mode():
            for _ in range(n):
                self.graph(self.x)


class Ort:
    def __init__(self, session, x):
        self.session, self.x = session, {"image": x.numpy()}

    def run(self, n):
        for _ in range(n):
            self.session.run(None, self.x)


def ort_session(path: Path, threads: int, profile: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = profile
    if profile:  # ORT writes its profile JSON here, not into the working directory
        options.profile_file_prefix = str(path.with_suffix("")) + "_profile"
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_backends(args, tmp: Path) -> list[dict]:
    from cxrlab.inference.export import ExportGraph, export_onnx
    from cxrlab.inference.predictor import Predictor
    from timing import interleaved_ms_per_step

    torch.set_num_threads(args.threads)
    rows = []
    for backbone in args.backbones.split(","):
        ckpt = make_checkpoint(tmp / backbone, backbone, args.size)
        onnx_path = tmp / f"{backbone}.onnx"
        t0 = time.perf_counter()
        sidecar = export_onnx(ckpt, onnx_path)
        export_s = time.perf_counter() - t0
        graph = ExportGraph(Predictor.from_checkpoint(ckpt, device="cpu").model, args.size).eval()
        session = ort_session(onnx_path, args.threads)
        for batch in (1, 16):
            x = torch.rand(batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(batch))
            steps = max(1, args.steps // batch)
            times = interleaved_ms_per_step({"eager": Eager(graph, x), "ort": Ort(session, x)}, steps,
                                            args.repeats, warmup=1)
            eager, ours = statistics.median(times["eager"]), statistics.median(times["ort"])
            rows.append({"backbone": backbone, "batch": batch, "eager_ms": eager, "ort_ms": ours,
                         "speedup": eager / ours, "parity": sidecar["parity"]["max_abs_diff"], "export_s": export_s})
            print(f"{backbone:12s} batch {batch:2d}: eager {eager:8.1f} ms  ORT {ours:8.1f} ms  "
                  f"eager/ORT {eager / ours:4.2f}x  ({batch / ours * 1000:6.1f} vs {batch / eager * 1000:6.1f} img/s; "
                  f"parity {sidecar['parity']['max_abs_diff']:.1e}, export {export_s:.0f} s)", flush=True)
        if args.profile and backbone == args.backbones.split(",")[0]:
            profile(onnx_path, graph, args)
    return rows


def profile(onnx_path: Path, graph, args) -> None:
    """Where the time goes at batch 1: ORT's per-operator shares and torch's top operators."""
    session = ort_session(onnx_path, args.threads, profile=True)
    x = torch.rand(1, 1, args.size, args.size)
    for _ in range(10):
        session.run(None, {"image": x.numpy()})
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    total = sum(by_op.values()) or 1.0
    print("  ORT operator time shares (batch 1): " +
          ", ".join(f"{op} {t / total:.0%}" for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:6]))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.inference_mode():
        for _ in range(5):
            graph(x)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6)
    print("  torch top operators (batch 1):\n" + "\n".join("    " + line for line in table.splitlines()))


# ------------------------------------------------------------------------------------------ server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_server(args, tmp: Path) -> dict:
    import httpx

    from cxrlab.inference.export import export_onnx

    ckpt = make_checkpoint(tmp / f"serve_{args.serve_backbone}", args.serve_backbone, args.size)
    model = tmp / "serve.onnx"
    export_onnx(ckpt, model)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cxrlab.cli", "serve", str(model), "--port", str(port),
                               "--workers", str(args.workers), "--queue", str(args.clients)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        data = FIXTURE.read_bytes() if FIXTURE.is_file() else _synthetic_png(args.size)
        latencies, codes, rss = [], [], {}
        clients = [httpx.Client(base_url=url, timeout=60) for _ in range(args.clients)]

        def one(i):
            client = clients[i % len(clients)]
            start = time.perf_counter()
            code = client.post("/predict", files={"files": ("x.png", data, "image/png")}).status_code
            return time.perf_counter() - start, code

        begin = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            for done, (latency, code) in enumerate(pool.map(one, range(args.requests)), 1):
                latencies.append(latency)
                codes.append(code)
                if done in (100, args.requests):
                    rss[done] = rss_mib(server.pid)
        elapsed = time.perf_counter() - begin
        for c in clients:
            c.close()
    finally:
        server.terminate()
        server.wait(30)
    ms = np.asarray(latencies) * 1000
    result = {"requests": args.requests, "clients": args.clients, "workers": args.workers,
              "req_per_s": args.requests / elapsed, "p50_ms": float(np.percentile(ms, 50)),
              "p95_ms": float(np.percentile(ms, 95)), "errors": int(sum(c != 200 for c in codes)),
              "rss_mib": rss, "image": FIXTURE.name if FIXTURE.is_file() else "synthetic"}
    print(f"server ({args.serve_backbone} ONNX, {args.workers} workers, {args.clients} clients, {args.requests} "
          f"requests of {result['image']}): {result['req_per_s']:.1f} req/s, p50 {result['p50_ms']:.0f} ms, "
          f"p95 {result['p95_ms']:.0f} ms, errors {result['errors']}, RSS {rss.get(100, float('nan')):.0f} MiB "
          f"after 100 -> {rss.get(args.requests, float('nan')):.0f} MiB after {args.requests}", flush=True)
    return result


def _synthetic_png(size: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="images per timed repeat (batch 16: one batch)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backbones", default="resnet50,densenet121")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--serve-backbone", default="resnet18")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {args.threads}, {os.cpu_count()} CPUs, {args.size} px", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        figures = {"backends": compare_backends(args, Path(tmp))}
        if not args.skip_server:
            figures["server"] = load_server(args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
