"""Repeated K-fold cross-validation and side-by-side comparison of recipes on identical splits."""
from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import latest, read_info
from ..config import Recipe, load_recipe
from ..data.splits import read_manifest, repeated_kfold, resolve_paths, write_manifest
from ..errors import CxrlabError, unknown
from ..evaluation.paired import paired_significance, significance_markdown
from ..evaluation.protocol import protocol_line
from ..evaluation.tables import aggregate, write_comparison
from ..serialization import to_jsonable, write_json
from .experiment import check_parts, prepare_data, run, split_rows
from .run_split import check_split, split_record
from .tuning import make_search, parse_grid, summarize, tune_run


def make_manifest(recipe: Recipe, data, repeats: int, folds: int, out_file: Path):
    """The R×K patient-disjoint, multi-label-stratified manifest for ``data`` (written to ``out_file``),
    or the one named by ``data.folds_file`` (from ``cxrlab data split``), checked against the data."""
    if recipe.data.folds_file:
        return load_folds_file(recipe.data.folds_file, data, out_file)
    manifest = repeated_kfold(data.index["path"].to_numpy(), data.index["patient_id"].to_numpy(),
                              data.strata(), folds=folds, repeats=repeats,
                              seed=recipe.data.seed)
    write_manifest(manifest, out_file)
    return manifest


def load_folds_file(path, data, copy_to: Path | None = None):
    """A fold manifest written by ``cxrlab data split``, checked: patient-disjoint folds, and every image
    of ``data`` listed once per repeat under the patient the data gives it."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise CxrlabError(f"data.folds_file: {path} not found (write one with `cxrlab data split ... --out`)")
    # relative paths (cxrlab data split) resolve against where the data lies now; absolute ones load as written
    manifest = resolve_paths(read_manifest(path), data.index["path"].astype(str).to_numpy(), path)
    owner = pd.Series(data.index["patient_id"].astype(str).to_numpy(), index=data.index["path"].astype(str).to_numpy())
    for repeat, part in manifest.groupby("repeat"):
        listed = pd.Series(part["patient_id"].astype(str).to_numpy(), index=part["path"].astype(str).to_numpy())
        missing = owner.index.difference(listed.index)
        if len(missing):
            raise CxrlabError(f"{path}: repeat {repeat} lacks {len(missing)} images of the data: "
                              f"{', '.join(map(repr, missing[:3]))}{' ...' if len(missing) > 3 else ''}"
                              " (was it written for another source or views?)")
        wrong = listed.reindex(owner.index) != owner
        if wrong.any():
            image = owner.index[wrong.to_numpy()][0]
            raise CxrlabError(f"{path}: image {image!r} has patient {listed[image]!r} but the data says "
                              f"{owner[image]!r}")
    if copy_to is not None:
        write_manifest(manifest, copy_to)
    return manifest


def manifest_shape(manifest) -> tuple[int, int]:
    """(repeats, folds) of a manifest."""
    return int(manifest["repeat"].nunique()), int(manifest["fold"].nunique())


def run_cv(recipe: Recipe, out_dir: Path, repeats: int, folds: int, data=None, manifest=None,
           progress: bool = True, search=None) -> dict:
    """One model per fold of R×K CV; writes ``summary.json`` / ``summary.md`` with mean ± std.

    With ``search`` (``tuning.Search``) each fold trains every candidate and reports the one chosen on
    validation (``tuning.tune_run``); the summary then also holds ``tuning``. ``run_dirs`` in the returned
    summary are the folds' reported runs."""
    check_parts(recipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else prepare_data(recipe, progress=progress)
    if manifest is None:
        manifest = make_manifest(recipe, data, repeats, folds, out_dir / "splits.csv")
    repeats, folds = manifest_shape(manifest)
    runs = [_run_fold(recipe, search, out_dir / f"r{repeat}f{k}", data=data, manifest=manifest, fold=(repeat, k),
                      progress=progress)
            for repeat in range(repeats) for k in range(folds)]
    summary = _summary(runs, search)
    (out_dir / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=2, allow_nan=False))
    (out_dir / "summary.md").write_text(_summary_markdown(recipe.name, summary, repeats, folds))
    summary["report"] = str(out_dir / "summary.md")
    summary["run_dirs"] = [run_dir for _, run_dir, _ in runs]
    return summary


def _run_fold(recipe: Recipe, search, run_dir: Path, **kwargs) -> tuple[dict, Path, dict | None]:
    """(test metrics, reported run folder, tuning record) of one fold or seed: the run itself, or with a
    search the candidate chosen on validation."""
    if search is None:
        return _run_once(recipe, run_dir, **kwargs), run_dir, None
    return tune_run(search, run_dir, _run_once, **kwargs)


def _summary(runs: list, search) -> dict:
    summary = aggregate([metrics for metrics, _, _ in runs])
    if search is not None:
        summary["tuning"] = summarize(search.grid, [record for _, _, record in runs])
    return summary


def compare(recipes: list[str], out_dir: Path, data: str | None = None, cv: tuple[int, int] | None = None,
            seeds: int | None = None, overrides: list[str] = (), progress: bool = True,
            reference: str | None = None, resamples: int = 1000, tune: list[str] = (), paired: str = "folds"):
    """Run several recipes on identical data and splits; write comparison.md and comparison.json.

    With ``cv = (R, K)`` every recipe uses the same R×K manifest (made once, from the first recipe's
    labels); with ``seeds = N`` every recipe trains N times (train.seed = 0..N-1) on the recipe split.
    With two or more recipes, each is also tested against ``reference`` (default: the first) on the same
    test images (``evaluation.paired``: runs matched fold by fold or seed by seed; ``paired="folds"`` tests
    the mean of per-fold differences, the table's number, ``"pooled"`` the pooled predictions; the
    reference's evaluation labels); the result goes to significance.json and a comparison.md section.
    With ``tune`` (``KEY=V1,V2,...`` specs) every recipe searches the same grid in every fold or seed and
    reports the candidate chosen on validation (``workflows.tuning``); the tests use the chosen runs.
    """
    extra = list(overrides) + ([f"data.source={data}"] if data else [])
    grid = parse_grid(list(tune)) if tune else None
    loaded, searches = {}, {}
    for name in recipes:
        recipe = load_recipe(name, extra)
        if recipe.name in loaded:
            raise CxrlabError(f"recipe {recipe.name!r} given twice")
        loaded[recipe.name] = recipe
        searches[recipe.name] = make_search(name, extra, grid) if grid else None
    first = next(iter(loaded.values()))
    reference = _reference_name(reference, recipes, loaded)
    _check_same_data(loaded)
    for name, recipe in loaded.items():  # every recipe's parts, before hours of training the first ones
        for each in searches[name].recipes if searches[name] else [recipe]:
            check_parts(each)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = prepare_data(first, progress=progress)
    results, run_dirs, datasets = {}, {}, {}
    manifest = None
    if cv or first.data.folds_file:
        manifest = make_manifest(first, shared, *(cv or (1, 2)), out_dir / "splits.csv")
        cv = manifest_shape(manifest)
    for name, recipe in loaded.items():
        data_for_recipe = shared if _same_labels(first, recipe) else prepare_data(recipe, progress=progress)
        datasets[name] = data_for_recipe
        search = searches[name]
        if cv:
            summary = run_cv(recipe, out_dir / name, cv[0], cv[1], data=data_for_recipe, manifest=manifest,
                             progress=progress, search=search)
            run_dirs[name] = summary.pop("run_dirs")
        else:
            runs = []
            for seed in range(seeds or 1):
                recipe.train.seed = seed
                if search:
                    search.set_seed(seed)
                runs.append(_run_fold(recipe, search, out_dir / name / f"seed{seed}", data=data_for_recipe,
                                      progress=progress))
            summary = _summary(runs, search)
            run_dirs[name] = [run_dir for _, run_dir, _ in runs]
        results[name] = summary
    tuning = {name: summary.pop("tuning") for name, summary in results.items() if "tuning" in summary}
    paths = write_comparison(results, out_dir, tuning=tuning or None)
    if len(loaded) > 1:
        _write_significance(run_dirs, reference, datasets[reference], out_dir, paths[0], resamples,
                            seed=loaded[reference].data.seed, paired=paired)
    return paths


def _reference_name(reference: str | None, given: list[str], loaded: dict) -> str:
    """The loaded name of the reference recipe, given as on the command line or by its recipe name."""
    if reference is None:
        return next(iter(loaded))
    by_argument = dict(zip(given, loaded))
    if reference in by_argument:
        return by_argument[reference]
    if reference in loaded:
        return reference
    raise unknown("reference recipe (--reference)", reference, list(loaded))


def _write_significance(run_dirs: dict, reference: str, data, out_dir: Path, md_path: Path, resamples: int,
                        seed: int, paired: str = "folds") -> dict:
    """Paired tests against the reference, scored on the reference's evaluation labels."""
    import pandas as pd

    cols = data.eval_columns
    paths = data.index["path"].to_numpy()
    names = list(data.eval_labels.names)
    targets = pd.DataFrame(data.eval_target[:, cols], index=paths, columns=names)
    mask = pd.DataFrame(data.eval_mask[:, cols], index=paths, columns=names)
    result = paired_significance(run_dirs, reference, targets, mask, resamples=resamples, seed=seed, paired=paired)
    write_json(out_dir / "significance.json", result)
    md_path.write_text(md_path.read_text() + significance_markdown(result))
    return result


# where and how fast a run reads its data, and where it logs: these may change between an interrupted run and its restart
_NOT_RESULT_FIELDS = {("data", "cache_dir"), ("data", "cache"), ("data", "num_workers"),
                      ("train", "loggers"), ("train", "mlflow")}


def _run_once(recipe: Recipe, run_dir: Path, **kwargs) -> dict:
    """The test metrics of one run. A run already finished in ``run_dir`` is read back, and one that was
    interrupted is resumed from its last checkpoint, so a cross-validation or comparison continues where
    it stopped; either must come from the same recipe, else stale numbers would be reported."""
    done = run_dir / "report" / "metrics.json"
    if done.is_file():
        _check_same_recipe(recipe, _read_json(run_dir / "report" / "config.json"), run_dir)
        _check_same_split(recipe, run_dir, **kwargs)
        return _read_json(done)
    previous = latest(run_dir)
    if previous is not None:
        _check_same_recipe(recipe, read_info(previous).get("recipe"), run_dir)
        _check_same_split(recipe, run_dir, **kwargs)
    return run(recipe, run_dir, resume=previous is not None, **kwargs).metrics


def _check_same_split(recipe: Recipe, run_dir: Path, data=None, manifest=None, fold=None, **_) -> None:
    """Refuse to reuse a run trained on other images (another R×K, folds file or data): the recipe can
    be the same while the fold named r0f1 is not."""
    if data is None:  # callers pass the prepared data; without it the run itself prepares and checks
        return
    parts = split_rows(recipe, data, manifest, fold)
    check_split(run_dir, split_record(data.index["path"].to_numpy(), parts, manifest, fold, str(recipe.data.split)))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CxrlabError(f"{path} is missing from a finished run; remove {path.parent.parent} to rerun it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CxrlabError(f"{path} is corrupt or truncated ({exc}); remove {path.parent.parent} to rerun it") from None


def _check_same_recipe(recipe: Recipe, saved: dict | None, run_dir: Path) -> None:
    """Refuse to reuse a run trained from another recipe (an edited YAML, other --set values)."""
    if saved is None:
        return
    wanted = json.loads(json.dumps(to_jsonable(recipe.to_dict())))
    changed = [f"{section}.{key}: {saved.get(section, {}).get(key)!r} → {value!r}"
               for section, fields in wanted.items() if isinstance(fields, dict)
               for key, value in fields.items()
               if (section, key) not in _NOT_RESULT_FIELDS and saved.get(section, {}).get(key) != value]
    if changed:
        raise CxrlabError(f"{run_dir} holds a run of a different recipe ({'; '.join(changed[:4])}"
                          f"{'; ...' if len(changed) > 4 else ''}); choose another --out, or remove that folder "
                          "to rerun it")


def _check_same_data(recipes: dict) -> None:
    keys = {(r.data.source, r.data.image_size, str(r.data.views)) for r in recipes.values()}
    if len(keys) > 1:
        raise CxrlabError(f"compare needs every recipe on the same data; got {sorted(keys)} "
                          "(pass --data and --set data.image_size=...)")


def _same_labels(a: Recipe, b: Recipe) -> bool:
    fields = ("labels", "policy", "policy_per_label", "spml_no_finding", "add_no_finding", "seed")
    return all(getattr(a.data, f) == getattr(b.data, f) for f in fields)


def _summary_markdown(name: str, summary: dict, repeats: int, folds: int) -> str:
    lines = [f"# {name}: {repeats}×{folds} cross-validation", ""]
    if summary.get("protocol"):
        lines += [protocol_line(summary["protocol"]) + " (counts per run)", ""]
    lines += ["| metric | mean ± std |", "|---|---|"]
    keys = ("macro_auc", "micro_auc", "map", "macro_f1", "micro_f1", "macro_f1_at_0.5")
    for key in (*keys, *(f"study/{k}" for k in keys)):  # study/: one prediction per study, where reported
        if key in summary:
            lines.append(f"| {key} | {summary[key]['mean']:.4f} ± {summary[key]['std']:.4f} |")
    return "\n".join(lines) + "\n"
