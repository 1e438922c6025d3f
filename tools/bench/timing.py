"""The one timing helper of the benchmarks: wall clock and CPU time of one call (CPU time is the steadier figure
on a shared machine; ratios are taken between calls interleaved in one process)."""
import statistics
import time


def timed(fn):
    """(fn's result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def median(values):
    return statistics.median(values)
