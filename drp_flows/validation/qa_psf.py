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

Used on single CCDs by validation/scenes.py; a campaign's report gets them once its step 1
fits the empirical model (issue 21).
"""

from __future__ import annotations

import numpy as np
from astropy.stats import sigma_clip
from astropy.table import Table
from scipy.spatial import cKDTree

from drp_flows.tasks.camera import PIXEL_SCALE, Camera
from drp_flows.tasks.isolated_stars import chord, unit_vectors
from drp_flows.tasks.psf import moffat_stamps
from drp_flows.tasks.psf_model import PixelPsf, moments
from drp_flows.validation.galsim_sky import PsfField, true_psf_moments
from drp_flows.validation.simulate import star_mags

BRIGHT_SNR = 100.0
MATCH_ARCSEC = 0.5


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


def corner_to_corner(slope2: np.ndarray, noise2: np.ndarray) -> float:
    """The residual's change from one corner of a CCD to the opposite one, rms over CCDs with
    each plane's noise taken out (mmag)."""
    ok = np.isfinite(slope2)
    if not ok.any():
        return float("nan")
    return float(np.sqrt(2 * max(float(np.mean(slope2[ok] - noise2[ok])), 0.0)))


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
