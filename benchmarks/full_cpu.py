"""Scale of the full pipeline on the CPU: Gram, status, verify, inspect and solve at several training-set sizes.

    python -m benchmarks.full_cpu --config configs/paper/fc-full.yaml --sizes 5000,10000,20000 --work DIR

Every step is one `cntk` command under /usr/bin/time -v (wall time and peak RSS of the process tree's largest
member); values come from the commands' --json output. Stores live under --work (outside the repository) and are
deleted afterwards unless --keep. Writes benchmarks/results/full-cpu/scale-{sizes}.json; `--summarise` fits the
growth exponents over every scale-*.json and step-*.json file there (time ~ n^k).
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, cpu_info, write_result

OUT = RESULTS / "full-cpu"


def timed(args: list[str], log: Path) -> dict:
    """Run `cntk ARGS` under /usr/bin/time -v; {'seconds', 'peak_rss_bytes', 'returncode', 'json'}."""
    command = ["/usr/bin/time", "-v", str(Path(sys.executable).parent / "cntk"), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    log.write_text(" ".join(command) + "\n" + done.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    parsed = None
    if "--json" in args and done.returncode == 0:
        parsed = json.loads(done.stdout)
    return {"seconds": seconds, "peak_rss_bytes": rss, "returncode": done.returncode, "json": parsed}


def measure(config: str, n_train: int, n_test: int, work: Path, tile: int) -> dict:
    store = work / f"n{n_train}.zarr"
    logs = work / f"logs-n{n_train}"
    logs.mkdir(parents=True, exist_ok=True)
    sizes = ["--train", str(n_train), "--test", str(n_test), "--tile-size", str(tile), "--store", str(store)]
    row = {"n_train": n_train, "n_test": n_test, "tile": tile}
    row["gram"] = timed(["run", config, *sizes, "--no-progress", "--json"], logs / "run.log")
    row["store_bytes_on_disk"] = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    row["status"] = timed(["status", str(store), "--json"], logs / "status.log")
    row["verify"] = timed(["verify", str(store)], logs / "verify.log")
    row["inspect"] = timed(["inspect", str(store), "--out", str(logs)], logs / "inspect.log")
    row["solve"] = timed(["solve", str(store), "--out", str(work / f"report-n{n_train}"), "--json"],
                         logs / "solve.log")
    return row


def exponent(sizes, values) -> float | None:
    """k of the least-squares fit log(value) = k log(size) + c, over at least two sizes."""
    pairs = [(s, v) for s, v in zip(sizes, values) if v and v > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def summarise() -> Path:
    """Growth exponents of Gram and solve wall time over every measured size in OUT."""
    rows = []
    for path in sorted(OUT.glob("scale-*.json")) + sorted(OUT.glob("step-*.json")):
        rows += json.loads(path.read_text())["rows"]
    rows.sort(key=lambda r: r["n_train"])
    sizes = [r["n_train"] for r in rows]
    # the Gram's pairs grow as n_train^2 / 2 + n_train n_test: fit against that count, not n_train alone
    pairs = [r["n_train"] ** 2 / 2 + r["n_train"] * r["n_test"] for r in rows]
    gram = [r["gram"]["seconds"] for r in rows]
    solve = [r["solve"]["seconds"] for r in rows]
    summary = {"sizes": sizes, "gram_seconds": gram, "solve_seconds": solve,
               "gram_exponent_vs_n_train": exponent(sizes, gram),
               "gram_exponent_vs_pairs": exponent(pairs, gram),
               "solve_exponent_vs_n_train": exponent(sizes, solve)}
    return write_result("full-cpu/summary", summary)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper/fc-full.yaml")
    parser.add_argument("--sizes", default="5000,10000,20000", help="training-set sizes")
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--tile", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path.home() / "runs" / "scale")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--summarise", action="store_true", help="only fit the exponents over results so far")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        sizes = [int(s) for s in args.sizes.split(",")]
        rows = []
        for n in sizes:
            rows.append(measure(str(Path(args.config).resolve()), n, args.test, args.work, args.tile))
            if not args.keep:
                shutil.rmtree(args.work / f"n{n}.zarr", ignore_errors=True)
            write_result(f"full-cpu/scale-{args.sizes.replace(',', '-')}", {"cpu": cpu_info(), "rows": rows})
    print(f"written {summarise()}")


if __name__ == "__main__":
    main()
