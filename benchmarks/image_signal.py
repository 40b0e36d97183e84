"""How much the default morphology features see: cell type and within-type state, on the virtual tissue.

Cell type: multinomial logistic regression on the standardised cell features, 5 vertical strips (train on 4,
test on 1), accuracy against the majority-class rate, for the 4 routing types and the 9 finer types. State:
within each routing type, ridge regression from features to each per-cell state variable of the generator
(same strips), Pearson r on test cells. The visible states (activity, differentiation) are drawn into the
image; the neighbourhood states (fraction of immune / tumour cells around) are not drawn but are partly
visible as context.

Run: .venv/bin/python benchmarks/image_signal.py [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402


def main() -> None:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    from gcmoe._constants import Key
    from gcmoe.config import TissueConfig
    from gcmoe.data.splits import vertical_strips
    from gcmoe.data.virtual_tissue import simulate_tissue
    from gcmoe.features import extract_features

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tissue = simulate_tissue(TissueConfig(seed=args.seed))
    ad = tissue.sample.adata
    feats = extract_features(tissue.sample, progress=False)
    strips = vertical_strips(tissue.sample.spatial[:, 0], 5)
    rows = {}
    for label_key in (Key.CELL_TYPE, "cell_subtype"):
        y = ad.obs[label_key].astype(str).to_numpy()
        acc, chance = [], []
        for test in strips:
            train = np.setdiff1d(np.arange(len(y)), test)
            sc = StandardScaler().fit(feats[train])
            clf = LogisticRegression(max_iter=2000).fit(sc.transform(feats[train]), y[train])
            acc.append(float((clf.predict(sc.transform(feats[test])) == y[test]).mean()))
            values, counts = np.unique(y[train], return_counts=True)
            chance.append(float((y[test] == values[counts.argmax()]).mean()))
        rows[label_key] = {"n_classes": int(len(set(y))), "accuracy": float(np.mean(acc)), "majority_rate": float(np.mean(chance))}
    names = list(ad.uns["gcmoe"]["truth"]["state_names"])
    state = np.asarray(ad.obsm[Key.TRUTH_STATE])
    types = ad.obs[Key.CELL_TYPE].astype(str).to_numpy()
    state_r: dict[str, dict[str, float]] = {}
    for t in dict.fromkeys(types):
        state_r[t] = {}
        for j, name in enumerate(names):
            preds, truths = [], []
            for test in strips:
                tr = np.setdiff1d(np.flatnonzero(types == t), test)
                te = test[types[test] == t]
                if len(tr) < 20 or len(te) < 5:
                    continue
                sc = StandardScaler().fit(feats[tr])
                model = Ridge(alpha=1.0).fit(sc.transform(feats[tr]), state[tr, j])
                preds.append(model.predict(sc.transform(feats[te])))
                truths.append(state[te, j])
            p, s = np.concatenate(preds), np.concatenate(truths)
            state_r[t][name] = float(np.corrcoef(p, s)[0, 1]) if p.std() > 0 and s.std() > 0 else float("nan")
    md = ["# What the morphology features see (virtual tissue)", "",
          f"Command: `.venv/bin/python benchmarks/image_signal.py --seed {args.seed}`", "",
          f"Default virtual tissue (seed {args.seed}, {tissue.sample.n_cells:,} cells), morphology encoder "
          f"({feats.shape[1]} features), 5 vertical strips.", "",
          "| labels | classes | accuracy | majority-class rate |", "|---|---:|---:|---:|"]
    md += [f"| {k} | {v['n_classes']} | {v['accuracy']:.3f} | {v['majority_rate']:.3f} |" for k, v in rows.items()]
    md += ["", "Within-type state recovered from the features (ridge, Pearson r on test strips):", "",
           "| routing type | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    md += [f"| {t} | " + " | ".join(f"{v[n]:.2f}" for n in names) + " |" for t, v in state_r.items()]
    md += ["", "Visible in the image by construction: " + ", ".join(ad.uns["gcmoe"]["truth"]["visible_state"]) + "."]
    write("image_signal", {"seed": args.seed, "cell_type": rows, "state_r": state_r}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
