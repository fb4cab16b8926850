"""ISR seconds per 4k CCD against a numpy copy of the same bytes (the memory-bandwidth floor).

A 4096x4096 raw (16 amplifiers with overscan, int32) made by the simulator's readout chain;
ISR = overscan, gain, assembly, bias, dark, flat and the variance and mask planes.
Run: make bench (or python bench/isr.py).
"""

from __future__ import annotations

import time

import numpy as np

from drp_flows.tasks.camera import Camera
from drp_flows.tasks.isr import run_isr
from drp_flows.validation.simulate import read_out


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    cam = Camera(ccd_size=4096)
    rng = np.random.default_rng(1)
    electrons = rng.poisson(900.0, (4096, 4096)).astype(float)
    raw = read_out(cam, 4, electrons, rng)
    raw[0].header["EXPTIME"] = raw[0].header["DARKTIME"] = 30.0
    bias = np.zeros((4096, 4096), np.float32)
    dark = np.full((4096, 4096), 0.02, np.float32)
    flat = np.ones((4096, 4096), np.float32)
    amps = [h.data for h in raw[1:]]
    nbytes = sum(a.nbytes for a in amps)

    t_isr = best_of(lambda: run_isr(raw, cam, 4, bias, dark, flat))
    t_copy = best_of(lambda: [a.copy() for a in amps])
    print(f"4k CCD raw: {nbytes / 2**20:.0f} MiB in 16 amplifiers")
    print(f"ISR: {t_isr:.3f} s per 4k CCD | numpy copy of the raw bytes: {t_copy:.3f} s | "
          f"ratio {t_isr / t_copy:.1f}x the memory-bandwidth floor (SCIENCE.md floor ~0.06 s)")


if __name__ == "__main__":
    main()
