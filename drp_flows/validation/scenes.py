"""Step 1 on single CCDs drawn another way: how the pipeline's calibration holds on a sky it
does not model (validation/galsim_sky.py) against the same CCDs drawn as Moffats.

Each CCD is simulated, put through ISR with its true calibrations (so that only the sky
differs) and calibrated; the results are compared with the truth: the zeropoint, the WCS at
bright stars, and what validation/qa_psf.py measures over a campaign (the PSF model against
the true PSF at reserved stars, PSF magnitudes against true ones, their gradient over a CCD).
Run `python -m drp_flows.validation.scenes` for the table per band, each sky with either PSF
model (the campaign's Moffat, and the empirical one of issue 21).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from drp_flows.errors import DataError
from drp_flows.tasks.calibrate import APCORR_RADIUS, EMPIRICAL, PSF_MODELS, calibrate
from drp_flows.tasks.isolated_stars import unit_vectors
from drp_flows.tasks.isr import run_isr
from drp_flows.validation.qa_psf import (
    BRIGHT_SNR,
    bright_residuals,
    corner_to_corner,
    galaxy_fraction,
    model_against_truth,
    residual_plane,
)
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
)


def calibrate_scene(cfg: SurveyConfig, visit: Visit, detector: int, stars: Table,
                    asteroids: Table, galaxy_table: Table | None, refcat: Table,
                    psf_model: str = EMPIRICAL, keep_image: bool = False) -> dict:
    """One CCD through ISR and calibrate (with `psf_model`), against its truth (mmag, mas);
    with the calibrated image as "image" when `keep_image`."""
    raw, truth = simulate_science_ccd(cfg, visit, detector, stars, asteroids, galaxy_table)
    cam, n = cfg.camera, cfg.ccd_size
    post = run_isr(raw, cam, detector, np.zeros((n, n), np.float32),
                   hot_pixels(cam, detector).astype(np.float32),
                   response(cam, detector).astype(np.float32))
    try:
        image, found = calibrate(post, refcat, visit.band, psf_model=psf_model)
    except DataError as e:
        return {"band": visit.band, "detector": detector, "error": str(e)}
    # the true zeropoint on the pipeline's scale (fluxes inside its aperture)
    row = Table(rows=[{"visit": visit.visit, "detector": detector, "psf_field": truth.get("psf_field", ""),
                       "zp_true": ZEROPOINT[visit.band] + 2.5 * np.log10(EXPTIME)
                       - visit.extinction - truth["zp_offset"]}])
    aperture_zeropoints(cfg, row, Table({"visit": [visit.visit], "seeing": [visit.seeing]}),
                        APCORR_RADIUS)
    zp_true = float(row["zp_true_aperture" if psf_model == EMPIRICAL else "zp_true"][0])
    bright = bright_residuals(found, stars, visit.band, visit.mjd)
    resid = np.asarray(bright["resid"])
    # the WCS at the bright stars' true positions, as the campaign's QA measures it
    wcs_mas = wcs_at_stars(image.wcs, WCS(truth["wcs"]), found, stars)
    gradient, gradient_err = residual_plane(np.asarray(bright["x"]), np.asarray(bright["y"]),
                                            resid, n)
    n_psf, n_galaxies = galaxy_fraction(found, stars, galaxy_table)
    reserved = found[found["psf_reserved"]]
    size_err = e_err = np.full(1, np.nan)
    if image.psf is not None and len(reserved):
        size_err, e_err = model_against_truth(image.psf, np.asarray(reserved["x"], float),
                                              np.asarray(reserved["y"], float), cam, detector,
                                              truth.get("psf_field", ""), visit.seeing)
    return {**({"image": image} if keep_image else {}),
            "band": visit.band, "detector": detector, "seeing": visit.seeing,
            "zp_mmag": (float(image.metadata["ZP"]) - zp_true) * 1e3,
            "zp_err_mmag": float(image.metadata["ZP_ERR"]) * 1e3, "wcs_mas": wcs_mas,
            "psf_mag_mmag": float(np.median(resid)) if len(resid) else float("nan"),
            "n_bright": len(resid), "slope2": gradient, "noise2": gradient_err,
            "apcorr": float(image.metadata.get("APCORR", np.nan)),
            "n_psf_stars": n_psf, "n_galaxies": n_galaxies,
            "psf_size_truth": float(np.sqrt(np.nanmean(size_err ** 2))),
            "psf_e_truth": float(np.sqrt(np.nanmean(e_err ** 2))),
            "psf_size_rms": float(image.metadata.get("PSF_DSIZ", np.nan)),
            "psf_e_rms": float(np.hypot(image.metadata.get("PSF_DE1", np.nan),
                                        image.metadata.get("PSF_DE2", np.nan)) / np.sqrt(2))}


def wcs_at_stars(fitted: WCS, true_wcs: WCS, found: Table, stars: Table) -> float:
    """rms (mas) of the fitted WCS at bright reference stars' true pixel positions."""
    bright = found[(found["snr"] >= BRIGHT_SNR) & (found["ref_id"] >= 0)]
    truth = stars[np.searchsorted(stars["id"], bright["ref_id"])]
    ra, dec = np.asarray(truth["ra"]), np.asarray(truth["dec"])
    tx, ty = true_wcs.all_world2pix(ra, dec, 0)
    sep = np.linalg.norm(unit_vectors(*fitted.all_pix2world(tx, ty, 0)) - unit_vectors(ra, dec),
                         axis=1)
    return float(np.sqrt(np.mean(sep ** 2))) * 206264.806e3


def probe(cfg: SurveyConfig, psf_model: str, n_visits: int = 6, detectors=(0, 4, 8)) -> Table:
    """`calibrate_scene` for the first visit in each of the survey's bands (up to n_visits)."""
    stars, asteroids, galaxy_table = make_stars(cfg), make_asteroids(cfg), galaxies(cfg)
    refcat = make_refcat(cfg, stars)
    seen, rows = set(), []
    for visit in plan_visits(cfg):
        if visit.band in seen or len(seen) >= n_visits:
            continue
        seen.add(visit.band)
        rows += [calibrate_scene(cfg, visit, d, stars, asteroids, galaxy_table, refcat, psf_model)
                 for d in detectors]
    return Table(rows=[r for r in rows if "error" not in r])


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
                    "gradient_mmag": corner_to_corner(np.asarray(r["slope2"]),
                                                      np.asarray(r["noise2"])),
                    "apcorr": float(np.nanmean(r["apcorr"])),
                    "galaxies_in_psf_stars": float(r["n_galaxies"].sum()
                                                   / max(r["n_psf_stars"].sum(), 1)),
                    "psf_size_rms": float(np.sqrt(np.nanmean(r["psf_size_rms"] ** 2))),
                    "psf_e_rms": float(np.sqrt(np.nanmean(r["psf_e_rms"] ** 2))),
                    "psf_size_truth": float(np.sqrt(np.nanmean(r["psf_size_truth"] ** 2))),
                    "psf_e_truth": float(np.sqrt(np.nanmean(r["psf_e_truth"] ** 2)))})
    return out


def main(argv: list[str]) -> None:
    size = int(argv[0]) if argv else 1024
    base = SurveyConfig(ccd_size=size, nights=1, rounds_per_night=6)
    for cfg, psf_model in ((c, m) for c in (base, replace(base, sky="galsim")) for m in PSF_MODELS):
        print(f"\n{cfg.sky} sky, {psf_model} PSF, {size} px CCDs (targets: zp rms <= 10, "
              "WCS <= 10 mas, PSF mag - truth |median| <= 2, gradient <= 3 mmag, model vs "
              "truth size <= 0.005, e <= 0.005)")
        rows = summary(probe(cfg, psf_model))
        print(" | ".join(rows[0]))
        for r in rows:
            print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
