"""Reports of a solved store: table (text, Markdown, JSON), accuracy vs depth, confusion matrix, paper numbers.

A row is a results.SolveRow (what cntk_gram.pipeline.solve.solve_store returns) or its JSON dict (SolveRow.to_dict;
old dicts with a 'paper' setting are mapped): kernel, depth, n_train, n_test and, per setting ('ridgeless' =
lambda 0, 'validated' = lambda chosen on held-out training images), lambda, accuracy in [0, 1] (or error) and
confusion (rows = true class); or a top-level 'error' for a kernel that could not be solved. Every public
function here takes either form.
Random-features kernels ('rf-...') have one row per draw (with 'draw'); the tables show one line per rf kernel
and depth instead: the median [min, max] accuracy over its draws (rf_summaries), placed after the exact
kernel's line of the same depth. The median is what compares with the paper's "RF" columns.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cntk_gram.pipeline.paper import SOURCE, PaperColumn, Protocol, matching_columns
from cntk_gram.workers.vocab import KernelKey
from cntk_gram.pipeline.results import row_dicts

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
HEADER = ("kernel", "depth", "acc λ=0 (%)", "λ*", "val acc (%)", "acc λ* (%)", "paper (%)")

Columns = dict[str, PaperColumn]   # kernel key -> the paper column that applies to it (pipeline.paper)


def paper_value(columns: Columns | None, kernel: str, depth: int) -> float | None:
    column = (columns or {}).get(kernel)
    return None if column is None else column.accuracy.get(depth)


def header(rows: list[dict], columns: Columns | None) -> tuple[str, ...]:
    """HEADER, with the paper column named after the paper's column when exactly one applies to the rows."""
    kernels = {row["kernel"] for row in row_dicts(rows)}
    labels = sorted({column.label for kernel, column in (columns or {}).items() if kernel in kernels})
    return HEADER if len(labels) != 1 else (*HEADER[:-1], f"paper {labels[0]} (%)")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def _best_val(row: dict) -> float | None:
    return max((e["accuracy"] for e in row.get("selection", {}).get("val_accuracy", []) if e["accuracy"] is not None),
               default=None)


def rf_summaries(rows: list[dict]) -> list[dict]:
    """One dict per random-features (kernel, depth), over the rows of its draws:
    {kernel, depth, draws (with a λ = 0 accuracy), draws_failed (incomplete or not PD at λ = 0), ridgeless / validated: {median, min, max} of the test accuracy
    (None when no draw has one), val_accuracy: {median, min, max} of the best validation accuracy, lambdas: the
    validated lambdas chosen, sorted}. Sorted by kernel and depth."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in row_dicts(rows):
        if row.get("draw") is not None:
            groups.setdefault((row["kernel"], row["depth"]), []).append(row)
    out = []
    for (kernel, depth), members in sorted(groups.items()):
        def accs(setting):
            return [r[setting]["accuracy"] for r in members if r.get(setting, {}).get("accuracy") is not None]
        solved = len(accs("ridgeless"))
        out.append({"kernel": kernel, "depth": depth, "draws": solved, "draws_failed": len(members) - solved,
                    "ridgeless": _spread(accs("ridgeless")), "validated": _spread(accs("validated")),
                    "val_accuracy": _spread([v for v in map(_best_val, members) if v is not None]),
                    "lambdas": sorted({r["validated"]["lambda"] for r in members if "lambda" in r.get("validated", {})})})
    return out


def _spread_cell(spread: dict | None) -> str:
    if spread is None:
        return "n/a"
    return f"{_pct(spread['median'])} [{_pct(spread['min'])}, {_pct(spread['max'])}]"


def _rf_cells(summary: dict, columns: Columns | None) -> tuple[str, ...]:
    """The table line of one rf kernel and depth: median [min, max] over its draws."""
    value = paper_value(columns, summary["kernel"], summary["depth"])
    failed = f", {summary['draws_failed']} failed" if summary["draws_failed"] else ""
    lambdas = summary["lambdas"]
    lam = "" if not lambdas else (f"{lambdas[0]:g}" if len(lambdas) == 1 else f"{lambdas[0]:g}..{lambdas[-1]:g}")
    return (f"{summary['kernel']} (median of {summary['draws']} draws{failed})", str(summary["depth"]),
            _spread_cell(summary["ridgeless"]), lam,
            "" if summary["val_accuracy"] is None else _pct(summary["val_accuracy"]["median"]),
            "" if summary["validated"] is None else _spread_cell(summary["validated"]),
            "n/a" if value is None else f"{value:.2f}")


def table_cells(rows: list[dict], columns: Columns | None = None) -> list[tuple[str, ...]]:
    """One tuple of strings per exact row, in HEADER order, and one per random-features kernel and depth (the
    median [min, max] over its draws), placed after the exact kernel's row of the same depth ('rf-ntk-gap' after
    'ntk-gap'; at the end without one). The paper cell is n/a where no column applies."""
    cells = []
    rows = row_dicts(rows)
    rf = {(s["kernel"], s["depth"]): s for s in rf_summaries(rows)}
    placed = set()
    for row in rows:
        if row.get("draw") is not None:
            continue
        cells.append(_exact_cells(row, columns))
        twin = (_rf_twin(row["kernel"]), row["depth"])
        if twin in rf:
            cells.append(_rf_cells(rf[twin], columns))
            placed.add(twin)
    cells += [_rf_cells(summary, columns) for key, summary in rf.items() if key not in placed]
    return cells


def _rf_twin(kernel: str) -> str | None:
    """'ntk-gap' -> 'rf-ntk-gap': the random-features kernel that estimates an exact one (None: there is none)."""
    try:
        twin = KernelKey.parse(kernel).rf_twin()
    except ValueError:   # a row of a kernel this version does not know: shown, but has no twin
        return None
    return None if twin is None else str(twin)


def _exact_cells(row: dict, columns: Columns | None) -> tuple[str, ...]:
    value = paper_value(columns, row["kernel"], row["depth"])
    paper = "n/a" if value is None else f"{value:.2f}"
    if "error" in row:
        return (row["kernel"], str(row["depth"]), "incomplete", "", "", "", paper)
    p, v = row.get("ridgeless", {}), row.get("validated", {})
    if "error" in p:
        working = p.get("smallest_working_lambda")
        acc0 = "not PD" + (f" (min λ {working:g})" if working is not None else "")
    else:
        acc0 = _pct(p.get("accuracy"))
    best_val = _best_val(row)
    lam = "" if "lambda" not in v else f"{v['lambda']:g}"
    acc_v = ("not PD" if "error" in v else _pct(v.get("accuracy"))) if v else ""
    return (row["kernel"], str(row["depth"]), acc0, lam, _pct(best_val) if v else "", acc_v, paper)


def format_table(rows: list[dict], columns: Columns | None = None) -> str:
    """Fixed-width text table for the terminal."""
    rows = row_dicts(rows)
    lines = [header(rows, columns), *table_cells(rows, columns)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def markdown_table(rows: list[dict], columns: Columns | None = None) -> str:
    rows = row_dicts(rows)
    lines = [header(rows, columns), tuple("---" for _ in HEADER), *table_cells(rows, columns)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def best_row(rows: list[dict]) -> tuple[dict | None, str]:
    """The best solved kernel and how it was chosen: by validation accuracy (held-out training images)
    when available, otherwise by lambda = 0 test accuracy (stated as such)."""
    def val(row):
        accs = [e["accuracy"] for e in row.get("selection", {}).get("val_accuracy", []) if e["accuracy"] is not None]
        return max(accs) if accs and "confusion" in row.get("validated", {}) else None

    rows = row_dicts(rows)
    rows = [r for r in rows if r.get("draw") is None] or rows  # an exact kernel unless the store has none
    scored = [(val(r), r) for r in rows if val(r) is not None]
    if scored:
        return max(scored, key=lambda s: s[0])[1], "validated"
    scored = [(r["ridgeless"]["accuracy"], r) for r in rows if "confusion" in r.get("ridgeless", {})]
    if scored:
        return max(scored, key=lambda s: s[0])[1], "ridgeless"
    return None, ""


def plot_accuracy_vs_depth(rows: list[dict], path: Path, *, title: str, columns: Columns | None = None) -> Path:
    rows = row_dicts(rows)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    rf = rf_summaries(rows)
    for i, key in enumerate(sorted({r["kernel"] for r in rows})):
        color = f"C{i}"
        spreads = sorted((s for s in rf if s["kernel"] == key and s["ridgeless"] is not None), key=lambda s: s["depth"])
        if spreads:  # random features: median over draws, bars from min to max
            med = np.array([100 * s["ridgeless"]["median"] for s in spreads])
            low = med - [100 * s["ridgeless"]["min"] for s in spreads]
            high = [100 * s["ridgeless"]["max"] for s in spreads] - med
            ax.errorbar([s["depth"] for s in spreads], med, yerr=[low, high], fmt=":^", color=color, capsize=3,
                        label=f"{key} λ=0 (median, min-max over draws)")
        mine = sorted((r for r in rows if r["kernel"] == key and "error" not in r and r.get("draw") is None),
                      key=lambda r: r["depth"])
        for setting, style, label in (("ridgeless", "-o", "λ=0"), ("validated", "--s", "λ validated")):
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


def class_names(n: int, source: str | None = "cifar10") -> list[str]:
    """Tick labels of a confusion plot: CIFAR-10's class names for that source (and for a store of unknown source,
    as before sources existed), else the class numbers (SVHN's are the digits)."""
    if source in ("cifar10", None) and n <= len(CIFAR10_CLASSES):
        return list(CIFAR10_CLASSES[:n])
    return [str(i) for i in range(n)]


def plot_confusion(counts: np.ndarray, path: Path, *, title: str, names: list[str] | None = None) -> Path:
    """counts: (C, C) int, rows = true class. names: tick labels (default class_names(C)); beyond 20 classes the
    cells carry no numbers and every k-th class is labelled (CIFAR-100: 100 x 100 cells)."""
    counts = np.asarray(counts)
    n = counts.shape[0]
    names = class_names(n) if names is None else list(names)
    fig = Figure(figsize=(6, 5.4))
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if counts[i, j] > counts.max() / 2 else "black")
    step = max(1, -(-n // 20))
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def columns_for(rows: list[dict], protocol: Protocol | None) -> Columns:
    """The paper columns measured under `protocol`, for the kernels among the rows."""
    kernels = {row["kernel"] for row in row_dicts(rows)}
    return {kernel: column for kernel, column in matching_columns(protocol).items() if kernel in kernels}


def paper_summary(protocol: Protocol | None, columns: Columns) -> dict:
    """What the report says about the paper column: the protocol and each matching column's values."""
    return {"source": SOURCE, "protocol": None if protocol is None else protocol.describe(),
            "columns": [{"kernel": kernel, "table": c.table, "column": c.column, "source": c.source,
                         "note": c.note or None, "n_train": c.n_train,
                         "n_test": c.n_test, "classes": c.classes, "accuracy_percent": c.accuracy}
                        for kernel, c in sorted(columns.items())]}


def paper_note(protocol: Protocol | None, columns: Columns) -> str:
    """One line under the table naming the paper column(s), or why every paper cell is n/a."""
    if columns:
        used = "; ".join(f"{kernel}: {c.label}" for kernel, c in sorted(columns.items()))
        sources = sorted({c.source for c in columns.values()})
        notes = "".join(f" {c.column}: {c.note}." for _, c in sorted(columns.items()) if c.note)
        return (f"Paper column: {'; '.join(sources)}, on the same images ({protocol.describe()}): {used}.{notes} "
                f"n/a: the paper has no value for that kernel under this protocol.")
    where = "" if protocol is None else f" ({protocol.describe()})"
    return f"Paper column: n/a everywhere: no published value was measured under this protocol{where}."


def write_report(rows: list[dict], *, out_dir, title: str, protocol: Protocol | None = None,
                 extra: dict | None = None) -> dict[str, Path]:
    """Write results.json, results.md, accuracy_vs_depth.png, confusion_best.png into out_dir.

    protocol: how the store's images were chosen; the paper's values are printed only for the columns
    measured under exactly this protocol (None: no paper column)."""
    rows = row_dicts(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = columns_for(rows, protocol)
    best, chosen_by = best_row(rows)
    paths = {"json": out / "results.json", "markdown": out / "results.md",
             "accuracy_plot": plot_accuracy_vs_depth(rows, out / "accuracy_vs_depth.png", title=title,
                                                     columns=columns)}
    summary = {"title": title, "rows": rows, "paper_reference": paper_summary(protocol, columns), **(extra or {})}
    rf = rf_summaries(rows)
    if rf:
        summary["rf_summary"] = rf
    lines = [f"# {title}", "", markdown_table(rows, columns), "", paper_note(protocol, columns), ""]
    if rf:
        lines += ["rf-... rows: random features (the empirical kernel of one random finite-width network per draw): "
                  "median [min, max] of the test accuracy over the draws; the median is what the paper reports. "
                  "Per-draw rows are in results.json.", ""]
    lines += ["λ=0: ridgeless kernel regression (the paper's setting); λ* = λ·mean(diag K) ridge chosen on held-out "
              "training images (test labels never used for the choice).", ""]
    if best is not None:
        setting = best[chosen_by]
        how = "validation accuracy" if chosen_by == "validated" else "test accuracy (no validation run)"
        summary["best"] = {"kernel": best["kernel"], "depth": best["depth"], "setting": chosen_by, "chosen_by": how}
        draw = "" if best.get("draw") is None else f" draw {best['draw']}"
        counts = setting["confusion"]
        paths["confusion_plot"] = plot_confusion(
            counts, out / "confusion_best.png", names=class_names(len(counts), protocol and protocol.source),
            title=f"{best['kernel']}{draw} depth {best['depth']}, λ={setting['lambda']:g}: "
                  f"{100 * setting['accuracy']:.2f}% (chosen by {summary['best']['chosen_by']})")
        lines += [f"Best kernel (by {summary['best']['chosen_by']}): {best['kernel']} depth {best['depth']}.", ""]
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["markdown"].write_text("\n".join(lines))
    return paths
