"""How far can a cell-type signal learned on BRCA-M2C's train split go? A small CNN trained for the task.

A reference point for issue 14, not an encoder of the package. The linear probe of benchmarks/real_he.py falls
from macro-F1 0.76 on test slides from the 3 labs of the train split to 0.55 on slides from 9 other labs.
Is that the hand-made channels, or the training data? This script trains a small fully convolutional network
directly for the task on the train split's cells and scores it on the test split, overall and by tissue
source site, as real_he.py does. Everything is fixed in advance, nothing is chosen on the test split:

- **Input**: a 64 x 64 px crop (32 um at ~0.5 um/px) centred on each cell dot, as optical density. Crops
  that reach past the patch are padded with white.
- **H&E augmentation** (Tellez et al. 2019): the concentrations of each stain in HED space (Ruifrok
  vectors) are scaled by ``exp(N(0, sigma))`` and shifted by ``N(0, 0.05)`` on tissue. Random flips and 90
  degree rotations are added.
- **Network**: 6 conv layers of width w, 2w (ReLU; two 2 x 2 average pools; dilations 2 and 4 at the end;
  receptive field about 60 px). The feature is the mean of the central 2 x 2 of the stride-4 map. A linear
  head gives 3 classes.
- **Training**: class-weighted cross-entropy, AdamW (lr 2e-3, weight decay 1e-3, cosine decay), batch
  128, ``--epochs`` epochs, seed ``--seed``.
- **Scores**: the network's own predictions on the test split after every epoch. At the end, the
  benchmark's linear probe on the network's features alone and concatenated with the default
  ``morphology`` channels.

Real data from ``../shared/realdata`` (``GCMOE_REALDATA`` overrides); never copied into the repository.
Run: .venv/bin/python benchmarks/real_he_cnn.py [--epochs 12] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402
from real_he import brca_split, features_of, probe, realdata_dir, tss  # noqa: E402

CROP = 64


def crops(split: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 crops (N, CROP, CROP, 3) centred on the dots, labels 0..2, and each cell's site code."""
    half = CROP // 2
    xs, ys, sites = [], [], []
    for name, rgb, xy, cls in split:
        padded = np.pad(rgb, ((half, half), (half, half), (0, 0)), constant_values=255)
        for (x, y), k in zip(np.floor(xy).astype(int), cls):
            xs.append(padded[y : y + CROP, x : x + CROP])
            ys.append(k - 1)
            sites.append(tss(name))
    return np.stack(xs), np.array(ys), np.array(sites)


def build(width: int):
    import torch.nn as nn

    w = width

    class CellCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
                nn.AvgPool2d(2),
                nn.Conv2d(2 * w, 2 * w, 3, padding=2, dilation=2), nn.ReLU(),
                nn.Conv2d(2 * w, 2 * w, 3, padding=4, dilation=4), nn.ReLU(),
            )  # fmt: skip
            self.head = nn.Linear(2 * w, 3)

        def feature(self, x):
            m = self.body(x)
            c, r = m.shape[2] // 2, m.shape[3] // 2
            return m[:, :, c - 1 : c + 1, r - 1 : r + 1].mean((2, 3))

        def forward(self, x):
            return self.head(self.feature(x))

    return CellCNN()


def main() -> None:
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import f1_score

    from gcmoe.features import create_encoder
    from gcmoe.features.morphology import HED_FROM_RGB, RGB_FROM_HED

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--stain-sigma", type=float, default=0.25, help="sd of the log stain scaling (0: no augmentation)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="real_he_cnn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    root = realdata_dir() / "brca_m2c"
    if not root.is_dir():
        sys.exit(f"BRCA-M2C not found at {root} (set GCMOE_REALDATA)")
    train, test = brca_split(root, "train"), brca_split(root, "test")
    x_tr, y_tr, site_tr = crops(train)
    x_te, y_te, site_te = crops(test)
    seen = np.isin(site_te, np.unique(site_tr))
    hed = torch.tensor(HED_FROM_RGB, dtype=torch.float32)
    rgb_from_hed = torch.tensor(RGB_FROM_HED, dtype=torch.float32)

    def od(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).float().div(255).clamp(min=1 / 255).log().neg().permute(0, 3, 1, 2)

    def augment(o: torch.Tensor) -> torch.Tensor:
        c = torch.einsum("nchw,cd->ndhw", o, hed)
        scale = torch.exp(torch.randn(o.shape[0], 3, 1, 1) * args.stain_sigma)
        shift = torch.randn(o.shape[0], 3, 1, 1) * 0.05 * (args.stain_sigma > 0)
        c = c * scale + shift * (c.sum(1, keepdim=True) > 0.15)
        o = torch.einsum("ndhw,dc->nchw", c, rgb_from_hed).clamp(min=0)
        if rng.random() < 0.5:
            o = o.flip(3)
        return torch.rot90(o, int(rng.integers(4)), (2, 3))

    net = build(args.width)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-3)
    steps = args.epochs * -(-len(y_tr) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    weight = torch.tensor(len(y_tr) / (3 * np.bincount(y_tr, minlength=3)), dtype=torch.float32)

    def run(x: np.ndarray, what: str) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            out = [getattr(net, what)(od(x[i : i + 1024])).numpy() for i in range(0, len(x), 1024)]
        net.train()
        return np.concatenate(out)

    def scores(p: np.ndarray) -> dict:
        return {k: float(f1_score(y_te[m], p[m], average="macro"))
                for k, m in (("all", np.ones_like(seen)), ("seen_sites", seen), ("unseen_sites", ~seen))}

    epochs = []
    t0 = time.perf_counter()
    for ep in range(args.epochs):
        perm, total = rng.permutation(len(y_tr)), 0.0
        for i in range(0, len(perm), 128):
            j = perm[i : i + 128]
            loss = F.cross_entropy(net(augment(od(x_tr[j]))), torch.from_numpy(y_tr[j]), weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(j)
        f1 = scores(run(x_te, "forward").argmax(1))
        epochs.append({"epoch": ep + 1, "loss": total / len(perm), "test_macro_f1": f1,
                       "seconds": round(time.perf_counter() - t0, 1)})
        print(epochs[-1], flush=True)

    # the benchmark's linear probe on the network's features, alone and with the morphology channels
    f_tr, f_te = run(x_tr, "feature"), run(x_te, "feature")
    enc = create_encoder("morphology")
    m_tr = np.concatenate([features_of(enc, rgb, xy, n) for n, rgb, xy, _ in train])
    m_te = np.concatenate([features_of(enc, rgb, xy, n) for n, rgb, xy, _ in test])
    probes = {}
    for key, (a, b) in {"cnn": (f_tr, f_te), "cnn+morphology": (np.hstack([f_tr, m_tr]), np.hstack([f_te, m_te])),
                        "morphology": (m_tr, m_te)}.items():
        clf, _ = probe(a, y_tr, b, y_te)
        probes[key] = scores(clf.predict(b))

    cmd = "python benchmarks/real_he_cnn.py " + " ".join(sys.argv[1:])
    md = ["# A small CNN trained on BRCA-M2C's train split: how far a learned cell-type signal goes", "",
          f"Command: `{cmd}`", "",
          f"Train split: {len(y_tr):,} cells from sites {', '.join(np.unique(site_tr))}; test split: {len(y_te):,} "
          f"cells, {int(seen.sum()):,} from those sites and {int((~seen).sum()):,} from {len(np.unique(site_te[~seen]))} "
          f"others. Width {args.width}, {args.epochs} epochs, H&E augmentation sigma {args.stain_sigma}, seed "
          f"{args.seed}, {args.threads} torch threads. Macro-F1 on the test split (nothing was chosen on it: the "
          "recipe is fixed in the script's docstring).", "",
          "| epoch | loss | all | train-split sites | other sites | seconds |", "|---:|---:|---:|---:|---:|---:|"]
    for e in epochs:
        f = e["test_macro_f1"]
        md.append(f"| {e['epoch']} | {e['loss']:.3f} | {f['all']:.3f} | {f['seen_sites']:.3f} | "
                  f"{f['unseen_sites']:.3f} | {e['seconds']} |")
    md += ["", "The linear probe of benchmarks/real_he.py (standardised features, class-balanced logistic regression) "
           "on the trained network's features:", "", "| features | all | train-split sites | other sites |",
           "|---|---:|---:|---:|"]
    for key, f in probes.items():
        md.append(f"| {key} | {f['all']:.3f} | {f['seen_sites']:.3f} | {f['unseen_sites']:.3f} |")
    write(args.name, {"args": vars(args), "epochs": epochs, "probes": probes,
                      "train_sites": np.unique(site_tr).tolist(), "test_cells": int(len(y_te)),
                      "test_cells_seen_sites": int(seen.sum())}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
