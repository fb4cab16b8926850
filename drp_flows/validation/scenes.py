"""Step 1 on single CCDs drawn another way: how the pipeline's calibration holds on a sky it
does not model (validation/galsim_sky.py) against the same CCDs drawn as Moffats.

Each CCD is simulated, put through ISR with its true calibrations (so that only the sky
differs) and calibrated; the results are compared with the truth: the zeropoint, the WCS at a
grid of points, the PSF magnitudes of bright (S/N >= 100) non-variable stars minus their true
total magnitudes, and that residual's gradient corner to corner (a plane fitted over the CCD).
Run `python -m drp_flows.validation.scenes` for the table per band (the note's "before").
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
from astropy.stats import sigma_clip
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from drp_flows.errors import DataError
from drp_flows.tasks.calibrate import APCORR_RADIUS, calibrate
from drp_flows.tasks.isolated_stars import chord, unit_vectors
from drp_flows.tasks.isr import run_isr
from drp_flows.tasks.psf_model import PixelPsf, moments
from drp_flows.validation.galsim_sky import PsfField, true_psf_moments
from drp_flows.validation.simulate import (
    EXPTIME,
    ZEROPOINT,
    SurveyConfig,
    Visit,
    aperture_zeropoints,
    galaxies,
    hot_pixels,
    make_asteroids,
    make_refcat,
    make_stars,
    plan_visits,
    response,
    simulate_science_ccd,
    star_mags,
)

BRIGHT_SNR = 100.0
MATCH_ARCSEC = 0.5


def calibrate_scene(cfg: SurveyConfig, visit: Visit, detector: int, stars: Table,
                    asteroids: Table, galaxy_table: Table | None, refcat: Table) -> dict:
    """One CCD through ISR and calibrate, against its truth (mmag and mas)."""
    raw, truth = simulate_science_ccd(cfg, visit, detector, stars, asteroids, galaxy_table)
    cam, n = cfg.camera, cfg.ccd_size
    post = run_isr(raw, cam, detector, np.zeros((n, n), np.float32),
                   hot_pixels(cam, detector).astype(np.float32),
                   response(cam, detector).astype(np.float32))
    try:
        image, found = calibrate(post, refcat, visit.band)
    except DataError as e:
        return {"band": visit.band, "detector": detector, "error": str(e)}
    # the true zeropoint on the pipeline's scale (fluxes inside its aperture)
    row = Table(rows=[{"visit": visit.visit, "detector": detector, "psf_field": truth.get("psf_field", ""),
                       "zp_true": ZEROPOINT[visit.band] + 2.5 * np.log10(EXPTIME)
                       - visit.extinction - truth["zp_offset"]}])
    aperture_zeropoints(cfg, row, Table({"visit": [visit.visit], "seeing": [visit.seeing]}),
                        APCORR_RADIUS)
    zp_true = float(row["zp_true_aperture"][0])
    plain = ~np.asarray(stars["is_variable"])
    bright = found[(found["snr"] >= BRIGHT_SNR) & ~found["saturated"] & ~found["edge"]
                   & ~found["blended"]]
    tree = cKDTree(unit_vectors(np.asarray(stars["ra"])[plain], np.asarray(stars["dec"])[plain]))
    dist, idx = tree.query(unit_vectors(np.asarray(bright["ra"]), np.asarray(bright["dec"])))
    ok = dist < chord(MATCH_ARCSEC)
    true_mag = star_mags(stars[plain][idx[ok]], visit.band, visit.mjd)
    resid = (np.asarray(bright["mag"])[ok] - true_mag) * 1e3
    x, y = np.asarray(bright["x"])[ok], np.asarray(bright["y"])[ok]
    # the WCS at the bright stars' true positions, as the campaign's QA measures it
    truth_stars = stars[plain][idx[ok]]
    tx, ty = WCS(truth["wcs"]).all_world2pix(np.asarray(truth_stars["ra"]),
                                             np.asarray(truth_stars["dec"]), 0)
    sep = np.linalg.norm(unit_vectors(*image.wcs.all_pix2world(tx, ty, 0))
                         - unit_vectors(np.asarray(truth_stars["ra"]),
                                        np.asarray(truth_stars["dec"])), axis=1)
    wcs_mas = float(np.sqrt(np.mean(sep ** 2))) * 206264.806e3
    gradient = gradient_err = float("nan")
    # a plane through the residuals, clipped (a star blended with a neighbour it was not told
    # apart from is tenths of a magnitude off)
    kept = ~sigma_clip(resid, sigma=3, maxiters=5).mask
    if kept.sum() >= 10:
        a = np.column_stack([np.ones(kept.sum()), x[kept] / (n - 1), y[kept] / (n - 1)])
        coef = np.linalg.lstsq(a, resid[kept], rcond=None)[0]
        # the plane's change across x and y, squared, less what the residuals' own scatter
        # gives it (a 1k CCD's ~140 bright stars fix each to ~3 mmag)
        cov = float(np.var(resid[kept] - a @ coef)) * np.linalg.inv(a.T @ a)
        gradient = float(coef[1] ** 2 + coef[2] ** 2)
        gradient_err = float(cov[1, 1] + cov[2, 2])
    return {"band": visit.band, "detector": detector, "seeing": visit.seeing,
            "zp_mmag": (float(image.metadata["ZP"]) - zp_true) * 1e3,
            "zp_err_mmag": float(image.metadata["ZP_ERR"]) * 1e3, "wcs_mas": wcs_mas,
            "psf_mag_mmag": float(np.median(resid)) if ok.any() else float("nan"),
            "n_bright": int(ok.sum()), "gradient_mmag": gradient,       # squared: see corner_to_corner
            "gradient_err_mmag": gradient_err,
            "apcorr": float(image.metadata["APCORR"]),
            **model_against_truth(cfg, detector, truth, image.psf, found[found["psf_reserved"]]),
            "psf_size_rms": float(image.metadata.get("PSF_DSIZ", np.nan)),
            "psf_e_rms": float(np.hypot(image.metadata.get("PSF_DE1", np.nan),
                                        image.metadata.get("PSF_DE2", np.nan)) / np.sqrt(2))}


def model_against_truth(cfg: SurveyConfig, detector: int, truth: dict, psf: PixelPsf,
                        reserved: Table) -> dict:
    """The PSF model's size and shape against the true PSF's at the reserved stars (the galsim
    sky's truth; free of the stars' noise that data - model residuals carry): rms of the size
    error (fraction) and of the e1, e2 errors."""
    if "psf_field" not in truth or len(reserved) == 0 or not psf.empirical:
        return {"psf_size_truth": np.nan, "psf_e_truth": np.nan}
    x, y = np.asarray(reserved["x"], float), np.asarray(reserved["y"], float)
    true = true_psf_moments(PsfField.from_json(truth["psf_field"]), cfg.camera, detector, x, y)
    model = moments(psf.stamps(x, y, psf.half)[3], psf.fwhm_px / 2.3548)
    size = model[:, 0] / np.asarray(true["sigma"]) - 1
    de = np.concatenate([model[:, 1] - true["e1"], model[:, 2] - true["e2"]])
    return {"psf_size_truth": float(np.sqrt(np.nanmean(size ** 2))),
            "psf_e_truth": float(np.sqrt(np.nanmean(de ** 2)))}


def probe(cfg: SurveyConfig, n_visits: int = 6, detectors=(0, 4, 8)) -> Table:
    """`calibrate_scene` for the first visit in each of the survey's bands (up to n_visits)."""
    stars, asteroids, galaxy_table = make_stars(cfg), make_asteroids(cfg), galaxies(cfg)
    refcat = make_refcat(cfg, stars)
    seen, rows = set(), []
    for visit in plan_visits(cfg):
        if visit.band in seen or len(seen) >= n_visits:
            continue
        seen.add(visit.band)
        rows += [calibrate_scene(cfg, visit, d, stars, asteroids, galaxy_table, refcat)
                 for d in detectors]
    return Table(rows=[r for r in rows if "error" not in r])


def corner_to_corner(rows: Table) -> float:
    """The magnitude residual's change from one corner of a CCD to the opposite one, rms over
    the CCDs with the noise of each CCD's plane fit taken out (mmag)."""
    ok = np.isfinite(rows["gradient_mmag"])
    if not ok.any():
        return float("nan")
    squared = np.mean(rows["gradient_mmag"][ok] - rows["gradient_err_mmag"][ok])
    return float(np.sqrt(2 * max(squared, 0.0)))


def summary(rows: Table) -> list[dict]:
    """Per band: mean and rms zeropoint error, mean reported error, worst WCS, median PSF
    magnitude residual, gradient corner to corner, PSF model residuals at reserved stars."""
    out = []
    for band in sorted(set(rows["band"])):
        r = rows[rows["band"] == band]
        out.append({"band": band, "ccds": len(r),
                    "zp_mean_mmag": float(np.mean(r["zp_mmag"])),
                    "zp_rms_mmag": float(np.sqrt(np.mean(r["zp_mmag"] ** 2))),
                    "zp_reported_mmag": float(np.mean(r["zp_err_mmag"])),
                    "wcs_max_mas": float(np.max(r["wcs_mas"])),
                    "psf_mag_median_mmag": float(np.nanmedian(r["psf_mag_mmag"])),
                    "gradient_mmag": corner_to_corner(r),
                    "apcorr": float(np.nanmean(r["apcorr"])),
                    "psf_size_rms": float(np.sqrt(np.nanmean(r["psf_size_rms"] ** 2))),
                    "psf_e_rms": float(np.sqrt(np.nanmean(r["psf_e_rms"] ** 2))),
                    "psf_size_truth": float(np.sqrt(np.nanmean(r["psf_size_truth"] ** 2))),
                    "psf_e_truth": float(np.sqrt(np.nanmean(r["psf_e_truth"] ** 2)))})
    return out


def main(argv: list[str]) -> None:
    size = int(argv[0]) if argv else 1024
    base = SurveyConfig(ccd_size=size, nights=1, rounds_per_night=6)
    for cfg in (base, replace(base, sky="galsim")):
        print(f"\n{cfg.sky} sky, {size} px CCDs (targets: zp rms <= 10, WCS <= 10 mas, "
              "PSF mag - truth |median| <= 2, gradient <= 3 mmag)")
        rows = summary(probe(cfg))
        print(" | ".join(rows[0]))
        for r in rows:
            print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
