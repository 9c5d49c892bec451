"""Dask worker preload for the full-disk test: the store's disk "fills up" after a given number of Gram chunk writes.

Loaded with DASK_DISTRIBUTED__WORKER__PRELOAD (the embedded cluster of `cntk run`). CNTK_DISK_QUOTA names a file
holding how many more Gram chunk writes fit; each write takes one, under an exclusive lock (every worker process
shares the count); at 0 a write fails with ENOSPC exactly where a full disk fails it: in zarr's local store, before
the chunk file is replaced. No file: no limit, so deleting it "frees space".
"""
import errno
import fcntl
import os

import zarr.storage._local as local


def _within_quota(put):
    def put_within_quota(path, value, exclusive=False):
        quota = os.environ.get("CNTK_DISK_QUOTA")
        if quota and "/gram/" in str(path).replace(os.sep, "/"):
            with open(quota + ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if os.path.exists(quota):
                    with open(quota) as f:
                        left = int(f.read())
                    if left <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                    with open(quota, "w") as f:
                        f.write(str(left - 1))
        return put(path, value, exclusive)
    put_within_quota.limited = True
    return put_within_quota


if not getattr(local._put, "limited", False):   # dask may run a preload twice in one namespace
    local._put = _within_quota(local._put)
