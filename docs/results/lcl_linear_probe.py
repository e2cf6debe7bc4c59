"""Is LCL's group-wise classifier the bottleneck? (diagnosis for docs/results/lcl_synthetic.md)

For each fold of a `cxrlab compare ... --cv` run of an LCL recipe, load the selected checkpoint and fit
logistic-regression probes (scikit-learn) on its training part, scored on its test part (macro AUC):

* ``head``: the trained head itself (group-wise linear classifier on the label features);
* ``probe_label_features``: one probe per label on the concatenation of *all* C label features (what a
  full linear classifier could read from them; the group-wise one sees only its own label's);
* ``probe_gap``: one probe per label on the backbone's global-average-pooled feature (what a linear
  head on the same backbone could read).

If ``probe_label_features`` >> ``head``, the group-wise restriction loses information; if
``probe_gap`` >> ``probe_label_features``, the label decomposition does. Run on the linear baseline too
(only ``head`` and ``probe_gap``), to compare the backbones' pooled features. Usage::

    python docs/results/lcl_linear_probe.py runs/lcl_tr/lcl_synthetic_os8 runs/lcl_tr/splits.csv
    python docs/results/lcl_linear_probe.py runs/lcl_tr/lcl_synthetic_os8_bce runs/lcl_tr/splits.csv
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def embed(model, data, rows, batch: int = 128):
    from cxrlab.data.dataset import ImageSet

    dataset = ImageSet(data.images, data.eval_target[rows], data.eval_mask[rows], rows=data.image_rows[rows])
    gap, labels, probs = [], [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch):
            x = dataset.batch(np.arange(start, min(start + batch, len(dataset))))["image"].float() / 255.0
            out = model.head(model.features(x))
            gap.append(out.extras["features"])
            if "label_features" in out.extras:  # label-level heads only (a linear baseline has none)
                labels.append(out.extras["label_features"].flatten(1))
            probs.append(torch.sigmoid(out.logits))
    return (torch.cat(gap).numpy(), torch.cat(labels).numpy() if labels else None, torch.cat(probs).numpy(),
            data.eval_target[rows], data.eval_mask[rows])


def macro_auc(scores, target, mask, columns) -> float:
    from sklearn.metrics import roc_auc_score

    aucs = []
    for j in columns:
        keep = mask[:, j] > 0
        y = target[keep, j]
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc_score(y, scores[keep, j]))
    return float(np.mean(aucs))


def probe(train_x, train_y, test_x, columns, c: float = 0.1) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    a, b = scaler.transform(train_x), scaler.transform(test_x)
    out = np.zeros((len(test_x), train_y.shape[1]))
    for j in columns:
        if 0 < train_y[:, j].sum() < len(train_y):
            out[:, j] = LogisticRegression(C=c, max_iter=300).fit(a, train_y[:, j]).decision_function(b)
    return out


def main(recipe_dir: str, splits: str) -> None:
    from cxrlab.checkpoint import load_model
    from cxrlab.config import from_dict
    from cxrlab.data.prepared import prepare_data, split_rows

    torch.set_num_threads(2)
    manifest = pd.read_csv(splits)
    rows_out = []
    for fold_dir in sorted(p for p in Path(recipe_dir).iterdir() if (p / "best").is_dir()):
        model, info = load_model(fold_dir / "best")
        recipe = from_dict(info["recipe"])
        data = prepare_data(recipe, progress=False)
        r, k = int(fold_dir.name[1]), int(fold_dir.name.split("f")[1])
        parts = split_rows(recipe, data, manifest, (r, k))
        tr, te = embed(model, data, parts["train"]), embed(model, data, parts["test"])
        columns = data.eval_columns
        row = {"fold": fold_dir.name,
               "head": macro_auc(te[2], te[3], te[4], columns),
               "probe_label_features": (macro_auc(probe(tr[1], tr[3], te[1], columns), te[3], te[4], columns)
                                        if tr[1] is not None else float("nan")),
               "probe_gap": macro_auc(probe(tr[0], tr[3], te[0], columns), te[3], te[4], columns)}
        print(row, flush=True)
        rows_out.append(row)
    table = pd.DataFrame(rows_out)
    print(table.describe().loc[["mean", "std"]].round(4).to_string())
    (Path(recipe_dir) / "linear_probe.json").write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
