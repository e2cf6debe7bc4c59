"""Repeated K-fold cross-validation and side-by-side comparison of recipes on identical splits."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import Recipe, load_recipe
from ..errors import CxrlabError, unknown
from ..serialization import to_jsonable


def make_manifest(recipe: Recipe, data, repeats: int, folds: int, out_file: Path):
    """The R×K patient-disjoint, multi-label-stratified manifest for ``data`` (written to ``out_file``),
    or the one named by ``data.folds_file`` (from ``cxrlab data split``), checked against the data."""
    from ..data.splits import repeated_kfold, write_manifest

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

    from ..data.splits import read_manifest, write_manifest

    path = Path(path)
    if not path.is_file():
        raise CxrlabError(f"data.folds_file: {path} not found (write one with `cxrlab data split ... --out`)")
    manifest = read_manifest(path)
    owner = pd.Series(data.index["patient_id"].astype(str).to_numpy(), index=data.index["path"].astype(str).to_numpy())
    for repeat, part in manifest.groupby("repeat"):
        listed = pd.Series(part["patient_id"].astype(str).to_numpy(), index=part["path"].astype(str).to_numpy())
        missing = owner.index.difference(listed.index)
        if len(missing):
            raise CxrlabError(f"{path}: repeat {repeat} lacks {len(missing)} images of the data, e.g. {missing[0]!r}"
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
           progress: bool = True) -> dict:
    """One model per fold of R×K CV; writes ``summary.json`` / ``summary.md`` with mean ± std."""
    from .experiment import check_parts, prepare_data
    from ..evaluation.tables import aggregate

    check_parts(recipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else prepare_data(recipe, progress=progress)
    if manifest is None:
        manifest = make_manifest(recipe, data, repeats, folds, out_dir / "splits.csv")
    repeats, folds = manifest_shape(manifest)
    reports = [_run_once(recipe, out_dir / f"r{repeat}f{k}", data=data, manifest=manifest, fold=(repeat, k),
                         progress=progress)
               for repeat in range(repeats) for k in range(folds)]
    summary = aggregate(reports)
    (out_dir / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=2, allow_nan=False))
    (out_dir / "summary.md").write_text(_summary_markdown(recipe.name, summary, repeats, folds))
    summary["report"] = str(out_dir / "summary.md")
    return summary


def compare(recipes: list[str], out_dir: Path, data: str | None = None, cv: tuple[int, int] | None = None,
            seeds: int | None = None, overrides: list[str] = (), progress: bool = True,
            reference: str | None = None, resamples: int = 1000):
    """Run several recipes on identical data and splits; write comparison.md and comparison.json.

    With ``cv = (R, K)`` every recipe uses the same R×K manifest (made once, from the first recipe's
    labels); with ``seeds = N`` every recipe trains N times (train.seed = 0..N-1) on the recipe split.
    With two or more recipes, each is also tested against ``reference`` (default: the first) on the same
    test images (``evaluation.paired``: runs matched fold by fold or seed by seed and pooled, the
    reference's evaluation labels); the result goes to significance.json and a comparison.md section.
    """
    from .experiment import check_parts, prepare_data
    from ..evaluation.tables import aggregate, write_comparison

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = list(overrides) + ([f"data.source={data}"] if data else [])
    loaded = {}
    for name in recipes:
        recipe = load_recipe(name, extra)
        if recipe.name in loaded:
            raise CxrlabError(f"recipe {recipe.name!r} given twice")
        loaded[recipe.name] = recipe
    first = next(iter(loaded.values()))
    reference = _reference_name(reference, recipes, loaded)
    _check_same_data(loaded)
    for recipe in loaded.values():  # every recipe's parts, before hours of training the first ones
        check_parts(recipe)
    shared = prepare_data(first, progress=progress)
    results, run_dirs, datasets = {}, {}, {}
    manifest = None
    if cv or first.data.folds_file:
        manifest = make_manifest(first, shared, *(cv or (1, 2)), out_dir / "splits.csv")
        cv = manifest_shape(manifest)
    for name, recipe in loaded.items():
        data_for_recipe = shared if _same_labels(first, recipe) else prepare_data(recipe, progress=progress)
        datasets[name] = data_for_recipe
        if cv:
            summary = run_cv(recipe, out_dir / name, cv[0], cv[1], data=data_for_recipe, manifest=manifest,
                             progress=progress)
            run_dirs[name] = [out_dir / name / f"r{r}f{k}" for r in range(cv[0]) for k in range(cv[1])]
        else:
            reports = []
            for seed in range(seeds or 1):
                recipe.train.seed = seed
                reports.append(_run_once(recipe, out_dir / name / f"seed{seed}", data=data_for_recipe,
                                         progress=progress))
            summary = aggregate(reports)
            run_dirs[name] = [out_dir / name / f"seed{seed}" for seed in range(seeds or 1)]
        results[name] = summary
    paths = write_comparison(results, out_dir)
    if len(loaded) > 1:
        _write_significance(run_dirs, reference, datasets[reference], out_dir, paths[0], resamples,
                            seed=loaded[reference].data.seed)
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
                        seed: int) -> dict:
    """Paired tests against the reference, scored on the reference's evaluation labels."""
    import pandas as pd

    from ..evaluation.paired import paired_significance, significance_markdown
    from ..serialization import write_json

    cols = data.eval_columns
    paths = data.index["path"].to_numpy()
    names = list(data.eval_labels.names)
    targets = pd.DataFrame(data.eval_target[:, cols], index=paths, columns=names)
    mask = pd.DataFrame(data.eval_mask[:, cols], index=paths, columns=names)
    result = paired_significance(run_dirs, reference, targets, mask, resamples=resamples, seed=seed)
    write_json(out_dir / "significance.json", result)
    md_path.write_text(md_path.read_text() + significance_markdown(result))
    return result


# where and how fast a run reads its data: these may change between an interrupted run and its restart
_NOT_RESULT_FIELDS = {("data", "cache_dir"), ("data", "cache"), ("data", "num_workers")}


def _run_once(recipe: Recipe, run_dir: Path, **kwargs) -> dict:
    """The test metrics of one run. A run already finished in ``run_dir`` is read back, and one that was
    interrupted is resumed from its last checkpoint, so a cross-validation or comparison continues where
    it stopped; either must come from the same recipe, else stale numbers would be reported."""
    from ..checkpoint import latest, read_info
    from .experiment import run

    done = run_dir / "report" / "metrics.json"
    if done.is_file():
        _check_same_recipe(recipe, _read_json(run_dir / "report" / "config.json"), run_dir)
        return _read_json(done)
    previous = latest(run_dir)
    if previous is not None:
        _check_same_recipe(recipe, read_info(previous).get("recipe"), run_dir)
    return run(recipe, run_dir, resume=previous is not None, **kwargs).metrics


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
    lines = [f"# {name}: {repeats}×{folds} cross-validation", "", "| metric | mean ± std |", "|---|---|"]
    for key in ("macro_auc", "micro_auc", "map", "macro_f1", "micro_f1", "macro_f1_at_0.5"):
        if key in summary:
            lines.append(f"| {key} | {summary[key]['mean']:.4f} ± {summary[key]['std']:.4f} |")
    return "\n".join(lines) + "\n"
