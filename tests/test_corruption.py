"""Each kind of on-disk damage is found by `cntk verify` and repaired by `cntk run` / `cntk submit`, and the
repaired store is bit-identical to the undamaged one."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from cntk_gram.pipeline.store import verify_tile

from cluster_procs import (assert_bit_identical, cntk, cntk_json, done_tiles, finished_store, free_port, gram_arrays,
                           start_scheduler, start_worker, stop, wait_for_workers, wait_until)

TILE = (0, 1)
CHUNK = Path("gram/ntk-vanilla/depth-3/c/0/1")   # chunk of TILE in one of the store's arrays
RECORD = Path("tiles/done/0-1/zarr.json")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, cifar_format_root):
    """A finished store (40 + 20 images, tiles of 20: 5 tiles) and its config."""
    return finished_store(tmp_path_factory.mktemp("pristine"), cifar_format_root)


@pytest.fixture(scope="module")
def scheduler_address(tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster-logs")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start_scheduler(port, logs / "scheduler.log")
    worker = start_worker(address, logs / "worker.log")
    wait_for_workers(address, 1)
    yield address
    stop(worker, scheduler)


def truncate_chunk(store: Path) -> str:
    path = store / CHUNK
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "unreadable"


def flip_bit_in_chunk(store: Path) -> str:
    path = store / CHUNK
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    return "unreadable"


def delete_chunk(store: Path) -> str:
    (store / CHUNK).unlink()
    return "checksum mismatch"


def delete_record(store: Path) -> str:
    (store / RECORD).unlink()
    return "1 not computed yet"


def leave_partial_files(store: Path) -> str:
    """What a writer killed mid-tile leaves: zarr's temp chunk and a temp record, but no record."""
    (store / RECORD).unlink()
    partial = (store / CHUNK).with_name("1.0123456789abcdef0123456789abcdef.partial")
    partial.write_bytes((store / CHUNK).read_bytes()[:100])
    temp_record = (store / RECORD).with_name(".zarr.json.0badc0de")
    temp_record.write_text('{"zarr_format": 3, "node_type": "gro')
    old = time.time() - 3600  # an hour old: no live writer owns them
    for path in (partial, temp_record):
        os.utime(path, (old, old))
    return "stray"


DAMAGE = [truncate_chunk, flip_bit_in_chunk, delete_chunk, delete_record, leave_partial_files]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_verify_finds_the_damage(tmp_path, pristine, damage):
    store = tmp_path / "g.zarr"
    shutil.copytree(pristine[0], store)
    expected = damage(store)
    result = cntk("verify", store)
    assert expected in result.stdout, result.stdout
    assert "Traceback" not in result.stdout
    if damage is not delete_record:  # a missing record is an unfinished tile, not damage
        assert result.returncode != 0 and ("(0, 1)" in result.stdout or "0-1" in result.stdout), result.stdout


@pytest.mark.parametrize("command", ["run", "submit"])
@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_resume_recomputes_only_the_damaged_tile(tmp_path, pristine, scheduler_address, damage, command):
    store = tmp_path / "g.zarr"
    shutil.copytree(pristine[0], store)
    damage(store)
    if command == "run":
        summary = cntk_json("run", pristine[1], "--store", store, "--workers", "1", "--threads", "1", "--no-progress")
        assert summary["tiles_computed"] == 1, summary
    else:
        result = cntk("submit", pristine[1], "--store", store, "--scheduler", scheduler_address)
        assert result.returncode == 0, result.stdout
        assert "submitted 1 of 5 tiles" in result.stdout, result.stdout
        wait_until(lambda: not verify_tile(store, TILE, deep=False), what=f"tile {TILE} repaired by the cluster")
        assert done_tiles(store) == done_tiles(pristine[0])
    assert_bit_identical(gram_arrays(store), gram_arrays(pristine[0]))
    verify = cntk("verify", store)
    assert verify.returncode == 0 and "0 problems" in verify.stdout, verify.stdout
    assert not list(store.rglob("*.partial")) and not list(store.rglob(".zarr.json.*"))
