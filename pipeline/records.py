"""Plain files beside a store's Zarr arrays: tile completion records, the cancel flag, stray temp files.

    tiles/done/{I}-{J}/zarr.json   completion record of tile (I, J): a Zarr group whose attributes hold it
    tiles/cancel/zarr.json         cancel flag: a Zarr group whose attributes say who asked and when
    tiles/predicted/zarr.json      the latest run's predicted time (pipeline.predict), read by `cntk status`

Both are published atomically (temp file + os.replace), so a reader never sees half a file and a killed
writer leaves at most a stray temp file, which holds nothing that is ever read.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

RECORDS = "tiles/done"
CANCEL_FLAG = "tiles/cancel/zarr.json"
PREDICTION = "tiles/predicted/zarr.json"
# zarr's chunk temp files (zarr >= 3.1.3 writes each chunk to '{name}.{uuid}.partial', then renames it: pyproject.toml);
# our temp group files
STRAY_PATTERNS = ("*.partial", ".zarr.json.*")


def _publish(target: Path, attributes: dict) -> None:
    """Write a Zarr v3 group document holding `attributes` to `target` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".zarr.json.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}))
    os.replace(tmp, target)


# --- completion records ---------------------------------------------------------------------------

def record_path(store_path: str | os.PathLike, tile: tuple[int, int]) -> Path:
    return Path(store_path) / RECORDS / f"{tile[0]}-{tile[1]}" / "zarr.json"


def write_record(store_path: str | os.PathLike, tile: tuple[int, int], record: dict) -> None:
    """Atomically publish a tile's completion record."""
    _publish(record_path(store_path, tile), record)


def read_record(store_path: str | os.PathLike, tile: tuple[int, int]) -> dict | None:
    """The tile's record, or None when it is missing or unreadable."""
    try:
        return json.loads(record_path(store_path, tile).read_text())["attributes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_complete(record: dict | None, tile: tuple[int, int], arrays: list[str]) -> bool:
    """True when `record` is tile's and holds a checksum for every array of the store."""
    return (record is not None and tuple(record.get("tile", ())) == tile
            and set(record.get("checksums", {})) == set(arrays))


# --- the cancel flag ------------------------------------------------------------------------------

def cancel_requested(store_path: str | os.PathLike) -> bool:
    return (Path(store_path) / CANCEL_FLAG).exists()


def request_cancel(store_path: str | os.PathLike) -> None:
    _publish(Path(store_path) / CANCEL_FLAG,
             {"requested": time.time(), "host": socket.gethostname(), "pid": os.getpid()})


def clear_cancel(store_path: str | os.PathLike) -> None:
    flag = Path(store_path) / CANCEL_FLAG
    flag.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        flag.parent.rmdir()


# --- the predicted time of the latest run -----------------------------------------------------------

def write_prediction(store_path: str | os.PathLike, prediction: dict) -> None:
    """Publish {'seconds' (None: unknown), 'pairs', 'made' (epoch s), ...} for `cntk status`."""
    _publish(Path(store_path) / PREDICTION, prediction)


def read_prediction(store_path: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(store_path) / PREDICTION).read_text())["attributes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- files left behind by killed writers -----------------------------------------------------------

def stray_files(store_path: str | os.PathLike, *, older_than_s: float = 0) -> list[Path]:
    """Temp files that a killed writer left in the store, oldest first; younger ones may still be in use.

    They never hold data that is read (chunks and records are published by rename), so removing a stray
    file loses nothing; its tile has no record, or an intact one from another writer.
    """
    root = Path(store_path)
    now = time.time()
    found = {path for pattern in STRAY_PATTERNS for path in root.rglob(pattern) if path.is_file()}
    old = [path for path in found if now - _mtime(path) >= older_than_s]
    return sorted(old, key=_mtime)


def remove_stray_files(store_path: str | os.PathLike, *, older_than_s: float = 60) -> int:
    """Delete stray temp files older than `older_than_s` (a live writer's are seconds old); return the count."""
    removed = 0
    for path in stray_files(store_path, older_than_s=older_than_s):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()
