"""End to end through the pipeline: CNTK-V, one pass with all depths up to 21, on 2,000 training and 2,000 test
CIFAR-10 images (train x train upper triangle + train x test = 6,001,000 pairs), embedded local cluster, CPU.

    python -m benchmarks.bench_pipeline --cifar-root DIR [--train 2000 --test 2000 --tile 500]

Target: <= 3 minutes wall on a 2-core machine. Writes benchmarks/results/pipeline-cpu.json.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import cpu_info, write_result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar-root", default=os.environ.get("CNTK_CIFAR_ROOT"), required=False)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--tile", type=int, default=500)
    parser.add_argument("--out", default="pipeline-cpu")
    args = parser.parse_args()
    if not args.cifar_root:
        parser.error("--cifar-root (or $CNTK_CIFAR_ROOT) is required")
    with tempfile.TemporaryDirectory() as tmp:
        config = {"data": {"source": "cifar10", "root": args.cifar_root, "train": args.train, "test": args.test},
                  "kernel": {"archs": ["vanilla"], "kinds": ["ntk", "nngp"], "depths": [3, 4, 6, 11, 21]},
                  "tiles": {"size": args.tile}, "backend": "cpu", "store": str(Path(tmp) / "bench.zarr")}
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(config))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cntk_gram.pipeline.cli", "run", str(path), "--no-progress"],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        if proc.returncode != 0:
            sys.exit(f"cntk run failed with exit code {proc.returncode}")
    pairs = args.train * (args.train + 1) // 2 + args.train * args.test
    result = {"cpu": cpu_info(), "backend": "cpu", "precision": "float32", "archs": ["vanilla"],
              "max_depth": 21, "stored_depths": config["kernel"]["depths"], "kinds": ["ntk", "nngp"],
              "train": args.train, "test": args.test, "tile": args.tile, "pairs": pairs,
              "wall_seconds": round(seconds, 2), "pairs_per_second": pairs / seconds,
              "target_seconds": 180, "meets_target": seconds <= 180}
    print(f"{pairs} pairs in {seconds:.1f} s ({pairs / seconds:.0f} pairs/s); wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
