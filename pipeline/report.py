"""Reports of a solved store: table (text, Markdown, JSON), accuracy vs depth, confusion matrix, paper numbers.

A row (from cntk_gram.pipeline.solve.solve_store) is a JSON-able dict: kernel, depth, n_train, n_test and, per
setting ('paper' = lambda 0, 'validated' = lambda chosen on held-out training images), lambda, accuracy
in [0, 1] (or error) and confusion (rows = true class); or a top-level 'error' for an incomplete kernel.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cntk_gram.pipeline.paper import SOURCE, PaperColumn, Protocol, matching_columns

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
HEADER = ("kernel", "depth", "acc λ=0 (%)", "λ*", "val acc (%)", "acc λ* (%)", "paper (%)")

Columns = dict[str, PaperColumn]   # kernel key -> the paper column that applies to it (pipeline.paper)


def paper_value(columns: Columns | None, kernel: str, depth: int) -> float | None:
    column = (columns or {}).get(kernel)
    return None if column is None else column.accuracy.get(depth)


def header(rows: list[dict], columns: Columns | None) -> tuple[str, ...]:
    """HEADER, with the paper column named after the paper's column when exactly one applies to the rows."""
    kernels = {row["kernel"] for row in rows}
    labels = sorted({column.label for kernel, column in (columns or {}).items() if kernel in kernels})
    return HEADER if len(labels) != 1 else (*HEADER[:-1], f"paper {labels[0]} (%)")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def table_cells(rows: list[dict], columns: Columns | None = None) -> list[tuple[str, ...]]:
    """One tuple of strings per row, in HEADER order; the paper cell is n/a where no column applies."""
    cells = []
    for row in rows:
        value = paper_value(columns, row["kernel"], row["depth"])
        paper = "n/a" if value is None else f"{value:.2f}"
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


def format_table(rows: list[dict], columns: Columns | None = None) -> str:
    """Fixed-width text table for the terminal."""
    lines = [header(rows, columns), *table_cells(rows, columns)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def markdown_table(rows: list[dict], columns: Columns | None = None) -> str:
    lines = [header(rows, columns), tuple("---" for _ in HEADER), *table_cells(rows, columns)]
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


def plot_accuracy_vs_depth(rows: list[dict], path: Path, *, title: str, columns: Columns | None = None) -> Path:
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for i, key in enumerate(sorted({r["kernel"] for r in rows})):
        color = f"C{i}"
        mine = sorted((r for r in rows if r["kernel"] == key and "error" not in r), key=lambda r: r["depth"])
        for setting, style, label in (("paper", "-o", "λ=0"), ("validated", "--s", "λ validated")):
            pts = [(r["depth"], 100 * r[setting]["accuracy"]) for r in mine
                   if r.get(setting, {}).get("accuracy") is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{key} {label}")
        column = (columns or {}).get(key)
        if column is not None:
            ax.plot(*zip(*sorted(column.accuracy.items())), "x", color=color, markersize=10,
                    label=f"{key} paper ({column.label})")
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
    return path


def plot_confusion(counts: np.ndarray, path: Path, *, title: str) -> Path:
    """counts: (C, C) int, rows = true class."""
    counts = np.asarray(counts)
    n = counts.shape[0]
    names = CIFAR10_CLASSES[:n] if n <= 10 else [str(i) for i in range(n)]
    fig = Figure(figsize=(6, 5.4))
    ax = fig.add_subplot()
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
    return path


def columns_for(rows: list[dict], protocol: Protocol | None) -> Columns:
    """The paper columns measured under `protocol`, for the kernels among the rows."""
    kernels = {row["kernel"] for row in rows}
    return {kernel: column for kernel, column in matching_columns(protocol).items() if kernel in kernels}


def paper_summary(protocol: Protocol | None, columns: Columns) -> dict:
    """What the report says about the paper column: the protocol and each matching column's values."""
    return {"source": SOURCE, "protocol": None if protocol is None else protocol.describe(),
            "columns": [{"kernel": kernel, "table": c.table, "column": c.column, "n_train": c.n_train,
                         "n_test": c.n_test, "classes": c.classes, "accuracy_percent": c.accuracy}
                        for kernel, c in sorted(columns.items())]}


def paper_note(protocol: Protocol | None, columns: Columns) -> str:
    """One line under the table naming the paper column(s), or why every paper cell is n/a."""
    if columns:
        used = "; ".join(f"{kernel}: {c.label}" for kernel, c in sorted(columns.items()))
        return (f"Paper column: {SOURCE}, measured under the same protocol ({protocol.describe()}): {used}. "
                f"n/a: the paper has no value for that kernel under this protocol.")
    where = "" if protocol is None else f" ({protocol.describe()})"
    return f"Paper column: n/a everywhere: no published value was measured under this protocol{where}."


def write_report(rows: list[dict], *, out_dir, title: str, protocol: Protocol | None = None,
                 extra: dict | None = None) -> dict[str, Path]:
    """Write results.json, results.md, accuracy_vs_depth.png, confusion_best.png into out_dir.

    protocol: how the store's images were chosen; the paper's values are printed only for the columns
    measured under exactly this protocol (None: no paper column)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = columns_for(rows, protocol)
    best, chosen_by = best_row(rows)
    paths = {"json": out / "results.json", "markdown": out / "results.md",
             "accuracy_plot": plot_accuracy_vs_depth(rows, out / "accuracy_vs_depth.png", title=title,
                                                     columns=columns)}
    summary = {"title": title, "rows": rows, "paper_reference": paper_summary(protocol, columns), **(extra or {})}
    lines = [f"# {title}", "", markdown_table(rows, columns), "", paper_note(protocol, columns), ""]
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
