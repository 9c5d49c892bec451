"""Shared bits of the benchmark scripts: machine description and JSON output."""
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_info() -> dict:
    """CPU model, logical cores, clock (MHz) and float32 SIMD lanes (16 with AVX-512, 8 with AVX2)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda name: next((line.split(":", 1)[1].strip() for line in text.splitlines()
                               if line.startswith(name)), "unknown")
    flags = field("flags").split()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    mhz = float(field("cpu MHz")) if field("cpu MHz") != "unknown" else float("nan")
    return {"model": field("model name"), "logical_cores": os.cpu_count(), "mhz": mhz, "fp32_lanes": lanes,
            "python": platform.python_version()}


def command_line() -> str:
    """This process's command as a user types it: `python -m benchmarks.NAME ARGS` (no machine paths)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["-m", spec.name] if spec is not None else [Path(sys.argv[0]).name]
    return " ".join(["python", *head, *sys.argv[1:]])


def write_result(name: str, payload: dict) -> Path:
    """Write payload (plus date and command) to benchmarks/results/{name}.json and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": command_line(),
               "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True).stdout.strip(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
