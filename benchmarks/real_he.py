"""Encoders on real H&E: BRCA-M2C linear probe, its drop after re-staining, virtual-tissue recovery, speed.

Per encoder that needs no weights (default: every registered one):

1. **Linear probe on real H&E** (BRCA-M2C, Abousamra et al. ICCV 2021, BSD-3; 120 TCGA breast patches at
   ~0.5 um/px with typed cell dots: 1 lymphocyte, 2 tumour/epithelial, 3 stromal). Features at the dots
   (``extract_features``, one Sample per patch), standardised, class-balanced multinomial logistic
   regression fitted on ``brca_ds_train.txt``, scored on ``brca_ds_test.txt``: accuracy and macro-F1, also
   split by TCGA tissue source site (the test patches from the train split's sites and from the others).
2. **Re-staining**: the test patches are re-stained towards each real H&E of ``he_patches/`` by Reinhard
   colour transfer (per-channel mean and standard deviation matched in CIE Lab over the tissue pixels,
   skimage.color), features extracted again and scored with the same classifier (trained on the original
   stains). The drop is original minus the mean over targets.
3. **Virtual tissue**: 4 routing types recovered by logistic regression on standardised features, 5
   vertical strips (as benchmarks/image_signal.py).
4. **Speed**: slide megapixels per second of ``extract_features`` on a virtual-tissue slide (in memory),
   ``--threads`` torch threads, median of 3 after a warm-up.

``--random-weights`` builds encoders that need a weights file (``timm:<model>``, e.g. ``--encoders
timm:resnet18``; run in ``.venv-encoders``, ``make test-encoders`` builds it) from a file of the architecture's
own random initialisation (``timm.create_model(pretrained=False)``, seeded with ``--seed``), written to a
temporary folder: an untrained network as a sanity floor, not a foundation model. ``--weights FILE`` builds the
one encoder named in ``--encoders`` that needs weights (``uni``, ``conch``, ``timm:<model>``, ...) from a local
file the user holds, as ``create_encoder(name, weights=FILE)`` does in the package: the measurement of a real
foundation model (``--encoders uni --weights pytorch_model.bin``; timm and open_clip encoders in
``.venv-encoders``).

``--stain-norm reinhard`` runs every extraction above (train, test, re-stained test, virtual, speed) with the
package's per-slide stain normalisation, ``FeatureConfig(stain_norm="reinhard")`` (gcmoe.features.stain):
each patch's Lab tissue statistics moved to the package's fixed target. The re-staining itself (2.) stays
this script's own Reinhard transfer (skimage), the perturbation being measured.

Real data from ``../shared/realdata`` (``GCMOE_REALDATA`` overrides); never copied into the repository.

Run: .venv/bin/python benchmarks/real_he.py [--encoders morphology] [--threads 2] [--speed-size 2048]
     .venv-encoders/bin/python benchmarks/real_he.py --encoders uni --weights /path/to/uni/pytorch_model.bin
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {1: "lymphocyte", 2: "tumour", 3: "stromal"}


def realdata_dir() -> Path:
    return Path(os.environ.get("GCMOE_REALDATA", ROOT.parent / "shared" / "realdata"))


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def brca_split(root: Path, split: str) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, rgb, xy, class) per patch of ``split``; dots outside the image are dropped."""
    out = []
    for line in (root / f"brca_ds_{split}.txt").read_text().split():
        name = Path(line.strip()).stem
        rgb = load_rgb(root / "images" / f"{name}.png")
        lab = np.loadtxt(root / "labels" / f"{name}_gt_class_coords.txt", ndmin=2)
        if len(lab) == 0:
            continue
        xy = lab[:, [1, 0]].astype(float) + 0.5  # pixel index -> our continuous pixel centre
        h, w = rgb.shape[:2]
        keep = (xy[:, 0] < w) & (xy[:, 1] < h) & (xy >= 0).all(1)
        out.append((name, rgb, xy[keep], lab[keep, 2].astype(int)))
    return out


def features_of(encoder, rgb: np.ndarray, xy: np.ndarray, name: str, stain_norm: str = "none",
                device: str = "cpu") -> np.ndarray:
    from gcmoe.config import FeatureConfig
    from gcmoe.data.sample import Sample
    from gcmoe.features import extract_features

    c = encoder.config
    sample = Sample.from_arrays(np.ones((len(xy), 1)), xy, rgb, 0.5, ["g"], name)
    # the smallest tile that holds the whole patch and its margins (features do not depend on the tile size)
    side = -(-(max(rgb.shape[:2]) + 2 * c.margin) // c.align) * c.align
    tile = min(c.tile_size, -(-side // c.stride) * c.stride)
    return extract_features(sample, FeatureConfig(encoder=c.name, tile_size=tile, stain_norm=stain_norm, device=device),
                            encoder=encoder, progress=False)


def lab_stats(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CIE Lab of ``img`` and the mean and standard deviation of its tissue pixels (L < 88: not glass)."""
    from skimage.color import rgb2lab

    lab = rgb2lab(img)
    tissue = lab[..., 0] < 88
    if tissue.sum() < 100:
        tissue = np.ones(lab.shape[:2], bool)
    return lab, lab[tissue].mean(0), lab[tissue].std(0) + 1e-6


def reinhard(rgb: np.ndarray, target: np.ndarray | tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Reinhard colour transfer of ``rgb`` towards ``target`` (an image, or its Lab tissue mean and std)."""
    import warnings

    from skimage.color import lab2rgb

    lab, mu, sd = lab_stats(rgb)
    mu_t, sd_t = lab_stats(target)[1:] if isinstance(target, np.ndarray) else target
    out = (lab - mu) / sd * sd_t + mu_t
    with warnings.catch_warnings():  # out-of-gamut colours are clipped, as intended
        warnings.simplefilter("ignore", UserWarning)
        return np.clip(np.round(lab2rgb(out) * 255), 0, 255).astype(np.uint8)


def tss(name: str) -> str:
    """The TCGA tissue source site of a patch name ('TCGA-A8-A09E-...' -> 'A8'): the lab the slide came from."""
    return name.split("-")[1]


def probe(train_x, train_y, test_x, test_y):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=3000))
    clf.fit(train_x, train_y)

    def score(x, y):
        p = clf.predict(x)
        return {"accuracy": float((p == y).mean()), "macro_f1": float(f1_score(y, p, average="macro"))}

    return clf, score


def by_site(clf, x, y, seen: np.ndarray) -> dict:
    """Accuracy and macro-F1 on the test cells from tissue source sites seen in training and from the others."""
    from sklearn.metrics import f1_score

    p = clf.predict(x)
    out = {}
    for key, m in (("seen_sites", seen), ("unseen_sites", ~seen)):
        out[key] = {"cells": int(m.sum()), "accuracy": float((p[m] == y[m]).mean()),
                    "macro_f1": float(f1_score(y[m], p[m], average="macro"))}
    return out


def virtual_recovery(encoder, seed: int, stain_norm: str = "none", device: str = "cpu") -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from gcmoe._constants import Key
    from gcmoe.config import FeatureConfig, TissueConfig
    from gcmoe.data.splits import vertical_strips
    from gcmoe.data.virtual_tissue import simulate_tissue
    from gcmoe.features import extract_features

    tissue = simulate_tissue(TissueConfig(seed=seed))
    feats = extract_features(tissue.sample, FeatureConfig(encoder=encoder.config.name, stain_norm=stain_norm, device=device),
                             encoder=encoder, progress=False)
    y = tissue.sample.adata.obs[Key.CELL_TYPE].astype(str).to_numpy()
    acc = []
    for test in vertical_strips(tissue.sample.spatial[:, 0], 5):
        train = np.setdiff1d(np.arange(len(y)), test)
        sc = StandardScaler().fit(feats[train])
        clf = LogisticRegression(max_iter=2000).fit(sc.transform(feats[train]), y[train])
        acc.append(float((clf.predict(sc.transform(feats[test])) == y[test]).mean()))
    return {"cells": int(len(y)), "accuracy": float(np.mean(acc))}


def speed(encoder, size: int, seed: int = 0, stain_norm: str = "none", device: str = "cpu") -> dict:
    import torch

    from gcmoe.config import FeatureConfig, TissueConfig
    from gcmoe.data.virtual_tissue import simulate_tissue
    from gcmoe.features import extract_features_with_stats

    n_cells = int(10_000 * (size / 2400) ** 2)
    sample = simulate_tissue(TissueConfig(seed=seed, n_cells=n_cells, height=size, width=size)).sample
    cfg = FeatureConfig(encoder=encoder.config.name, batch_size=4, stain_norm=stain_norm, device=device)
    with torch.inference_mode():
        encoder.to(device)(torch.ones(1, 3, encoder.config.tile_size, encoder.config.tile_size, device=device))
    runs = sorted(extract_features_with_stats(sample, cfg, encoder=encoder, progress=False).stats.seconds for _ in range(3))
    mp = size * size / 1e6
    return {"slide_megapixels": round(mp, 2), "seconds": [round(s, 3) for s in runs],
            "slide_megapixels_per_s": round(mp / runs[1], 2)}


def random_weights_encoder(name: str, seed: int, folder: Path):
    """Encoder ``name`` (``timm:<model>``) loaded from a file of its architecture's seeded random initialisation."""
    import torch
    from safetensors.torch import save_file

    from gcmoe.features import create_encoder

    import timm

    model_name = name.partition(":")[2]
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    path = folder / f"{model_name}-random-seed{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return create_encoder(name, weights=path)


def main() -> None:
    import torch

    from gcmoe.errors import GcmoeError
    from gcmoe.features import create_encoder, list_encoders
    from gcmoe.features.registry import requires_weights

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default=None, help="comma-separated; default: every encoder needing no weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-size", type=int, default=2048, help="virtual slide side for the speed measurement, px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-virtual", action="store_true")
    ap.add_argument("--name", default="real_he", help="results/<name>.{json,md}")
    ap.add_argument("--stain-norm", choices=["none", "reinhard"], default="none",
                    help="reinhard: every extraction with the package's per-slide stain normalisation "
                         "(FeatureConfig(stain_norm='reinhard'))")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--random-weights", action="store_true",
                    help="timm:<model> encoders from their own seeded random initialisation (a sanity floor)")
    ap.add_argument("--weights", type=Path, default=None,
                    help="a local weights file for the one encoder of --encoders that needs weights (e.g. uni)")
    ap.add_argument("--device", default="cpu", help="where the encoder runs (FeatureConfig.device), e.g. cuda")
    ap.add_argument("--idle", action="store_true",
                    help="record that nothing else ran on the machine (otherwise speeds are marked as lower bounds)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.encoders.split(",") if args.encoders else [
        n for n in list_encoders() if not n.endswith(":*") and not requires_weights(n)]
    needs_weights = [n for n in names if requires_weights(n)]
    if args.weights is not None:  # say so before the minutes of data loading, not after
        if args.random_weights or len(needs_weights) != 1:
            sys.exit("--weights goes with exactly one encoder that needs weights in --encoders (e.g. --encoders "
                     f"uni --weights FILE), without --random-weights; got {needs_weights or 'none'}")
        if not args.weights.is_file():
            sys.exit(f"--weights: no such file: {args.weights}")
    elif needs_weights:
        if not args.random_weights:
            sys.exit(f"{', '.join(needs_weights)} need a weights file: --weights FILE (a local file you hold), "
                     "or --random-weights for the sanity floor")
        if any(not n.startswith("timm:") or n == "timm:" for n in needs_weights):
            sys.exit(f"--random-weights builds timm:<model> encoders only, not {', '.join(needs_weights)}")
        try:
            import timm  # noqa: F401
        except ImportError:
            sys.exit("--random-weights needs timm: run this in .venv-encoders (make test-encoders builds it)")
    root = realdata_dir() / "brca_m2c"
    if not root.is_dir():
        sys.exit(f"BRCA-M2C not found at {root} (set GCMOE_REALDATA)")
    # built before the minutes of data loading, so that a missing extra or a wrong weights file stops at once
    encoders, tmp = {}, tempfile.TemporaryDirectory(prefix="gcmoe-real-he-")
    for name in names:
        try:
            if name in needs_weights and args.weights is not None:
                encoders[f"{name} ({args.weights.name})"] = create_encoder(name, weights=args.weights)
            elif name in needs_weights:
                encoders[f"{name} (random init)"] = random_weights_encoder(name, args.seed, Path(tmp.name))
            else:
                encoders[name] = create_encoder(name)
        except GcmoeError as exc:  # a missing extra, a weights file of another model: what to do, not a traceback
            sys.exit(str(exc))
    train, test = brca_split(root, "train"), brca_split(root, "test")
    targets = {p.name: load_rgb(p) for p in sorted((realdata_dir() / "he_patches").glob("*")) if p.suffix in (".png", ".jpg")}
    restained = {t: [reinhard(rgb, tgt) for _, rgb, _, _ in test] for t, tgt in targets.items()}
    y_train = np.concatenate([c for *_, c in train])
    y_test = np.concatenate([c for *_, c in test])
    counts = np.bincount(y_test, minlength=4)[1:]
    train_sites = sorted({tss(n) for n, *_ in train})
    test_sites = [tss(n) for n, *_ in test]
    seen = np.concatenate([np.full(len(c), tss(n) in train_sites) for n, _, _, c in test])
    results = {}
    for key, enc in encoders.items():
        t0 = time.perf_counter()
        sn, dev = args.stain_norm, args.device
        x_train = np.concatenate([features_of(enc, rgb, xy, n, sn, dev) for n, rgb, xy, _ in train])
        x_test = np.concatenate([features_of(enc, rgb, xy, n, sn, dev) for n, rgb, xy, _ in test])
        seconds = time.perf_counter() - t0
        clf, score = probe(x_train, y_train, x_test, y_test)
        r = {"feature_dim": enc.config.feature_dim, "version": enc.config.version,
             "brca_test": score(x_test, y_test), "brca_train": score(x_train, y_train),
             "brca_test_by_site": by_site(clf, x_test, y_test, seen),
             "brca_extract_seconds": round(seconds, 2), "restained": {}}
        for t, imgs in restained.items():
            xs = np.concatenate([features_of(enc, img, xy, n, sn, dev) for img, (n, _, xy, _) in zip(imgs, test)])
            r["restained"][t] = score(xs, y_test)
        for k in ("accuracy", "macro_f1"):
            r[f"restained_mean_{k}"] = float(np.mean([v[k] for v in r["restained"].values()]))
            r[f"restain_drop_{k}"] = r["brca_test"][k] - r[f"restained_mean_{k}"]
        if not args.skip_virtual:
            r["virtual_4type"] = virtual_recovery(enc, args.seed, sn, dev)
        if not args.skip_speed:
            r["speed"] = speed(enc, args.speed_size, stain_norm=sn, device=dev)
        results[key] = r
        print(key, r, flush=True)
    tmp.cleanup()

    cmd = "python benchmarks/real_he.py " + " ".join(sys.argv[1:])
    md = ["# Encoders on real H&E (BRCA-M2C) and the virtual tissue", "",
          f"Command: `{cmd}`", "",
          f"BRCA-M2C: {len(train)} train / {len(test)} test patches, {len(y_train):,} / {len(y_test):,} cells; test "
          f"classes lymphocyte / tumour / stromal = {counts[0]:,} / {counts[1]:,} / {counts[2]:,} (majority rate "
          f"{counts.max() / counts.sum():.3f}). Linear probe: standardised features at the cell dots, class-balanced "
          "logistic regression, train split -> test split. Re-stained: the test patches Reinhard-transferred (Lab "
          f"mean/std) to each of {len(targets)} real H&E targets ({', '.join(targets)}), scored with the classifier "
          "trained on the original stains; drop = original - mean over targets. Stain normalisation before encoding "
          f"(`FeatureConfig.stain_norm`, every extraction below): {args.stain_norm}. Virtual: 4 routing types, default "
          f"virtual tissue (seed {args.seed}), 5 vertical strips. Speed: `extract_features` on a {args.speed_size} px "
          f"virtual slide in memory, {args.threads} torch threads"
          f"{'' if args.device == 'cpu' else ', encoder on ' + args.device}, median of 3 " + (
              "(nothing else ran on the machine)." if args.idle else
              "(the machine was shared with other jobs: speeds are lower bounds)."), "",
          "| encoder | dim | test accuracy | test macro-F1 | re-stained accuracy | re-stained macro-F1 | macro-F1 drop "
          "| virtual 4-type | slide MP/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        v = r.get("virtual_4type", {}).get("accuracy", float("nan"))
        md.append(f"| `{name}` | {r['feature_dim']} | {r['brca_test']['accuracy']:.3f} | {r['brca_test']['macro_f1']:.3f} "
                  f"| {r['restained_mean_accuracy']:.3f} | {r['restained_mean_macro_f1']:.3f} "
                  f"| {r['restain_drop_macro_f1']:.3f} | {v:.3f} | {r.get('speed', {}).get('slide_megapixels_per_s', 'n/a')} |")
    md += ["", "Per re-staining target (accuracy / macro-F1):", "",
           "| encoder | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
    for name, r in results.items():
        md.append(f"| `{name}` | " + " | ".join(
            f"{r['restained'][t]['accuracy']:.3f} / {r['restained'][t]['macro_f1']:.3f}" for t in targets) + " |")
    n_seen = sum(t in train_sites for t in test_sites)
    md += ["", f"By tissue source site (TCGA site code, the lab a slide came from): the train split's patches come from "
           f"{len(train_sites)} sites ({', '.join(train_sites)}); {n_seen} test patches share them, "
           f"{len(test) - n_seen} come from {len(set(test_sites) - set(train_sites))} other sites. Test accuracy / "
           "macro-F1 on each part:", "", "| encoder | seen sites | unseen sites |", "|---|---:|---:|"]
    for name, r in results.items():
        b = r["brca_test_by_site"]
        md.append(f"| `{name}` | " + " | ".join(
            f"{b[k]['accuracy']:.3f} / {b[k]['macro_f1']:.3f} ({b[k]['cells']:,} cells)"
            for k in ("seen_sites", "unseen_sites")) + " |")
    payload = {"data": {"train_patches": len(train), "test_patches": len(test), "train_cells": int(len(y_train)),
                        "test_cells": int(len(y_test)), "test_class_counts": dict(zip(CLASSES.values(), counts.tolist())),
                        "restain_targets": list(targets), "train_sites": train_sites,
                        "test_sites": sorted(set(test_sites))},
               "threads": args.threads, "device": args.device, "stain_norm": args.stain_norm, "shared_machine": not args.idle, "encoders": results}
    write(args.name, payload, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
