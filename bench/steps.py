"""Seconds per CCD of the per-CCD science steps, at 1k and 4k pixels a side.

One simulated science CCD (the survey's star field, an r-band visit) goes through ISR (the true
dark and flat as master calibs) and calibrateImage, and its calibrated image is warped onto a
patch grid (makeWarp); objects are measured on one patch's coadd of it (writeObjectTable, one
band: detection, centroids, forced photometry; per patch, which holds about one CCD's area).
The same CCD of that tract's r-band visit on the other night is then differenced against template
coadds made of the better-seeing one (buildTemplate + subtractImages + DIA detection and forced
photometry, step 4's quantum without I/O). Figures are best of 3, one process, next to
SCIENCE.md's floors. Run: make bench (or python bench/steps.py).
"""

from __future__ import annotations

import time

import numpy as np
from astropy.io import fits
from astropy.table import Table

from drp_flows.tasks.calibrate import calibrate
from drp_flows.tasks.camera import PIXEL_SCALE
from drp_flows.tasks.coadd import CoaddAccumulator, njy_scale, warp
from drp_flows.tasks.diffim import detect_dia_sources, subtract_images
from drp_flows.tasks.images import Exposure
from drp_flows.tasks.isr import run_isr
from drp_flows.tasks.objects import measure_objects
from drp_flows.tasks.skymap import tangent_wcs
from drp_flows.tasks.step3 import patch_wcs
from drp_flows.tasks.step4 import build_template
from drp_flows.validation.simulate import (
    SurveyConfig,
    hot_pixels,
    make_asteroids,
    make_refcat,
    make_stars,
    plan_visits,
    response,
    simulate_science_ccd,
)


def best_of(fn, repeat: int = 3):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def time_steps(size: int) -> tuple[float, float, float, float, float, int]:
    """(ISR, calibrateImage, warp, objects on a patch, difference imaging) seconds for one CCD
    of `size` pixels a side, and the number of DIA sources found."""
    cfg = SurveyConfig(ccd_size=size, nights=2, rounds_per_night=1)
    first = next(v for v in plan_visits(cfg) if v.band == "r")
    second = next(v for v in plan_visits(cfg) if v.band == "r" and v.tract == first.tract
                  and v.night == 1)
    if second.seeing < first.seeing:       # the template is the better-seeing visit, as in step 3
        first, second = second, first
    stars, asteroids = make_stars(cfg), make_asteroids(cfg)
    refcat = Table(make_refcat(cfg, stars))
    # the true dark and flat as master calibs: uncorrected hot pixels and flat structure
    # would fill the difference images with false sources
    bias = np.zeros((size, size), np.float32)
    dark = hot_pixels(cfg.camera, 4).astype(np.float32)
    flat = response(cfg.camera, 4).astype(np.float32)

    def calibrated(visit, repeat=1):
        raw, _ = simulate_science_ccd(cfg, visit, 4, stars, asteroids)
        t_isr, post = best_of(lambda: run_isr(raw, cfg.camera, 4, bias, dark, flat), repeat)
        t_cal, (image, _) = best_of(lambda: calibrate(post, refcat, "r"), repeat)
        return t_isr, t_cal, image

    t_isr, t_cal, image = calibrated(first, repeat=3)
    out_wcs = tangent_wcs(first.ra, first.dec, (size / 2, size / 2), 0.2)
    t_warp, _ = best_of(lambda: warp(image, njy_scale(image.metadata["ZP"]), out_wcs,
                                     (size + 64, size + 64)))

    sky = cfg.skymap
    templates = []
    for patch in range(sky.patches_per_side ** 2):
        wcs, shape = patch_wcs(sky, first.tract, patch)
        w = warp(image, njy_scale(image.metadata["ZP"]), wcs, shape)
        if w is not None:
            coadd = CoaddAccumulator(shape)
            coadd.add(w, {"psf_fwhm": float(image.metadata["PSF_FWHM"]) / PIXEL_SCALE})
            templates.append(coadd.coadd(wcs, fits.Header({"TRACT": first.tract, "PATCH": patch})))
    biggest = max(templates, key=lambda c: int(np.isfinite(c.variance).sum()))
    t_objects, _ = best_of(lambda: measure_objects({"r": biggest}, first.tract, 0))
    sci = calibrated(second)[2]
    scale = njy_scale(sci.metadata["ZP"])
    science = Exposure(sci.image * scale, sci.variance * scale ** 2, sci.mask, sci.wcs, sci.metadata)
    fwhm = float(sci.metadata["PSF_FWHM"]) / PIXEL_SCALE

    def difference():
        template = build_template(templates, sky, sci.wcs, sci.image.shape)
        return detect_dia_sources(subtract_images(science, template, fwhm))
    t_diff, sources = best_of(difference)
    return t_isr, t_cal, t_warp, t_objects, t_diff, len(sources)


def main():
    for size in (1024, 4096):
        t_isr, t_cal, t_warp, t_objects, t_diff, n_dia = time_steps(size)
        print(f"{size} px CCD: ISR {t_isr:.2f} s | calibrateImage {t_cal:.2f} s | "
              f"warp onto a patch {t_warp:.2f} s | objects on a patch (one band) {t_objects:.2f} s | "
              f"difference imaging {t_diff:.2f} s "
              f"({n_dia} DIA sources)  (SCIENCE.md floors per 4k CCD: ISR ~0.06 s, "
              f"difference imaging ~1.5 s)")


if __name__ == "__main__":
    main()
