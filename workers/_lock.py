"""The lock around every numba parallel region of the CPU kernels (workers/cpu.py's conv pass, workers/fc.py's product
and layer pass). Its own module, standard library only, so that cpu and fc both import it and neither imports the other
for it."""
import threading

# numba's default threading layer cannot run two parallel regions at once: serialise calls from Dask threads. The FC
# kernel also limits the BLAS to one thread while it holds it (a process-wide setting: one holder at a time).
NUMBA_LOCK = threading.Lock()
