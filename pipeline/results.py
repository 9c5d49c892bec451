"""The results of a solve as data, and where they are kept: one SolveRow per kernel, depth (and random-features
draw); its JSON form (a row of results.json, the attributes of the store's solve/ group); the arrays behind it in
the store; and the reader that maps files written before the λ = 0 setting was renamed.

A row as JSON (SolveRow.to_dict; a key whose value does not apply is absent):
  kernel, depth, n_train, n_test; draw (random-features kernels only); error (the kernel could not be solved:
  tiles not computed, or no λ of the grid factors on the fit images);
  ridgeless (λ = 0) and validated (λ chosen on held-out training images): {lambda, accuracy (in [0, 1]),
  confusion (rows = true class)} or, not positive definite, {lambda, error, smallest_working_lambda};
  selection: {lambda, val_accuracy: [{lambda, accuracy or null}], scheme ('full' | 'subset'), n_fit, n_val,
  seed, val_fraction ('full' only), at_top_of_grid (written, not read: the chosen λ > 0 is the grid's largest)};
  options: the result options it was solved with (ridge.SolveOptions.record); solved_at (epoch seconds) and
  solve_seconds; reused: true when this call took the row from the store instead of solving it.

In the store: solve/{key}/depth-{D}[/draw-{R}] is a group whose attributes are the row (written last, so a group
without them is unfinished) and whose arrays are {setting}/alpha (n_train, C) float64, {setting}/scores
(n_test, C) float64 and {setting}/predictions (n_test,) int64 for setting in ridgeless, validated. A learning-curve
point of the first n training images (pipeline.curve) is a row with n_train = n, kept the same way in that group's
subgroup train-{n} (curve_path), which saving the row again leaves in place.

Before, the λ = 0 setting was keyed 'paper' (rows, rf_summary, best.setting), easy to confuse with the published
paper's numbers: SolveRow.from_dict, upgrade_row and read_results map the old key.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

SETTINGS = ("ridgeless", "validated")
CURVE_PREFIX = "train-"                     # solve/.../train-{n}: the learning-curve point of the first n images
LEGACY_SETTING = {"paper": "ridgeless"}     # old key -> new key


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


@dataclass
class FitSummary:
    """One setting of a row: lam and accuracy / confusion, or error and smallest_working_lambda."""
    lam: float
    accuracy: float | None = None
    confusion: list[list[int]] | None = None
    error: str | None = None
    smallest_working_lambda: float | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        out = {"lambda": d.pop("lam"), **_drop_none(d)}
        if self.error is not None:
            out["smallest_working_lambda"] = self.smallest_working_lambda   # null: no λ of the grid works
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "FitSummary":
        return cls(lam=d["lambda"], accuracy=d.get("accuracy"), confusion=d.get("confusion"), error=d.get("error"),
                   smallest_working_lambda=d.get("smallest_working_lambda"))


@dataclass
class SelectionSummary:
    """How λ was chosen: val_accuracy [{lambda, accuracy}] over the grid, scheme, images fitted / held out."""
    lam: float
    val_accuracy: list[dict]
    scheme: str
    n_fit: int
    n_val: int
    seed: int
    val_fraction: float | None = None

    @property
    def at_top_of_grid(self) -> bool:
        """The chosen λ > 0 is the grid's largest: a grid reaching higher may validate better."""
        return self.lam > 0 and self.lam >= max((e["lambda"] for e in self.val_accuracy), default=0.0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {"lambda": d.pop("lam"), **_drop_none(d), "at_top_of_grid": self.at_top_of_grid}

    @classmethod
    def from_dict(cls, d: dict) -> "SelectionSummary":
        return cls(lam=d["lambda"], val_accuracy=list(d.get("val_accuracy", [])), scheme=d.get("scheme", "full"),
                   n_fit=d["n_fit"], n_val=d["n_val"], seed=d.get("seed", 0), val_fraction=d.get("val_fraction"))


@dataclass
class SolveRow:
    """One solved (kernel, depth[, draw]); see the module docstring for every field."""
    kernel: str
    depth: int
    n_train: int
    n_test: int
    draw: int | None = None
    error: str | None = None
    ridgeless: FitSummary | None = None
    validated: FitSummary | None = None
    selection: SelectionSummary | None = None
    options: dict | None = None
    solved_at: float | None = None
    solve_seconds: float | None = None
    reused: bool = False

    @property
    def path(self) -> str:
        return solution_path(self.kernel, self.depth, self.draw)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SolveRow":
        d = upgrade_row(d)
        fits = {s: FitSummary.from_dict(d[s]) if d.get(s) is not None else None for s in SETTINGS}
        selection = SelectionSummary.from_dict(d["selection"]) if d.get("selection") is not None else None
        return cls(kernel=d["kernel"], depth=int(d["depth"]), n_train=int(d["n_train"]), n_test=int(d["n_test"]),
                   draw=d.get("draw"), error=d.get("error"), selection=selection, options=d.get("options"),
                   solved_at=d.get("solved_at"), solve_seconds=d.get("solve_seconds"), reused=bool(d.get("reused")),
                   **fits)


# ---------------------------------------------------------------- JSON, old files included

def upgrade_row(row: dict) -> dict:
    """A row dict with the current keys: an old 'paper' setting becomes 'ridgeless' (a copy; row unchanged)."""
    row = dict(row)
    for old, new in LEGACY_SETTING.items():
        if old in row and new not in row:
            row[new] = row.pop(old)
    return row


def row_dicts(rows: Iterable) -> list[dict]:
    """SolveRow objects or row dicts (old keys mapped) -> row dicts with the current keys."""
    return [row.to_dict() if isinstance(row, SolveRow) else upgrade_row(row) for row in rows]


def upgrade_results(doc: dict) -> dict:
    """A results.json document with the current keys: rows, rf_summary entries and best.setting."""
    doc = dict(doc)
    doc["rows"] = row_dicts(doc.get("rows", []))
    if "rf_summary" in doc:
        doc["rf_summary"] = [upgrade_row(s) for s in doc["rf_summary"]]
    if isinstance(doc.get("best"), dict):
        best = dict(doc["best"])
        best["setting"] = LEGACY_SETTING.get(best.get("setting"), best.get("setting"))
        doc["best"] = best
    return doc


def read_results(path: str | Path) -> dict:
    """A results.json file (a report directory or the file itself), old key names mapped to the current ones."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    return upgrade_results(json.loads(path.read_text()))


# ---------------------------------------------------------------- the store's solve/ groups

def solution_path(key: str, depth: int, draw: int | None = None) -> str:
    """Store group of one solution: solve/{key}/depth-{D}, or .../draw-{R} for a random-features draw."""
    return f"solve/{key}/depth-{depth}" + ("" if draw is None else f"/draw-{draw}")


def curve_path(key: str, depth: int, draw: int | None, n_train: int) -> str:
    """Store group of one learning-curve point (the first n_train training images): solution_path/train-{n}."""
    return f"{solution_path(key, depth, draw)}/train-{n_train}"


def save_row(group, row: SolveRow, arrays: dict[str, dict], path: str | None = None) -> None:
    """Replace the row's solution in the store (zarr group `group` opened r+) at `path` (default row.path): its
    attributes are emptied first (a group without them is an unfinished solve), then its arrays {setting: {name:
    array}} replace all it held, and the row is written as attributes last. Learning-curve points inside it
    (curve_path's train-{n} groups) are kept."""
    import numpy as np

    path = path or row.path
    try:
        target = group.require_group(path)
    except Exception:  # its metadata cut short by a kill: start it afresh (its curve points are solved again)
        target = group.create_group(path, overwrite=True)
    target.attrs.put({})
    for name in [name for name, _ in target.groups() if not name.startswith(CURVE_PREFIX)]:
        del target[name]
    for name in [name for name, _ in target.arrays()]:
        del target[name]
    for setting, named in arrays.items():
        for name, value in named.items():
            group.create_array(f"{path}/{setting}/{name}", data=np.asarray(value), overwrite=True)
    target.attrs.put(row.to_dict())


def saved_row(group, path: str) -> SolveRow | None:
    """The finished row saved at `path` of the store (zarr group `group`), or None (absent, unfinished or
    unreadable)."""
    try:
        attrs = dict(group[path].attrs)
        return SolveRow.from_dict(attrs) if attrs.get("kernel") else None
    except Exception:  # absent, or metadata cut short by a kill: solve it again
        return None
