"""QA of step 1's PSF model and PSF photometry against the truth (SCIENCE.md's targets;
Rubin's PSF QA measures the first two at reserved stars too):

- the model's size and shape against the true PSF's at the reserved stars (HSM moments of both,
  drawn at each star's position: free of the noise a data - model residual carries);
- aperture-corrected PSF magnitudes of bright (S/N >= 100) non-variable reference stars minus
  their true total magnitudes, median;
- the magnitude residual's change across a CCD, corner to corner: a plane through each CCD's
  residuals, its squared slope less what the residuals' own scatter gives it, pooled over the
  band's CCDs (a 1k CCD's ~140 bright stars fix each slope to ~3 mmag);
- galaxies among the stars the model was fitted to (the galsim sky's; none on the Moffat sky).

`ccd_psf_qa` measures one CCD, `band_psf_qa` pools a band's CCDs: the campaign's step-1 QA
(validation/qa.py) and the single-CCD probe (validation/scenes.py) both use them.
"""

from __future__ import annotations

import numpy as np
from astropy.stats import sigma_clip
from astropy.table import Table
from scipy.spatial import cKDTree

from drp_flows.tasks.camera import PIXEL_SCALE, Camera, focal_plane
from drp_flows.tasks.isolated_stars import chord, unit_vectors
from drp_flows.tasks.psf import measure_half, moffat_stamps
from drp_flows.tasks.psf_model import PixelPsf, moments
from drp_flows.validation.galsim_sky import PsfField, true_psf_moments
from drp_flows.validation.simulate import star_mags

BRIGHT_SNR = 100.0
MATCH_ARCSEC = 0.5
TARGETS = {"psf_size": 0.005, "psf_e": 0.005, "psf_mag_mmag": 2.0, "gradient_mmag": 3.0,
           "galaxy_fraction": 0.01}


def model_against_truth(psf: PixelPsf, x: np.ndarray, y: np.ndarray, camera: Camera,
                        detector: int, psf_field: str, seeing: float) -> tuple[np.ndarray, np.ndarray]:
    """The model's size error (fraction) and e1, e2 errors [2n] against the true PSF at the
    positions: the galsim sky's field, or the Moffat sky's Moffat (sampled at pixel centres,
    as it is drawn)."""
    if psf_field:
        true = true_psf_moments(PsfField.from_json(psf_field), camera, detector, x, y)
        true = np.column_stack([true["sigma"], true["e1"], true["e2"]])
    else:
        true = moments(moffat_stamps(x, y, seeing / PIXEL_SCALE, psf.half)[3], psf.fwhm_px / 2.3548)
    model = moments(psf.stamps(x, y, psf.half)[3], psf.fwhm_px / 2.3548)
    return model[:, 0] / true[:, 0] - 1, np.concatenate([model[:, 1] - true[:, 1],
                                                         model[:, 2] - true[:, 2]])


def psf_flux_fraction(psf: PixelPsf | float, camera: Camera, detector: int, psf_field: str,
                      seeing: float) -> float:
    """What the PSF flux measures of a star of total flux 1: psf.psf_flux's estimator (its
    stamp, flat weights as in the sky-limited regime) applied to the true PSF (the galsim
    sky's, pixel included; the Moffat sky's, sampled at pixel centres as drawn), averaged over
    a 3x3 grid of the CCD. `psf`: the CCD's empirical model, or the FWHM (pixels) of the Moffat
    its fluxes were measured with (normalised to the untruncated profile: a FWHM 0.2% too wide
    measures 0.2% too much). With it the true zeropoint of fluxes that are PSF fluxes times an
    aperture correction A (1 for the Moffat's) is zp_true + 2.5 log10(s A): a calibration is
    right when its zeropoint and A together give total fluxes, whatever A's own error (the
    zeropoint, fitted to the corrected fluxes, takes it)."""
    n = camera.ccd_size
    grid = np.round((np.arange(3) + 0.5) * n / 3)
    x, y = (a.ravel() for a in np.meshgrid(grid, grid))
    if isinstance(psf, PixelPsf):
        half = measure_half(psf.size_px)
        model = psf.stamps(x, y, half)[3]
    else:
        half = measure_half(psf)
        model = moffat_stamps(x, y, psf, half, unit_sum=False)[3]
    if psf_field:
        field = PsfField.from_json(psf_field)
        true = np.array([field.profile(*(float(v) for v in focal_plane(camera, detector, px, py)))
                         .drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=1.0).array
                         for px, py in zip(x, y, strict=True)])
    else:
        true = moffat_stamps(np.zeros(1), np.zeros(1), seeing / PIXEL_SCALE, half, unit_sum=False)[3]
    return float(np.mean((model * true).sum(axis=(1, 2)) / (model * model).sum(axis=(1, 2))))


def residual_plane(x: np.ndarray, y: np.ndarray, resid: np.ndarray, size: int) -> tuple[float, float]:
    """A plane through a CCD's magnitude residuals (clipped: a star blended with a neighbour it
    was not told apart from is tenths of a magnitude off): its slope squared (change across x
    and across y, mmag^2) and what the residuals' scatter alone gives that (NaN, NaN with
    fewer than 10 stars)."""
    kept = ~sigma_clip(resid, sigma=3, maxiters=5).mask
    if kept.sum() < 10:
        return float("nan"), float("nan")
    a = np.column_stack([np.ones(kept.sum()), x[kept] / (size - 1), y[kept] / (size - 1)])
    coef = np.linalg.lstsq(a, resid[kept], rcond=None)[0]
    cov = float(np.var(resid[kept] - a @ coef)) * np.linalg.inv(a.T @ a)
    return float(coef[1] ** 2 + coef[2] ** 2), float(cov[1, 1] + cov[2, 2])


def corner_to_corner(slope2: np.ndarray, noise2: np.ndarray, n_stars: np.ndarray) -> float:
    """The residual's change from one corner of a CCD to the opposite one, rms over CCDs with
    each plane's noise taken out (mmag). Each CCD's slope2 - noise2 counts with the square of
    its star count (its inverse variance, as noise2 goes as 1/n): with equal weights, the u
    band's CCDs of 10-15 bright stars (noise2 ~250 mmag^2, scattering by as much again) made
    a change of 12-16 mmag from noise alone."""
    ok = np.isfinite(slope2)
    if not ok.any():
        return float("nan")
    w = np.asarray(n_stars, float)[ok] ** 2
    return float(np.sqrt(2 * max(float(np.sum(w * (slope2[ok] - noise2[ok])) / np.sum(w)), 0.0)))


def bright_residuals(stars: Table, truth_stars: Table, band: str, mjd: float) -> Table:
    """Bright clean stars matched to non-variable true stars: x, y, and mag - true mag (mmag)."""
    plain = truth_stars[~np.asarray(truth_stars["is_variable"])]
    bright = stars[(stars["snr"] >= BRIGHT_SNR) & ~stars["saturated"] & ~stars["edge"]
                   & ~stars["blended"]]
    if not len(bright) or not len(plain):
        return Table({"x": [], "y": [], "resid": []}, dtype=(float, float, float))
    dist, idx = cKDTree(unit_vectors(np.asarray(plain["ra"]), np.asarray(plain["dec"]))).query(
        unit_vectors(np.asarray(bright["ra"]), np.asarray(bright["dec"])))
    ok = dist < chord(MATCH_ARCSEC)
    resid = (np.asarray(bright["mag"])[ok] - star_mags(plain[idx[ok]], band, mjd)) * 1e3
    return Table({"x": np.asarray(bright["x"])[ok], "y": np.asarray(bright["y"])[ok],
                  "resid": resid})


def galaxy_fraction(stars: Table, truth_stars: Table, galaxies: Table | None) -> tuple[int, int]:
    """Of the stars the PSF model was fitted to: (how many, how many are galaxies: nearer a
    true galaxy than any true star, within MATCH_ARCSEC)."""
    used = stars[stars["psf_used"]]
    if galaxies is None or not len(used):
        return len(used), 0
    xyz = unit_vectors(np.asarray(used["ra"]), np.asarray(used["dec"]))
    d_star = cKDTree(unit_vectors(np.asarray(truth_stars["ra"]),
                                  np.asarray(truth_stars["dec"]))).query(xyz)[0]
    d_gal = cKDTree(unit_vectors(np.asarray(galaxies["ra"]), np.asarray(galaxies["dec"]))).query(xyz)[0]
    return len(used), int(((d_gal < d_star) & (d_gal < chord(MATCH_ARCSEC))).sum())


def ccd_psf_qa(psf: PixelPsf | None, stars: Table, truth_stars: Table, galaxies: Table | None,
               camera: Camera, detector: int, psf_field: str, seeing: float, band: str,
               mjd: float) -> dict:
    """One CCD's PSF QA from its model and star table (the columns calibrate writes): the
    bright stars' magnitude residuals, the plane through them, the PSF stars and how many are
    galaxies, and the model's size and shape errors at the reserved stars."""
    bright = bright_residuals(stars, truth_stars, band, mjd)
    resid = np.asarray(bright["resid"])
    slope2, noise2 = residual_plane(np.asarray(bright["x"]), np.asarray(bright["y"]), resid,
                                    camera.ccd_size)
    n_psf, n_galaxies = galaxy_fraction(stars, truth_stars, galaxies)
    reserved = stars[stars["psf_reserved"]]
    size_err, e_err = np.zeros(0), np.zeros(0)
    if psf is not None and len(reserved):
        size_err, e_err = model_against_truth(psf, np.asarray(reserved["x"], float),
                                              np.asarray(reserved["y"], float), camera, detector,
                                              psf_field, seeing)
    return {"band": band, "resid": resid, "slope2": slope2, "noise2": noise2,
            "n_psf_stars": n_psf, "n_galaxies": n_galaxies, "size_err": size_err, "e_err": e_err}


def band_psf_qa(ccds: list[dict]) -> dict[str, dict]:
    """Per band, from its CCDs' `ccd_psf_qa`: median bright-star magnitude residual (mmag),
    gradient corner to corner (mmag), rms model size (fraction) and e1/e2 errors at the
    reserved stars, and the fraction of galaxies among the PSF stars."""
    out = {}
    for band in sorted({c["band"] for c in ccds}):
        mine = [c for c in ccds if c["band"] == band]
        resid = np.concatenate([c["resid"] for c in mine])
        size = np.concatenate([c["size_err"] for c in mine])
        e = np.concatenate([c["e_err"] for c in mine])
        size, e = size[np.isfinite(size)], e[np.isfinite(e)]
        n_psf = sum(c["n_psf_stars"] for c in mine)
        out[band] = {
            "n_ccd": len(mine), "n_bright": len(resid), "n_reserved": len(size),
            "psf_mag_mmag": float(np.median(resid)) if len(resid) else float("nan"),
            "gradient_mmag": corner_to_corner(np.array([c["slope2"] for c in mine]),
                                              np.array([c["noise2"] for c in mine]),
                                              np.array([len(c["resid"]) for c in mine])),
            "psf_size": float(np.sqrt(np.mean(size ** 2))) if len(size) else float("nan"),
            "psf_e": float(np.sqrt(np.mean(e ** 2))) if len(e) else float("nan"),
            "n_psf_stars": n_psf, "galaxy_fraction": sum(c["n_galaxies"] for c in mine) / max(n_psf, 1)}
    return out
