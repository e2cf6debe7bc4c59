"""Commands that use a trained model outside training: ``export``, ``serve``, ``calibrate``, ``card``."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ThresholdRule
from ..workflows import plural


def add_deploy_commands(sub) -> None:
    p = sub.add_parser("export", help="write an ONNX model + sidecar, checked against PyTorch on real images")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", required=True, type=Path, help="the .onnx file (its sidecar is <out>.json)")
    p.add_argument("--check", nargs="+", type=Path, default=None, metavar="IMAGE",
                   help="image files/folders for the parity check (default: 8 synthetic radiographs)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |ORT - PyTorch| probability (1e-4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export and its sidecar")
    p.set_defaults(func=_export)

    p = sub.add_parser("serve", help="HTTP API + web page for a checkpoint or an ONNX export")
    p.add_argument("model", type=Path, help="checkpoint (folder or run) or model.onnx")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2, help="inference threads (one process, model loaded once)")
    p.add_argument("--queue", type=int, default=8, help="requests that may wait for a worker; beyond: 503")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request before 504")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="request body limit (413 above)")
    p.add_argument("--max-uploads", type=int, default=None,
                   help="request bodies in flight at once; beyond: 503 (default: workers + queue)")
    p.add_argument("--read-timeout", type=float, default=60.0,
                   help="seconds for a request body to arrive in full, else 408 (60)")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on the API (default: env CXRLAB_TOKEN; the env "
                        "variable keeps it out of the process list)")
    p.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated Host names to answer, '*' for any (default: the --host address and "
                        "localhost, 127.0.0.1, ::1)")
    p.add_argument("--allow-remote-without-token", action="store_true",
                   help="let a non-loopback --host start without a token (only behind a proxy that authenticates)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("card", help="a Markdown model card from a run's own files (checkpoint, metrics.json)")
    p.add_argument("model", type=Path, help="run folder, checkpoint folder or model.onnx (with its sidecar)")
    p.add_argument("--out", required=True, type=Path, help="the Markdown file, e.g. MODEL_CARD.md")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_card)

    p = sub.add_parser("calibrate", help="refit per-label thresholds (and temperature) on a local labelled set")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", required=True, help="labelled source, KIND:LOCATION")
    p.add_argument("--out", required=True, type=Path, help="folder for the calibrated copy")
    p.add_argument("--temperature", action="store_true", help="also fit a per-label temperature")
    p.add_argument("--method", default="f1", choices=[r.value for r in ThresholdRule], help="threshold rule (f1)")
    p.add_argument("--policy", default=None, help="uncertain-label policy (default: the recipe's)")
    p.add_argument("--split", default="all", help="all | train | val | test (official split column)")
    p.add_argument("--holdout", default=None, help="also report ECE/Brier before -> after here: another split "
                   "of --data (e.g. --split val --holdout test) or another source KIND:LOCATION")
    p.set_defaults(func=_calibrate)


def _export(args: argparse.Namespace) -> int:
    from ..workflows.deploy import export  # lazy: start-up time (torch), for every command

    sidecar = export(args.checkpoint, args.out, check=args.check, tolerance=args.tolerance, overwrite=args.overwrite)
    parity = sidecar["parity"]
    print(f"wrote {args.out}, {args.out.name}.json and {args.out.name}.card.md: parity max |ORT - PyTorch| = {parity['max_abs_diff']:.2e} "
          f"on {plural(parity['n'], 'image')} (batch 1 and {parity['n']}; tolerance {parity['tolerance']:g})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ..workflows.deploy import serve  # lazy: start-up time (torch), for every command

    serve(args.model, host=args.host, port=args.port, workers=args.workers, queue=args.queue,
          timeout=args.timeout, max_upload_mb=args.max_upload_mb, max_uploads=args.max_uploads,
          read_timeout=args.read_timeout, token=args.token, hosts=args.allowed_hosts,
          allow_remote_without_token=args.allow_remote_without_token)
    return 0


def _card(args: argparse.Namespace) -> int:
    from ..workflows.deploy import model_card  # lazy: start-up time, as every command

    print(f"wrote {model_card(args.model, args.out, overwrite=args.overwrite)}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from ..workflows.deploy import before_after_lines, calibrate  # lazy: start-up time (torch), for every command

    record = calibrate(args.checkpoint, args.data, args.out, temperature=args.temperature, method=args.method,
                       policy=args.policy, split=args.split, holdout=args.holdout)
    print(f"wrote {args.out}: thresholds refitted for {plural(len(record['labels_refitted']), 'label')} on "
          f"{plural(record['n'], 'image')} of {record['source']}"
          + (" (with per-label temperature)" if args.temperature else ""))
    for line in before_after_lines(record):
        print(line)
    return 0
