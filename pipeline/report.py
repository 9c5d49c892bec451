"""Reports of a solved store: table (text, Markdown, JSON), accuracy vs depth, confusion matrix, paper numbers.

A row (from cntk_gram.pipeline.solve.solve_store) is a JSON-able dict: kernel, depth, n_train, n_test and, per
setting ('paper' = lambda 0, 'validated' = lambda chosen on held-out training images), lambda, accuracy
in [0, 1] (or error) and confusion (rows = true class); or a top-level 'error' for an incomplete kernel.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The paper's published test accuracies (%), for comparison only; never produced by this code.
# Source: Arora, Du, Hu, Li, Salakhutdinov, Wang, "On Exact Computation with an Infinitely Wide Neural
# Net", NeurIPS 2019 (arXiv 1904.11955). Only values we could confirm are filled in; None prints "n/a".
PAPER_SOURCE = "Arora et al., NeurIPS 2019 (arXiv 1904.11955)"
PAPER_REFERENCE: dict[str, dict[tuple[str, int], float | None]] = {
    # Table 1, full CIFAR-10 (50,000 train / 10,000 test), CNTK-V and CNTK-GAP.
    "table1": {
        ("ntk-vanilla", 3): None, ("ntk-vanilla", 4): None, ("ntk-vanilla", 6): 66.03,
        ("ntk-vanilla", 11): None, ("ntk-vanilla", 21): None,
        ("ntk-gap", 3): None, ("ntk-gap", 4): None, ("ntk-gap", 6): None,
        ("ntk-gap", 11): None, ("ntk-gap", 21): None,
    },
    # Table 1 columns with 2,000 training images.
    "table1-2000": {(key, d): None for key in ("ntk-vanilla", "ntk-gap") for d in (3, 4, 6, 11, 21)},
    # Table 2, CIFAR-2 (the first two classes), exact-kernel columns.
    "table2-cifar2": {(key, d): None for key in ("ntk-vanilla", "ntk-gap") for d in (3, 4, 6, 11, 21)},
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
HEADER = ("kernel", "depth", "acc λ=0 (%)", "λ*", "val acc (%)", "acc λ* (%)", "paper (%)")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def table_cells(rows: list[dict], reference: dict | None = None) -> list[tuple[str, ...]]:
    """One tuple of strings per row, in HEADER order."""
    cells = []
    for row in rows:
        paper_value = (reference or {}).get((row["kernel"], row["depth"]))
        paper = "n/a" if paper_value is None else f"{paper_value:.2f}"
        if "error" in row:
            cells.append((row["kernel"], str(row["depth"]), "incomplete", "", "", "", paper))
            continue
        p, v, sel = row.get("paper", {}), row.get("validated", {}), row.get("selection", {})
        if "error" in p:
            working = p.get("smallest_working_lambda")
            acc0 = "not PD" + (f" (min λ {working:g})" if working is not None else "")
        else:
            acc0 = _pct(p.get("accuracy"))
        best_val = max((e["accuracy"] for e in sel.get("val_accuracy", []) if e["accuracy"] is not None),
                       default=None)
        lam = "" if "lambda" not in v else f"{v['lambda']:g}"
        acc_v = ("not PD" if "error" in v else _pct(v.get("accuracy"))) if v else ""
        cells.append((row["kernel"], str(row["depth"]), acc0, lam, _pct(best_val) if v else "", acc_v, paper))
    return cells


def format_table(rows: list[dict], reference: dict | None = None) -> str:
    """Fixed-width text table for the terminal."""
    lines = [HEADER, *table_cells(rows, reference)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def markdown_table(rows: list[dict], reference: dict | None = None) -> str:
    lines = [HEADER, tuple("---" for _ in HEADER), *table_cells(rows, reference)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def best_row(rows: list[dict]) -> tuple[dict | None, str]:
    """The best solved kernel and how it was chosen: by validation accuracy (held-out training images)
    when available, otherwise by lambda = 0 test accuracy (stated as such)."""
    def val(row):
        accs = [e["accuracy"] for e in row.get("selection", {}).get("val_accuracy", []) if e["accuracy"] is not None]
        return max(accs) if accs and "confusion" in row.get("validated", {}) else None

    scored = [(val(r), r) for r in rows if val(r) is not None]
    if scored:
        return max(scored, key=lambda s: s[0])[1], "validated"
    scored = [(r["paper"]["accuracy"], r) for r in rows if "confusion" in r.get("paper", {})]
    if scored:
        return max(scored, key=lambda s: s[0])[1], "paper"
    return None, ""


def plot_accuracy_vs_depth(rows: list[dict], path: Path, *, title: str, reference: dict | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, key in enumerate(sorted({r["kernel"] for r in rows})):
        color = f"C{i}"
        mine = sorted((r for r in rows if r["kernel"] == key and "error" not in r), key=lambda r: r["depth"])
        for setting, style, label in (("paper", "-o", "λ=0"), ("validated", "--s", "λ validated")):
            pts = [(r["depth"], 100 * r[setting]["accuracy"]) for r in mine
                   if r.get(setting, {}).get("accuracy") is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{key} {label}")
        ref = [(d, v) for (k, d), v in (reference or {}).items() if k == key and v is not None]
        if ref:
            ax.plot(*zip(*sorted(ref)), "x", color=color, markersize=10, label=f"{key} paper")
    depths = sorted({r["depth"] for r in rows})
    if depths:
        ax.set_xticks(depths)
    ax.set_xlabel("depth")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_confusion(counts: np.ndarray, path: Path, *, title: str) -> Path:
    """counts: (C, C) int, rows = true class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(counts)
    n = counts.shape[0]
    names = CIFAR10_CLASSES[:n] if n <= 10 else [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(6, 5.4))
    ax.imshow(counts, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(rows: list[dict], *, out_dir, title: str, reference_name: str | None = None,
                 extra: dict | None = None) -> dict[str, Path]:
    """Write results.json, results.md, accuracy_vs_depth.png, confusion_best.png into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference = PAPER_REFERENCE.get(reference_name) if reference_name else None
    best, chosen_by = best_row(rows)
    paths = {"json": out / "results.json", "markdown": out / "results.md",
             "accuracy_plot": plot_accuracy_vs_depth(rows, out / "accuracy_vs_depth.png", title=title,
                                                     reference=reference)}
    summary = {"title": title, "rows": rows, **(extra or {})}
    if reference is not None:
        summary["paper_reference"] = {"table": reference_name, "source": PAPER_SOURCE,
                                      "values_percent": [{"kernel": k, "depth": d, "accuracy": v}
                                                         for (k, d), v in reference.items()]}
    lines = [f"# {title}", "", markdown_table(rows, reference), ""]
    if reference is not None:
        lines += [f"Paper column: {PAPER_SOURCE}, {reference_name}; n/a = not recorded here.", ""]
    lines += ["λ=0 is the paper's setting; λ* = λ·mean(diag K) ridge chosen on a validation split of the "
              "training images (test labels never used for the choice).", ""]
    if best is not None:
        setting = best[chosen_by]
        how = "validation accuracy" if chosen_by == "validated" else "test accuracy (no validation run)"
        summary["best"] = {"kernel": best["kernel"], "depth": best["depth"], "setting": chosen_by, "chosen_by": how}
        paths["confusion_plot"] = plot_confusion(
            setting["confusion"], out / "confusion_best.png",
            title=f"{best['kernel']} depth {best['depth']}, λ={setting['lambda']:g}: "
                  f"{100 * setting['accuracy']:.2f}% (chosen by {summary['best']['chosen_by']})")
        lines += [f"Best kernel (by {summary['best']['chosen_by']}): {best['kernel']} depth {best['depth']}.", ""]
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["markdown"].write_text("\n".join(lines))
    return paths
