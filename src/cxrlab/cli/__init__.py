"""The ``cxrlab`` command line: each command parses its arguments and makes one call into
``cxrlab.workflows`` (``tests/test_layering.py`` holds ``cli/`` to that)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..errors import CxrlabError
from ..workflows import plural
from ..workflows.catalog import LISTS, list_names, recipe_rows, recipe_table, version_text
from .data import add_data_commands, add_prepare_command
from .deploy import add_deploy_commands
from .ensemble import add_ensemble_command
from .prototypes import add_prototypes_command


def main(argv: list[str] | None = None) -> int:
    # one line per epoch on stderr (the progress bar only shows on a terminal; batch logs need this)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("cxrlab").setLevel(logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere on the line (or CXRLAB_DEBUG=1): show the traceback of an error
    debug = "--debug" in argv or os.environ.get("CXRLAB_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    # KEY=VALUE overrides may come before or after the options (argparse alone takes them only before)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        print(version_text())
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("cxrlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cxrlab list backbones | head`: the reader stopped early, nothing went wrong
        sys.stdout = open(os.devnull, "w")  # so the interpreter's final flush does not raise again
        return 0
    except Exception as exc:  # noqa: BLE001 - one line per error; the traceback only when asked for
        if debug:
            raise
        print(f"cxrlab: error: {_error_line(exc)}", file=sys.stderr)
        return 2


TRAIN_EXTRA = ("torch", "torchvision", "timm")  # pyproject's `train` extra


def _error_line(exc: BaseException) -> str:
    """One line for any error: a CxrlabError's own message, an OS error with its path and reason (a full
    disk, a denied folder), anything else with its type and a hint that ``--debug`` shows where."""
    import errno

    if isinstance(exc, CxrlabError):
        return str(exc)
    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] in TRAIN_EXTRA:
        # the deployment install (`cxrlab[serve]`) has no torch: only ONNX predict/serve work there
        return (f"this command needs PyTorch, which is not installed ({exc.name}): pip install 'cxrlab[train]' "
                "(a machine without a GPU: the CPU-only wheels, see the README's install section)")
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            reason += " (free some space or write elsewhere)"
        return f"{where}{reason}"
    return f"{type(exc).__name__}: {exc} (unexpected; rerun with --debug for the traceback)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrlab", description="Multi-label chest X-ray classification.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (anywhere on the line; or CXRLAB_DEBUG=1)")
    parser.add_argument("--version", action="store_true", help="versions of cxrlab, torch and timm; CUDA or not")
    sub = parser.add_subparsers(dest="command")
    add_data_commands(sub)
    add_prepare_command(sub)
    add_prototypes_command(sub)
    add_deploy_commands(sub)
    add_ensemble_command(sub)

    p = sub.add_parser("train", help="train one model from a recipe; writes checkpoints and a test report")
    _recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out exactly")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.set_defaults(func=_train)

    p = sub.add_parser("cv", help="R×K patient-disjoint cross-validation: one model per fold, mean ± std")
    _recipe_args(p)
    p.add_argument("--cv", default=None, help="RxK, e.g. 3x5 (default: the recipe's data.repeats x data.folds)")
    p.add_argument("--folds-file", default=None, help="fold manifest from `cxrlab data split` (sets data.folds_file)")
    p.set_defaults(func=_cv)

    p = sub.add_parser("compare", help="run recipes on identical splits; side-by-side table")
    p.add_argument("recipes", nargs="+", help="recipe names or files")
    p.add_argument("--data", default=None, help="source for every recipe, KIND:LOCATION")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--cv", default=None, help="RxK cross-validation, e.g. 3x5")
    group.add_argument("--seeds", type=int, default=None, help="N seeds on the recipes' split")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every recipe (repeatable)")
    p.add_argument("--folds-file", default=None, help="fold manifest from `cxrlab data split`: every recipe "
                   "runs on its folds (sets data.folds_file)")
    p.add_argument("--reference", default=None, help="recipe the others are tested against (paired, on the "
                   "same test images; default: the first)")
    p.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples (default 1000)")
    p.add_argument("--paired", default="folds", choices=["folds", "pooled"], help="what the paired test tests: "
                   "folds = the mean of per-fold differences, the table's number (default); pooled = all runs' "
                   "predictions scored as one set")
    p.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="search these values for every recipe, in every fold or seed, choosing on the validation "
                   "part (repeatable: the grid is the product)")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=_compare)

    p = sub.add_parser("evaluate", help="score a checkpoint on a labelled source")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", required=True, help="KIND:LOCATION")
    p.add_argument("--policy", default=None)
    p.add_argument("--split", default="all", help="all | train | val | test (official split column)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true", help="replace the contents of an existing --out folder")
    p.add_argument("overrides", nargs="*", metavar="eval.KEY=VALUE",
                   help="bootstrap, ci, min_positives, exclude_unreliable, level, study_aggregation; e.g. "
                   "eval.bootstrap=1000 eval.exclude_unreliable=true")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="probabilities and thresholded labels for images or a folder")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--out", required=True, type=Path, help="file to write (dicom-sr: a folder, one SR per image)")
    p.add_argument("--format", default="csv", choices=["csv", "json", "dicom-sr", "fhir"],
                   help="csv (default), json, dicom-sr (DICOM Structured Reports) or fhir (an R4B Bundle); the "
                   "last two need `pip install 'cxrlab[interop]'`")
    p.add_argument("--generate-uids", action="store_true",
                   help="dicom-sr for PNG/JPEG inputs: an SR about made-up study/series/instance UIDs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when an image cannot be read (it is listed in the error column)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("heatmap", help="per-label heatmaps (LCL attention or class activation maps) as PNGs")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    p.add_argument("--labels", default=None, help="comma-separated label names (default: the top ones)")
    p.add_argument("--top", type=int, default=3, help="without --labels: this many most probable labels (>= 1)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    p.add_argument("--method", default="native", choices=["native", "gradcam", "gradcampp"],
                   help="native: the head's attention or CAM; gradcam/gradcampp: Grad-CAM(++), any head")
    p.set_defaults(func=_heatmap)

    p = sub.add_parser("list", help="recipes (a table: method, data, paper, description) and registered parts")
    p.add_argument("what", choices=LISTS)
    p.add_argument("--filter", default=None, help="names matching a wildcard, e.g. 'convnext*' (backbones), 'lcl_*'")
    p.add_argument("--data", default=None, help="recipes: only those on this data kind (synthetic, nih, chexpert, "
                   "mimic, csv)")
    p.add_argument("--method", default=None, help="recipes: only this method's (lcl, mpc, can, dwml, msml, spml, "
                   "baseline), with the recipes named after it")
    p.add_argument("--names", action="store_true", help="recipes: the names alone, one a line (for scripts)")
    p.set_defaults(func=_list)

    p = sub.add_parser("demo", help="prepare, train, evaluate, report and predict on the embedded synthetic data")
    p.add_argument("--out", type=Path, default=Path("cxrlab-demo"))
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the finished demo run in --out")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_demo)
    return parser


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe name (see `cxrlab list recipes`) or YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=3 model.backbone=resnet50")
    p.add_argument("--out", required=True, type=Path)


def _train(args) -> int:
    from ..workflows.train import train  # lazy: start-up time (torch), for every command

    result = train(args.recipe, args.out, args.overrides, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from the main process
        print(f"report: {result.report}")
    return 0


def _cv(args) -> int:
    from ..workflows.train import cv  # lazy: start-up time (torch), for every command

    repeats, folds = _parse_cv(args.cv) if args.cv else (None, None)
    summary = cv(args.recipe, args.out, args.overrides + _folds_file(args), repeats=repeats, folds=folds)
    print(f"report: {summary['report']}")
    return 0


def _compare(args) -> int:
    from ..workflows.cross_validation import compare  # lazy: start-up time (torch), for every command

    cv = _parse_cv(args.cv) if args.cv else None
    paths = compare(args.recipes, args.out, data=args.data, cv=cv, seeds=args.seeds,
                    overrides=args.overrides + _folds_file(args), reference=args.reference,
                    resamples=args.resamples, tune=args.tune, paired=args.paired)
    print(f"comparison: {paths[0]}")
    return 0


def _evaluate(args) -> int:
    from ..workflows.evaluate import evaluate_checkpoint  # lazy: start-up time (torch), for every command

    report = evaluate_checkpoint(args.checkpoint, args.data, args.out, policy=args.policy, split=args.split,
                                 overwrite=args.overwrite, overrides=args.overrides)
    print(f"report: {report}")
    return 0


def _predict(args) -> int:
    from ..workflows.predict import predict_files  # lazy: start-up time; model.onnx never imports torch

    table = predict_files(args.checkpoint, args.inputs, args.out, batch_size=args.batch_size, overwrite=args.overwrite,
                          format=args.format, generate_uids=args.generate_uids)
    failed = table["error"].fillna("").astype(bool) if "error" in table else table["path"].isna()
    what = {"csv": plural(len(table), "row"), "dicom-sr": plural(int((~failed).sum()), "DICOM SR file"),
            "fhir": "a FHIR R4B Bundle"}.get(args.format, plural(len(table), "result"))
    print(f"wrote {what} to {args.out}: {int((~failed).sum())} predicted, {int(failed.sum())} "
          + ("unreadable (see its error column)" if args.format == "csv" else "unreadable (named above)"))
    return 1 if args.strict and failed.any() else 0


def _heatmap(args) -> int:
    from ..workflows.heatmap import write_heatmaps  # lazy: start-up time (torch), for every command

    labels = [n.strip() for n in args.labels.split(",")] if args.labels else None
    failures: list = []
    written = write_heatmaps(args.checkpoint, args.inputs, args.out, labels=labels, top=args.top,
                             method=args.method, overwrite=args.overwrite, failures=failures)
    print(f"wrote {plural(len(written), 'heatmap')} to {args.out}"
          + (f"; {len(failures)} unreadable: {', '.join(str(path) for path, _ in failures[:5])}"
             + (", ..." if len(failures) > 5 else "") if failures else ""))
    return 1 if failures and not written else 0  # as predict: unreadable images cost only their own maps


def _list(args) -> int:
    if args.what != "recipes":
        if args.data or args.method:
            raise CxrlabError(f"--data and --method filter recipes, not {args.what}")
        print("\n".join(list_names(args.what, args.filter)))
        return 0
    rows = recipe_rows(data=args.data, method=args.method, pattern=args.filter)
    if args.names:
        print("\n".join(r.name for r in rows))
    elif rows:
        print(recipe_table(rows))
    else:
        print("no recipe matches", file=sys.stderr)
    return 0


def _demo(args) -> int:
    from ..workflows.demo import run_demo  # lazy: start-up time (torch), for every command

    run_demo(args.out, args.overrides, resume=args.resume, overwrite=args.overwrite)
    return 0


def _folds_file(args) -> list[str]:
    return [f"data.folds_file={args.folds_file}"] if args.folds_file else []


def _parse_cv(text: str) -> tuple[int, int]:
    try:
        repeats, folds = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise CxrlabError(f"--cv expects RxK such as 3x5, got {text!r}") from None
    if repeats < 1 or folds < 2:
        raise CxrlabError(f"--cv {text}: need at least 1 repeat and 2 folds")
    return repeats, folds


if __name__ == "__main__":
    sys.exit(main())
