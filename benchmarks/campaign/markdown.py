"""campaign.md: the document of campaign.json as Markdown (calls, the stage table, the tile-kernel table, and per
table run its depths, times and the solver's results table copied from its results file)."""
from __future__ import annotations

from pathlib import Path


def campaign_markdown(doc: dict, out: Path) -> str:
    """doc: campaign.json's content; out: the folder holding the results files that table runs name."""
    lines = [f"# GPU campaign{' (rehearsal on the CPU)' if doc['rehearse'] else ''}", "",
             f"Device: {doc['device'].get('name', 'unknown')}; commit {doc['git_commit']}.", ""]
    for k in doc["calls"]:
        lines.append(f"- call {k['call']}: stages {', '.join(k['stages'])}; {k['elapsed_s']:.0f} s of a "
                     f"{k['budget_s']:.0f} s budget; {k['date_utc']}")
    lines += ["", "| stage | call | status | seconds | predicted s | note |", "|---|---|---|---|---|---|"]
    for r in doc["stages"]:
        lines.append(f"| {r['name']} | {r.get('call', 1)} | {r['status']} | {r['seconds']:.1f} | "
                     f"{r['predicted_s']:.0f} | {r.get('why') or ''} |")
    kernels = next((r for r in doc["stages"] if r["name"] == "kernels" and r["status"] == "done"), None)
    if kernels and (kernels.get("result") or {}).get("rows"):
        lines += _kernel_table(kernels["result"]["rows"])
    for r in doc["stages"]:
        for name, run in ((r.get("result") or {}).get("runs") or {}).items():
            lines += _table_run(name, run, out)
    return "\n".join(lines) + "\n"


def _kernel_table(rows: list[dict]) -> list[str]:
    lines = ["", "## Tile kernels (bench_gpu.py)", "",
             "| arch | depth | fused pairs/s | baseline pairs/s | ratio | % of issue limit | max rel diff |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['arch']} | {row['depth']} | {row['fused_pairs_per_s']:,.0f} | "
                     f"{row['baseline_pairs_per_s']:,.1f} | {row['ratio']:,.0f} | "
                     f"{100 * row['fused_fraction_of_fp32_limit']:.0f} | "
                     f"{row['baseline_vs_fused_max_rel_diff']:.1e} |")
    return lines


def _table_run(name: str, run: dict, out: Path) -> list[str]:
    if run.get("status") == "skipped":
        return ["", f"## {name}", "", f"Skipped: {run.get('why', '')}."]
    validated = run.get("validated", "-")
    took = f" in {run['validate_s']} s" if "validate_s" in run else ""
    capped = "" if not run.get("capped") else f" (capped by the {run['capped_by']})" if "capped_by" in run else \
        " (capped: a resumed store keeps its depths)"
    lines = ["", f"## {name}", "",
             f"Depths {run.get('depths')}{capped}; "
             f"{run.get('n_train', '?')} train + {run.get('n_test', '?')} test images, {run.get('pairs', 0):,} "
             f"pairs; kernel {run.get('kernel_s', '-')} s, solve (lam = 0) {run.get('solve_s', '-')} s, "
             f"validated lam: {validated}{took}."]
    if run.get("results") and (out / run["results"]).exists():
        lines += ["", (out / run["results"]).read_text().strip()]
    return lines
