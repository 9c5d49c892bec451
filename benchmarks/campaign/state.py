"""The campaign's state and its records.

A campaign's files live in WORK/campaign-out and are mirrored to --out after every stage. A later call continues
the campaign (its records, measured rates, device and calls) when it ran the same commit in the same mode:
- on a warm machine, from WORK/campaign-out (the stores are there too, so resumable stages resume);
- on a fresh machine, from --prior DIR: an earlier call's returned files (its $OUT, carried back to the device),
  so the measured rates and the earlier stages' records survive the machine even though its stores do not.
Otherwise the campaign starts afresh (a campaign of another commit or mode never mixes in).
"""
from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .rates import RateModel
from .supervisor import Supervisor

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Campaign:
    out: Path                    # every file of the campaign (under --work: kept between calls on a warm machine)
    work: Path                   # stores and solver output
    budget_s: float              # seconds this call may spend on its stages
    rehearse: bool
    data_root: str | None        # folder holding cifar-10-batches-py/ (None: the configs' own data.root)
    mirror: Path | None = None   # --out: gets a copy of `out` after every stage
    prior: Path | None = None    # --prior: an earlier call's returned files
    clock: Callable[[], float] = time.monotonic
    call: int = 1                # calls of this campaign so far, this one included
    calls: list = field(default_factory=list)   # {"call", "budget_s", "elapsed_s", "date_utc", "stages"} each
    records: list = field(default_factory=list)
    device: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)   # measured by `kernels`: {arch: pairs/s at depth 21}
    start: float | None = None
    checkpoint: Callable[[], None] = lambda: None   # writes the records and mirrors them now (set by the campaign)

    def __post_init__(self):
        if self.start is None:
            self.start = self.clock()

    def left(self) -> float:
        return self.budget_s - (self.clock() - self.start)

    def log(self, text: str) -> None:
        self.supervisor().note(text)

    def supervisor(self) -> Supervisor:
        """Runs this campaign's commands from the repository root, output into campaign.log, on its clock."""
        return Supervisor(log=self.out / "campaign.log", cwd=REPO, clock=self.clock)

    def model(self) -> RateModel:
        return RateModel(self.rates, rehearse=self.rehearse)


def git_commit() -> str:
    """HEAD (+dirty), or where the checkout has no git history (the device gets the working tree only) the commit
    written to .whl/COMMIT when the wheels were built (benchmarks/GPU.md), else 'unknown'."""
    try:
        run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
    except OSError:   # no git program
        run, dirty = None, ""
    if run is not None and run.returncode == 0 and run.stdout.strip():
        return run.stdout.strip() + ("+dirty" if dirty else "")
    stamp = REPO / ".whl" / "COMMIT"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def _document(folder: Path | None) -> dict | None:
    try:
        return json.loads((folder / "campaign.json").read_text()) if folder is not None else None
    except (OSError, ValueError):
        return None


def resume_state(c: Campaign, commit: str) -> str:
    """Load the campaign this call continues (module docstring) into c, or start c.out afresh. Returns how:
    'continued' (c.out), 'prior' (c.prior's files copied into c.out) or 'fresh'."""
    def same(doc):
        return bool(doc) and doc.get("git_commit") == commit and doc.get("rehearse") == c.rehearse

    doc, how = _document(c.out), "continued"
    if not same(doc):
        if c.out.exists():
            shutil.rmtree(c.out)
        c.out.mkdir(parents=True)
        doc, how = _document(c.prior), "prior"
        if same(doc):
            for path in c.prior.iterdir():
                if path.is_file() and not path.name.endswith(".tmp"):
                    shutil.copyfile(path, c.out / path.name)
        else:
            (c.out / "campaign.log").write_text("")
            return "fresh"
    c.records, c.rates, c.device = doc["stages"], doc.get("rates", {}), doc.get("device", {})
    c.calls = doc.get("calls", [])
    c.call = max([k["call"] for k in c.calls], default=0) + 1
    return how


def write_records(c: Campaign, commit: str, *, order, markdown: Callable[[dict, Path], str]) -> None:
    """campaign.json and campaign.md (by `markdown`) in c.out, every call so far, stages sorted by `order` (stage
    names); then c.out copied to c.mirror. Each file is replaced atomically."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    this = {"call": c.call, "budget_s": c.budget_s, "elapsed_s": round(c.budget_s - c.left(), 1), "date_utc": now,
            "stages": [r["name"] for r in c.records if r.get("call") == c.call]}
    calls = [k for k in c.calls if k["call"] != c.call] + [this]
    rank = {name: i for i, name in enumerate(order)}
    doc = {"campaign": "gpu", "rehearse": c.rehearse, "device": c.device, "git_commit": commit,
           "budget_s": c.budget_s, "elapsed_s": this["elapsed_s"], "date_utc": now, "calls": calls,
           "rates": c.rates, "stages": sorted(c.records, key=lambda r: rank[r["name"]])}
    for name, text in (("campaign.json", json.dumps(doc, indent=2, default=str) + "\n"),
                       ("campaign.md", markdown(doc, c.out))):
        tmp = c.out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(c.out / name)
    if c.mirror is not None:
        c.mirror.mkdir(parents=True, exist_ok=True)
        for path in c.out.iterdir():
            if path.is_file() and not path.name.endswith(".tmp"):
                shutil.copyfile(path, c.mirror / path.name)
