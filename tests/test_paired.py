"""Paired significance of a comparison from the runs' test_predictions.csv files (no training here)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlab.errors import CxrlabError
from cxrlab.evaluation.paired import paired_significance, pooled_pairs, significance_markdown
from cxrlab.metrics.significance import delong_test

NAMES = ["a", "b"]


def _labels(n=240, seed=0):
    rng = np.random.default_rng(seed)
    paths = [f"/img/{i}.png" for i in range(n)]
    y = (rng.random((n, 2)) < [0.3, 0.4]).astype(float)
    mask = np.ones_like(y)
    mask[::7, 1] = 0  # some unknown entries
    return (pd.DataFrame(y, index=paths, columns=NAMES), pd.DataFrame(mask, index=paths, columns=NAMES), rng)


def _write_run(run_dir, paths, probs, shuffle_seed=None):
    df = pd.DataFrame(probs, columns=NAMES)
    df.insert(0, "path", paths)
    if shuffle_seed is not None:
        df = df.sample(frac=1.0, random_state=shuffle_seed)
    (run_dir / "report").mkdir(parents=True)
    df.to_csv(run_dir / "report" / "test_predictions.csv", index=False)
    return run_dir


def _cv_runs(tmp_path, name, targets, score, rng, folds=3, repeats=2):
    """Out-of-fold predictions of R×K runs: each repeat tests every image once."""
    paths = targets.index.to_numpy()
    runs = []
    for r in range(repeats):
        fold = np.random.default_rng(r).integers(0, folds, len(paths))
        for k in range(folds):
            rows = fold == k
            probs = score(targets.to_numpy()[rows], rng)
            runs.append(_write_run(tmp_path / name / f"r{r}f{k}", paths[rows], probs, shuffle_seed=k))
    return runs


def good(y, rng):
    return np.clip(0.45 * y + 0.55 * rng.random(y.shape), 0, 1)


def noise(y, rng):
    return rng.random(y.shape)


def test_pairs_are_aligned_by_path_and_pooled(tmp_path):
    targets, mask, rng = _labels()
    ref = _cv_runs(tmp_path, "ref", targets, noise, rng)
    new = _cv_runs(tmp_path, "new", targets, good, rng)
    a, b, t, m, clusters = pooled_pairs(new, ref, targets, mask)
    assert len(a) == 2 * len(targets)  # two repeats, each image once per repeat
    assert sorted(np.unique(clusters, return_counts=True)[1].tolist()) == [2] * len(targets)
    # rows line up: the targets belong to the clustered path, and both predictors score that image
    for i in (0, 17, 300):
        assert t[i].tolist() == targets.loc[clusters[i]].tolist()
        assert m[i].tolist() == mask.loc[clusters[i]].tolist()
    frame = pd.read_csv(new[0] / "report" / "test_predictions.csv").set_index("path")
    row = np.flatnonzero(clusters == frame.index[0])[0]
    assert a[row].tolist() == pytest.approx(frame.iloc[0].tolist())


def test_significance_of_a_better_and_an_identical_recipe(tmp_path):
    targets, mask, rng = _labels()
    ref = _cv_runs(tmp_path, "ref", targets, noise, rng)
    better = _cv_runs(tmp_path, "better", targets, good, rng)
    same = []
    for run in ref:  # the reference's own predictions under another name
        df = pd.read_csv(run / "report" / "test_predictions.csv")
        same.append(_write_run(tmp_path / "same" / run.name, df["path"], df[NAMES].to_numpy(), shuffle_seed=3))
    result = paired_significance({"ref": ref, "better": better, "same": same}, "ref", targets, mask,
                                 resamples=200, seed=0)
    assert result["reference"] == "ref" and list(result["recipes"]) == ["better", "same"]
    b, s = result["recipes"]["better"], result["recipes"]["same"]
    assert b["runs"] == 6 and b["images"] == 240 and b["rows"] == 480
    assert b["macro_auc"]["difference"] > 0.15 and b["macro_auc"]["ci"][0] > 0
    assert b["macro_auc"]["p_delong"] < 1e-4 and b["macro_auc"]["p_bootstrap"] < 0.01
    assert b["map"]["difference"] > 0.1 and b["map"]["p_bootstrap"] < 0.01
    # the same pooled numbers as DeLong on the pooled rows directly
    a_, b_, t, m, clusters = pooled_pairs(better, ref, targets, mask)
    assert b["macro_auc"]["p_delong"] == pytest.approx(delong_test(a_, b_, t, m, clusters=clusters)["macro"]["p"])
    assert s["macro_auc"]["difference"] == 0 and s["macro_auc"]["p_bootstrap"] == 1.0
    assert s["macro_auc"]["p_delong"] == 1.0 and s["map"]["p_bootstrap"] == 1.0
    md = significance_markdown(result)
    assert "| better | 6 | 240 | +0." in md and "| same | 6 | 240 | +0.0000 [+0.0000, +0.0000] | 1 | 1 |" in md


def test_mismatched_runs_are_errors(tmp_path):
    targets, mask, rng = _labels(40)
    paths = targets.index.to_numpy()
    ref = [_write_run(tmp_path / "ref" / "seed0", paths, noise(targets.to_numpy(), rng))]
    fewer = [_write_run(tmp_path / "fewer" / "seed0", paths[:-1], noise(targets.to_numpy()[:-1], rng))]
    with pytest.raises(CxrlabError, match="tested different images .*'/img/39.png'"):
        pooled_pairs(fewer, ref, targets, mask)
    with pytest.raises(CxrlabError, match="1 runs against 2 reference runs"):
        pooled_pairs(fewer, ref * 2, targets, mask)
    renamed = tmp_path / "renamed" / "seed0"
    df = pd.read_csv(ref[0] / "report" / "test_predictions.csv").rename(columns={"b": "bb"})
    df.to_csv(_write_run(renamed, df["path"], df[["a", "bb"]].to_numpy()) / "report" / "test_predictions.csv",
              index=False)
    with pytest.raises(CxrlabError, match="test_predictions.csv.*'b'.*'bb'"):
        pooled_pairs([renamed], ref, targets, mask)
    with pytest.raises(CxrlabError, match="reference recipe"):
        paired_significance({"ref": ref}, "reff", targets, mask)


def test_a_recipe_on_other_test_images_is_reported_unpaired_not_fatal(tmp_path):
    """compare must not fail at its very end because one recipe (e.g. a full-label ceiling, split on
    other labels) tested other images: that recipe is listed as not paired, with the reason."""
    targets, mask, rng = _labels(60)
    paths = targets.index.to_numpy()
    ref = [_write_run(tmp_path / "ref" / "seed0", paths, noise(targets.to_numpy(), rng))]
    same = [_write_run(tmp_path / "same" / "seed0", paths, good(targets.to_numpy(), rng))]
    other = [_write_run(tmp_path / "other" / "seed0", paths[:-5], noise(targets.to_numpy()[:-5], rng))]
    result = paired_significance({"ref": ref, "same": same, "other": other}, "ref", targets, mask, resamples=50)
    assert "difference" in result["recipes"]["same"]["macro_auc"]
    assert "tested different images" in result["recipes"]["other"]["skipped"]
    text = significance_markdown(result)
    assert "| same |" in text and "| other |" not in text and "Not paired with `ref`: `other`" in text


# ---- the default test: the mean over folds of the per-fold differences ----------------------------------


def _folds(n=120, k=3, seed=5):
    """k disjoint folds of n images (ids sort in row order), 2 labels, a recipe better than the reference."""
    rng = np.random.default_rng(seed)
    blocks = []
    for f in range(k):
        y = (rng.random((n, 2)) < [0.25, 0.4]).astype(float)
        a = np.clip(0.35 * y + 0.65 * rng.random(y.shape) + 0.1 * f, 0, 1)  # each fold its own score scale
        b = np.clip(0.2 * y + 0.8 * rng.random(y.shape), 0, 1)
        ids = np.array([f"img{f}_{i:04d}" for i in range(n)])
        blocks.append((a, b, y, np.ones_like(y), ids))
    return blocks


def _macro(score, probs, y, full=None):
    """Macro of ``score`` over labels; a label lacking a class takes ``full``'s value (fixed label set)."""
    values = []
    for j in range(y.shape[1]):
        ok = 0 < y[:, j].sum() < len(y)
        values.append(score(y[:, j], probs[:, j]) if ok else full[j])
    return float(np.mean(values)), values


def test_fold_paired_test_equals_a_direct_numpy_computation():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from cxrlab.metrics.significance import fold_paired_test

    blocks = _folds()
    res = fold_paired_test(blocks, NAMES, resamples=60, ci=0.9, seed=7)
    for key, score in (("macro_auc", roc_auc_score), ("map", average_precision_score)):
        full = [(_macro(score, a, y), _macro(score, b, y)) for a, b, y, _, _ in blocks]
        per_fold = [fa[0] - fb[0] for fa, fb in full]
        assert res[key]["per_fold"] == pytest.approx(per_fold)
        assert res[key]["difference"] == pytest.approx(np.mean(per_fold))
        assert res[key]["a"] == pytest.approx(np.mean([fa[0] for fa, _ in full]))
        # the bootstrap by hand: every resample redraws each fold's images within the fold, in fold order
        rng = np.random.default_rng(7)
        diffs = []
        for _ in range(60):
            d = []
            for (a, b, y, _, _), (fa, fb) in zip(blocks, full):
                rows = rng.integers(0, len(y), len(y))
                d.append(_macro(score, a[rows], y[rows], fa[1])[0] - _macro(score, b[rows], y[rows], fb[1])[0])
            diffs.append(np.mean(d))
        diffs = np.array(diffs)
        assert res[key]["ci"] == pytest.approx(list(np.percentile(diffs, [5, 95])), abs=1e-12)
        p = min(1.0, 2 * (1 + min((diffs <= 0).sum(), (diffs >= 0).sum())) / 61)
        assert res[key]["p"] == pytest.approx(p)
    # DeLong: the mean of the per-fold differences, its variance the sum of per-fold variances over K²
    folds = [delong_test(a, b, y, m)["macro"] for a, b, y, m, _ in blocks]
    assert res["delong"]["difference"] == pytest.approx(np.mean([f["difference"] for f in folds]))
    assert res["delong"]["se"] ** 2 == pytest.approx(sum(f["se"] ** 2 for f in folds) / 9)
    assert res["delong"]["p"] < 0.05


def test_seeds_on_one_test_set_are_not_independent_evidence():
    from cxrlab.metrics.significance import fold_paired_test

    a, b, y, m, ids = _folds(k=1)[0]
    one = fold_paired_test([(a, b, y, m, ids)], NAMES, resamples=200, seed=0)
    three = fold_paired_test([(a, b, y, m, ids)] * 3, NAMES, resamples=200, seed=0)
    # three identical seeds: the same number, the same uncertainty (one shared draw), not sqrt(3) narrower
    assert three["macro_auc"]["difference"] == pytest.approx(one["macro_auc"]["difference"])
    assert three["delong"]["se"] == pytest.approx(one["delong"]["se"])
    assert three["macro_auc"]["ci"] == pytest.approx(one["macro_auc"]["ci"])


def test_default_follows_the_fold_mean_where_pooling_disagrees_in_sign(tmp_path):
    """Three folds with prevalences 0.2 / 0.5 / 0.8: in every fold the recipe ranks better (+0.13 to
    +0.17 AUC), but its score scale falls as prevalence rises, so pooled its AUC is far worse."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    paths, ys, runs, refs, per_fold = [], [], [], [], []
    for k, prevalence in enumerate((0.2, 0.5, 0.8)):
        y = (rng.random((300, 1)) < prevalence).astype(float)
        b = np.clip(0.3 * y + 0.7 * rng.random(y.shape), 0, 1)
        a = (0.5 * y + 0.5 * rng.random(y.shape)) * 0.4 + (0.6, 0.3, 0.0)[k]
        p = [f"/img/{k}_{i}.png" for i in range(300)]
        cols = ["a"]
        for name, probs, out in (("new", a, runs), ("ref", b, refs)):
            df = pd.DataFrame(probs, columns=cols)
            df.insert(0, "path", p)
            (tmp_path / name / f"f{k}" / "report").mkdir(parents=True)
            df.to_csv(tmp_path / name / f"f{k}" / "report" / "test_predictions.csv", index=False)
            out.append(tmp_path / name / f"f{k}")
        paths += p
        ys.append(y)
        per_fold.append(roc_auc_score(y[:, 0], a[:, 0]) - roc_auc_score(y[:, 0], b[:, 0]))
    y = np.concatenate(ys)
    targets = pd.DataFrame(y, index=paths, columns=["a"])
    mask = pd.DataFrame(np.ones_like(y), index=paths, columns=["a"])
    run_dirs = {"ref": refs, "new": runs}
    folds = paired_significance(run_dirs, "ref", targets, mask, resamples=200)
    pooled = paired_significance(run_dirs, "ref", targets, mask, resamples=200, paired="pooled")
    f, p = folds["recipes"]["new"]["macro_auc"], pooled["recipes"]["new"]["macro_auc"]
    assert f["difference"] == pytest.approx(np.mean(per_fold)) and f["difference"] > 0.1
    assert p["difference"] < -0.3
    assert f["ci"][0] > 0 and f["p_delong"] < 0.001 and f["p_bootstrap"] < 0.05
    assert p["ci"][1] < 0  # the pooled test is as sure of the opposite sign
    assert folds["paired"] == "folds" and "MEAN over matched runs" in significance_markdown(folds)
    assert "pooled into one set" in significance_markdown(pooled)
    with pytest.raises(CxrlabError, match="pooled"):
        paired_significance(run_dirs, "ref", targets, mask, paired="pool")


def test_a_label_with_one_positive_is_left_out_of_both_tests(tmp_path):
    """Label "a" is ranked identically by both runs; label "b" has ONE positive per fold, which the recipe
    puts on top and the reference at the bottom (ΔAUC = +1 there). Before the shared label rule the
    bootstrap kept that +0.5 macro gain in every resample (CI [+0.5, +0.5], p 0.01, its floor at 200
    resamples) while DeLong, which cannot test one positive, left the label out (Δ 0, p 1): two tests of
    two numbers. Now both test label "a" only."""
    rng = np.random.default_rng(0)
    runs, refs, paths, ys = [], [], [], []
    for k in range(3):
        y = np.zeros((200, 2))
        y[:, 0] = rng.random(200) < 0.3
        y[5, 1] = 1.0
        a_score = np.clip(0.4 * y[:, 0] + 0.6 * rng.random(200), 0, 1)
        new, ref = np.c_[a_score, np.full(200, 0.5)], np.c_[a_score, np.full(200, 0.5)]
        new[5, 1], ref[5, 1] = 0.9, 0.1
        p = [f"/img/{k}_{i}.png" for i in range(200)]
        runs.append(_write_run(tmp_path / "new" / f"r0f{k}", p, new))
        refs.append(_write_run(tmp_path / "ref" / f"r0f{k}", p, ref))
        paths += p
        ys.append(y)
    y = np.concatenate(ys)
    targets = pd.DataFrame(y, index=paths, columns=NAMES)
    mask = pd.DataFrame(np.ones_like(y), index=paths, columns=NAMES)
    res = paired_significance({"ref": refs, "new": runs}, "ref", targets, mask, resamples=200)
    auc = res["recipes"]["new"]["macro_auc"]
    assert auc["difference"] == 0.0 and auc["p_bootstrap"] == 1.0 and auc["p_delong"] == 1.0
    # what a table of per-fold macro AUCs over every label shows: (0 + 1) / 2 = +0.5
    assert auc["difference_all_labels"] == pytest.approx(0.5)
    assert res["recipes"]["new"]["left_out"] == [{"fold": k, "label": "b", "positives": 1, "negatives": 199}
                                                 for k in range(3)]
    md = significance_markdown(res)
    assert "Left out: b in 3 of 3 runs (1+/199−, 1+/199−, 1+/199−)" in md and "`new` +0.5000" in md
    # the pooled test follows the same rule: 3 positives pooled pass it
    pooled = paired_significance({"ref": refs, "new": runs}, "ref", targets, mask, resamples=200, paired="pooled")
    assert pooled["recipes"]["new"]["left_out"] == {}
    assert pooled["recipes"]["new"]["macro_auc"]["difference"] > 0.4
