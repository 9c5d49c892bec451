"""Reports of a solved store: table (text, Markdown, JSON), accuracy vs depth, confusion matrix, paper numbers.

A row is a results.SolveRow (what cntk_gram.pipeline.solve.solve_store returns) or its JSON dict (SolveRow.to_dict;
old dicts with a 'paper' setting are mapped): kernel, depth, n_train, n_test and, per setting ('ridgeless' =
lambda 0, 'validated' = lambda chosen on held-out training images), lambda, accuracy in [0, 1] (or error) and
confusion (rows = true class); or a top-level 'error' for a kernel that could not be solved. Every public
function here takes either form.
Random-features kernels ('rf-...') have one row per draw (with 'draw'); the tables show one line per rf kernel
and depth instead: the median [min, max] accuracy over its draws (rf_summaries), placed after the exact
kernel's line of the same depth. The median is what compares with the paper's "RF" columns.
A learning curve (`curve`: rows of the first n training images, solve.solve_store_with_curve) adds
learning_curve.png, a Markdown section and results.json's curve and power_law.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from cntk_gram.pipeline.curve import power_law_fits
from cntk_gram.pipeline.paper import COLUMNS, DATA_NOTE, SOURCE, PaperColumn, Protocol, matching_columns
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
    note = {"data_note": DATA_NOTE} if columns else {}
    return {"source": SOURCE, "protocol": None if protocol is None else protocol.describe(), **note,
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
                f"n/a: the paper has no value for that kernel under this protocol. {DATA_NOTE}")
    where = "" if protocol is None else f" ({protocol.describe()})"
    return f"Paper column: n/a everywhere: no published value was measured under this protocol{where}."


def write_report(rows: list[dict], *, out_dir, title: str, protocol: Protocol | None = None,
                 extra: dict | None = None, curve: list[dict] | None = None) -> dict[str, Path]:
    """Write results.json, results.md, accuracy_vs_depth.png, confusion_best.png into out_dir; with a learning
    curve also learning_curve.png.

    protocol: how the store's images were chosen; the paper's values are printed only for the columns
    measured under exactly this protocol (None: no paper column). curve: the learning curve's rows (SolveRow or
    dicts, n_train = each size), in results.json's curve with its power law fits (curve.power_law_fits)."""
    rows, curve = row_dicts(rows), row_dicts(curve or [])
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
    if curve:
        fits, points = power_law_fits(curve), curve_paper_points(curve, protocol)
        summary.update(curve=curve, power_law=fits)
        paths["learning_curve"] = plot_learning_curve(curve, out / "learning_curve.png", title=title, fits=fits,
                                                      paper=points)
        lines += curve_markdown(curve, fits, points)
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["markdown"].write_text("\n".join(lines))
    return paths


# ---------------------------------------------------------------- the learning curve

PaperPoint = tuple[PaperColumn, int, float]       # (column, depth, accuracy in percent) at n = column.n_train


def curve_paper_points(curve: list[dict], protocol: Protocol | None) -> list[PaperPoint]:
    """The paper's published values that sit on the curve: a column of the paper (not the other references) for one
    of the curve's exact kernels, measured under the store's protocol with the column's training-set size (the
    first n images), at most the store's own size, at the depths the curve has. Table 1's -2K and full columns on a
    CIFAR-10 store of the first 50,000 training and all 10,000 test images, say."""
    if protocol is None or not curve:
        return []
    lines = {(r["kernel"], r["depth"]) for r in curve if r.get("draw") is None}
    largest = max(r["n_train"] for r in curve)
    points = []
    for column in COLUMNS:
        if column.source != SOURCE or column.n_train > largest:
            continue
        if matching_columns(dataclasses.replace(protocol, n_train=column.n_train)).get(column.kernel) == column:
            points += [(column, depth, value) for depth, value in sorted(column.accuracy.items())
                       if (column.kernel, depth) in lines]
    return points


def _curve_lines(curve: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """(kernel, depth) of the exact kernels -> their curve rows, by size."""
    lines: dict[tuple[str, int], list[dict]] = {}
    for row in sorted(curve, key=lambda r: r["n_train"]):
        if row.get("draw") is None:
            lines.setdefault((row["kernel"], row["depth"]), []).append(row)
    return dict(sorted(lines.items()))


def plot_learning_curve(curve: list[dict], path: Path, *, title: str, fits: list[dict],
                        paper: list[PaperPoint]) -> Path:
    """Test error (%) against training images n, log-log: one line per exact kernel and depth (λ=0 solid,
    validated λ dashed when there), its power law dotted over the range it was fitted on, the paper's points ×."""
    fig = Figure(figsize=(6.8, 4.6))
    ax = fig.add_subplot()
    colors = {key: f"C{i % 10}" for i, key in enumerate(_curve_lines(curve))}
    for key, members in _curve_lines(curve).items():
        for setting, style, name in (("ridgeless", "-o", "λ=0"), ("validated", "--s", "λ validated")):
            pts = [(r["n_train"], 100 * (1 - r[setting]["accuracy"])) for r in members
                   if (r.get(setting) or {}).get("accuracy") is not None and r[setting]["accuracy"] < 1]
            if pts:   # (a test error of 0 has no place on a log axis)
                ax.plot(*zip(*pts), style, color=colors[key], markersize=4, label=f"{key[0]} depth {key[1]} {name}")
    for fit in fits:
        if "beta" in fit and (fit["kernel"], fit["depth"]) in colors:
            n = np.geomspace(fit["n_min"], fit["n_max"], 100)
            ax.plot(n, 100 * (fit["a"] * n ** -fit["beta"] + fit["c"]), ":", linewidth=1,
                    color=colors[(fit["kernel"], fit["depth"])])
    for column, depth, value in paper:
        ax.plot(column.n_train, 100 - value, "x", markersize=9, color=colors[(column.kernel, depth)])
    if paper:
        ax.plot([], [], "xk", label=f"paper: {', '.join(sorted({c.label for c, _, _ in paper}))} (line's colour)")
    if ax.lines:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("training images n (the first n of the store)")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{title}: learning curve (dotted: power law fit)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def format_curve(curve: list[dict]) -> str:
    """The learning curve as a fixed-width text table: kernel, depth (, draw), n, test accuracy λ=0 and λ*."""
    lines = [("kernel", "depth", "n", "acc λ=0 (%)", "acc λ* (%)")]
    for row in row_dicts(curve):
        p, v = row.get("ridgeless") or {}, row.get("validated") or {}
        draw = "" if row.get("draw") is None else f" draw {row['draw']}"
        lines.append((row["kernel"] + draw, str(row["depth"]), f"{row['n_train']:,}",
                      "error" if "error" in row or "error" in p else _pct(p.get("accuracy")),
                      "" if not v else ("error" if "error" in v else _pct(v.get("accuracy")))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def curve_markdown(curve: list[dict], fits: list[dict], paper: list[PaperPoint]) -> list[str]:
    """The report's learning-curve section: one table line per kernel, depth and size, then the power law fits and
    the range they were fitted over."""
    published = {(c.kernel, depth, c.n_train): (value, c.label) for c, depth, value in paper}
    lines = ["## Learning curve", "",
             "Kernel regression on the first n training images, scored on all test images (`learning_curve.png`).",
             "", "| kernel | depth | n | acc λ=0 (%) | error λ=0 (%) | λ* | acc λ* (%) | paper (%) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (kernel, depth), members in _curve_lines(curve).items():
        for row in members:
            p, v = row.get("ridgeless") or {}, row.get("validated") or {}
            acc = "incomplete" if "error" in row else _pct(p.get("accuracy"))
            error = "" if p.get("accuracy") is None else f"{100 * (1 - p['accuracy']):.2f}"
            value = published.get((kernel, depth, row["n_train"]))
            lines.append(f"| {kernel} | {depth} | {row['n_train']:,} | {acc} | {error} | "
                         f"{'' if 'lambda' not in v else format(v['lambda'], 'g')} | "
                         f"{'' if not v else _pct(v.get('accuracy'))} | "
                         f"{'n/a' if value is None else f'{value[0]:.2f} ({value[1]})'} |")
    fitted = [f for f in fits if "beta" in f]
    lines += [""]
    if fitted:
        low, high = min(f["n_min"] for f in fitted), max(f["n_max"] for f in fitted)
        most = max(f["points"] for f in fitted)
        lines += [f"Power law: test error ≈ a·n^(−β) + c, fitted by least squares to the ridgeless test error of "
                  f"each kernel and depth over n = {low:,} to {high:,} ({most} sizes at most per line); it describes "
                  f"that range only, and c is a fitted constant, not a measured floor.", "", "| kernel | depth | β | a | c (%) | RMS residual (points) | fitted over n |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {f['kernel']} | {f['depth']} | {f['beta']:.3f} | {f['a']:.3g} | {100 * f['c']:.2f} | "
                  f"{100 * f['rms_residual']:.2f} | {f['n_min']:,} to {f['n_max']:,} ({f['points']} sizes) |"
                  for f in fitted]
        lines += [""]
    lines += [f"No power law for {f['kernel']} depth {f['depth']}: {f['error']}." for f in fits if "error" in f]
    if paper:
        lines += ["", f"Paper points (×): {', '.join(sorted({c.label for c, _, _ in paper}))}, where the paper's "
                      f"protocol is the curve's at that n. {DATA_NOTE}"]
    return lines + [""]
