"""scikit-learn's 8x8 digits end to end through the package, beside scikit-learn's own SVC on the same split.

    pip install -e .[bench]          # scikit-learn
    python -m benchmarks.digits [--work runs/digits] [--threads 1]

Data: sklearn.datasets.load_digits(): 1,797 grey 8x8 images, values 0..16, scaled to floats in [0, 1] (/ 16).
Split: fixed and stratified, sklearn.model_selection.train_test_split(x, y, train_size=1300, stratify=y,
random_state=0): 1,300 train / 497 test (1,300 so that tiles of 260 divide the training set). The split is written
to WORK/digits.npz (x_train, y_train, x_test, y_test) and run as an `arrays` source (configs/digits.yaml): CNTK-V,
CNTK-GAP and FC, NTK and NNGP, depths 3 and 6, on the CPU, then kernel regression (λ = 0 and λ chosen on held-out
training images). In the same run, on the same split and the same [0, 1] pixels: SVC (RBF) with scikit-learn's
default parameters, and SVC with C and gamma chosen by 5-fold cross-validation on the training images
(GridSearchCV). Writes benchmarks/results/digits/results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, cpu_info

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
OUT = RESULTS / "digits"
TRAIN_SIZE, SEED = 1300, 0
SVC_GRID = {"C": [1, 10, 100], "gamma": ["scale", 0.01, 0.03, 0.1]}


def split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float64) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, train_size=TRAIN_SIZE,
                                                        stratify=digits.target, random_state=SEED)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def svc(x_train, y_train, x_test, y_test) -> list[dict]:
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    flat_train, flat_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    rows = []
    started = time.time()
    default = SVC().fit(flat_train, y_train)
    rows.append({"method": "SVC (RBF), default parameters (C=1, gamma='scale')",
                 "accuracy": float(default.score(flat_test, y_test)), "seconds": time.time() - started})
    started = time.time()
    search = GridSearchCV(SVC(), SVC_GRID, cv=5).fit(flat_train, y_train)
    rows.append({"method": f"SVC (RBF), 5-fold CV over C {SVC_GRID['C']} x gamma {SVC_GRID['gamma']}",
                 "chosen": search.best_params_, "cv_accuracy": float(search.best_score_),
                 "accuracy": float(search.score(flat_test, y_test)), "seconds": time.time() - started})
    return rows


def gap_cost(x_train) -> dict:
    """Pairs/s of one small CNTK-GAP tile (20 x 20 images, depth 6) before the run: what the whole Gram costs."""
    from cntk_gram.workers import kernel_block

    x = ((x_train[:40] - x_train.mean()) / x_train.std()).astype(np.float32)[..., None]
    kernel_block(x[:2], x[2:4], archs=("gap",), max_depth=6)   # compile
    started = time.time()
    kernel_block(x[:20], x[20:40], archs=("gap",), max_depth=6)
    rate = 400 / (time.time() - started)
    n_train, n_test = TRAIN_SIZE, 1797 - TRAIN_SIZE
    pairs = n_train * (n_train + 1) // 2 + n_train * n_test
    return {"gap_pairs_per_second_depth6": rate, "pairs": pairs, "predicted_gap_seconds": pairs / rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/digits", help="Directory for digits.npz and the store.")
    parser.add_argument("--threads", type=int, default=1, help="Numba threads of the local worker.")
    args = parser.parse_args()

    import cntk_gram
    from cntk_gram.pipeline.config import load_config
    from cntk_gram.pipeline.solve import solve_store

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = split()
    npz = work / "digits.npz"
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    cost = gap_cost(x_train)
    print(f"GAP tile: {cost['gap_pairs_per_second_depth6']:,.0f} pairs/s; whole Gram ~{cost['predicted_gap_seconds']:.0f} s")

    started = time.time()
    baselines = svc(x_train, y_train, x_test, y_test)
    svc_seconds = time.time() - started

    config = load_config(CONFIG, {"data.path": str(npz), "store": str(work / "digits.zarr"),
                                  "cluster.threads": args.threads})
    started = time.time()
    summary = cntk_gram.run(config, progress=False)
    gram_seconds = time.time() - started
    started = time.time()
    rows = [row.to_dict() for row in solve_store(config.store)]
    solve_seconds = time.time() - started

    kernels = [{"kernel": r["kernel"], "depth": r["depth"],
                "ridgeless": r.get("ridgeless", {}).get("accuracy"),
                "validated": r.get("validated", {}).get("accuracy"),
                "validated_lambda": r.get("validated", {}).get("lambda")} for r in rows]
    payload = {
        "split": {"source": "sklearn.datasets.load_digits", "pixels": "values / 16 (floats in [0, 1])",
                  "function": f"train_test_split(train_size={TRAIN_SIZE}, stratify=y, random_state={SEED})",
                  "n_train": len(y_train), "n_test": len(y_test),
                  "train_per_class": np.bincount(y_train).tolist(), "test_per_class": np.bincount(y_test).tolist()},
        "config": "configs/digits.yaml", "machine": cpu_info(), "threads": args.threads, "gap_cost": cost,
        "seconds": {"gram": gram_seconds, "solve": solve_seconds, "svc": svc_seconds},
        "run": {"tiles": summary.tiles_computed, "pairs": summary.pairs_computed},
        "kernels": kernels, "baselines": baselines,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    pct = lambda a: "n/a" if a is None else f"{100 * a:.2f}"
    lines = ["# scikit-learn digits (8x8): CNTK / NTK kernel regression vs SVC", "",
             f"Split: `load_digits()`, pixels / 16, `train_test_split(train_size={TRAIN_SIZE}, stratify=y, "
             f"random_state={SEED})`: {len(y_train)} train / {len(y_test)} test, the same for every row. "
             f"Kernels: `configs/digits.yaml` (arrays source, per-channel standardisation with the training "
             f"images), {summary.tiles_computed} tiles, {summary.pairs_computed:,} pairs in {gram_seconds:.0f} s on "
             f"{args.threads} CPU thread(s); solve {solve_seconds:.0f} s.", "",
             "| kernel | depth | test acc. λ=0 (%) | test acc. λ validated (%) |", "|---|---|---|---|"]
    lines += [f"| {k['kernel']} | {k['depth']} | {pct(k['ridgeless'])} | {pct(k['validated'])} |" for k in kernels]
    lines += ["", "| baseline (same split) | test acc. (%) |", "|---|---|"]
    for b in baselines:
        chosen = f" (chosen {b['chosen']}, CV {100 * b['cv_accuracy']:.2f}%)" if "chosen" in b else ""
        lines.append(f"| {b['method']}{chosen} | {pct(b['accuracy'])} |")
    lines += ["", "λ validated: ridge λ·mean(diag K) chosen on held-out training images (never test labels). "
              "SVC grid: 5-fold cross-validation on the training images only.", ""]
    (OUT / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
