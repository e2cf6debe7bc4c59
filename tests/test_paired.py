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
