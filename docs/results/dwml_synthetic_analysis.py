"""Per run of the dwml_synthetic comparison: Pearson r of the off-diagonal label-label cosines of the
learned prototypes against the text vectors' and against the training co-occurrence (symmetrised), and
r(text, co-occurrence); mean ± std over the 3 seeds.

    python docs/results/dwml_synthetic_analysis.py runs/dwml_synthetic [data.cache_dir=...]
"""
import sys, json
from pathlib import Path
import numpy as np
from cxrlab.config import load_recipe
from cxrlab.data.prepared import prepare_data, split_rows
from cxrlab.labels import label_cooccurrence
from cxrlab.inference.prototypes import prototype_similarities

root = Path(sys.argv[1])
recipe = load_recipe("dwml_synthetic", [*sys.argv[2:]])
data = prepare_data(recipe, progress=False)
rows = split_rows(recipe, data)["train"]
co = label_cooccurrence(data.target[rows], data.mask[rows])
co = np.nan_to_num((co + co.T) / 2)
off = ~np.eye(len(co), dtype=bool)
r = lambda a, b: float(np.corrcoef(a[off], b[off])[0, 1])
out = {}
for name in ("dwml_synthetic_random", "dwml_synthetic", "dwml_synthetic_wordllama", "dwml_synthetic_plus_bce"):
    res = []
    for seed in range(3):
        s = prototype_similarities(root / name / f"seed{seed}")
        res.append((r(s["prototypes"], s["text"]), r(s["prototypes"], co), r(s["text"], co), s["kappa"]))
    a = np.array(res)
    out[name] = {k: f"{a[:, i].mean():.2f} ± {a[:, i].std(ddof=1):.2f}" for i, k in
                 enumerate(["r_learned_text", "r_learned_cooc", "r_text_cooc", "kappa"])}
    print(name, out[name])
