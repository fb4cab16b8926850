"""Seconds per CCD of the per-CCD science steps, at 1k and 4k pixels a side.

One simulated science CCD (the survey's star field, all bands' first visit: r band) goes through
ISR (unit calibs) and calibrateImage, and its calibrated image is warped onto a patch grid
(makeWarp). Figures are best of 3, one process, next to SCIENCE.md's floors where it has one.
Run: make bench (or python bench/steps.py).
"""

from __future__ import annotations

import time

import numpy as np
from astropy.table import Table

from drp_flows.tasks.calibrate import calibrate
from drp_flows.tasks.coadd import njy_scale, warp
from drp_flows.tasks.isr import run_isr
from drp_flows.tasks.simulate import (
    SurveyConfig,
    make_asteroids,
    make_refcat,
    make_stars,
    plan_visits,
    simulate_science_ccd,
)
from drp_flows.tasks.skymap import tangent_wcs


def best_of(fn, repeat: int = 3):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def time_steps(size: int) -> tuple[float, float, float]:
    """(ISR, calibrateImage, warp) seconds for one CCD of `size` pixels a side."""
    cfg = SurveyConfig(ccd_size=size, nights=1, rounds_per_night=1)
    visit = next(v for v in plan_visits(cfg) if v.band == "r")
    stars = make_stars(cfg)
    raw, _ = simulate_science_ccd(cfg, visit, 4, stars, make_asteroids(cfg)[:0])
    unit = np.ones((size, size), np.float32)
    zero = np.zeros((size, size), np.float32)
    t_isr, post = best_of(lambda: run_isr(raw, cfg.camera, 4, zero, zero, unit))
    refcat = Table(make_refcat(cfg, stars))
    t_cal, (image, _) = best_of(lambda: calibrate(post, refcat, "r"))
    out_wcs = tangent_wcs(visit.ra, visit.dec, (size / 2, size / 2), 0.2)
    t_warp, _ = best_of(lambda: warp(image, njy_scale(image.metadata["ZP"]), out_wcs,
                                     (size + 64, size + 64)))
    return t_isr, t_cal, t_warp


def main():
    for size in (1024, 4096):
        t_isr, t_cal, t_warp = time_steps(size)
        print(f"{size} px CCD: ISR {t_isr:.2f} s | calibrateImage {t_cal:.2f} s | "
              f"warp onto a patch {t_warp:.2f} s  (SCIENCE.md floors per 4k CCD: ISR ~0.06 s, "
              f"difference imaging ~1.5 s)")


if __name__ == "__main__":
    main()
