"""The CPU-scale comparison table of issue [D]: GAP vs LAP(c) vs flip vs ZCA vs all together, from the reports of
the standard and the ZCA store (`cntk paper configs/enhanced/cifar10-80-{standard,zca}.yaml --out ...`).

    python -m benchmarks.enhanced_table benchmarks/results/enhanced-cpu-standard benchmarks/results/enhanced-cpu-zca

Prints a Markdown table: one line per (images, kernel, depth) with the test accuracy at lambda = 0 and at the
validated lambda, each with its binomial standard error sqrt(p (1 - p) / n_test).
"""
import math
import sys
from pathlib import Path

from cntk_gram.pipeline.results import read_results


def cell(setting: dict, n_test: int) -> str:
    acc = setting.get("accuracy")
    if acc is None:
        return "not PD" if "error" in setting else "n/a"
    return f"{100 * acc:.1f} ± {100 * math.sqrt(acc * (1 - acc) / n_test):.1f}"


def lines(result_dir: Path, images: str) -> list[str]:
    rows = read_results(result_dir)["rows"]   # reports written before the rename keep 'paper' for λ = 0
    out = []
    for row in sorted(rows, key=lambda r: (r["depth"], r["kernel"])):
        v = row.get("validated", {})
        lam = f"{v['lambda']:g}" if "lambda" in v else ""
        out.append(f"| {images} | {row['kernel']} | {row['depth']} | {cell(row.get('ridgeless', {}), row['n_test'])} "
                   f"| {lam} | {cell(v, row['n_test'])} |")
    return out


def main(standard: str, zca: str) -> None:
    print("| images | kernel | depth | acc λ=0 (%) | λ* | acc λ* (%) |")
    print("|---|---|---|---|---|---|")
    for line in lines(Path(standard), "standard") + lines(Path(zca), "ZCA ε=0.1"):
        print(line)


if __name__ == "__main__":
    main(*sys.argv[1:3])
