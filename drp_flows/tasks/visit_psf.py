"""The visit's PSF size over the focal plane: the size part of Rubin's finalizeCharacterization,
run where the visit's detectors meet (consolidateVisitSummary).

Each CCD's empirical PSF (psf_model.py) is fitted to its own stars: on a 1k CCD ~100-200 at
S/N >= 50, whose noise leaves the model's size 0.2-0.5% off towards the CCD's corners, and the
PSF fluxes with it (~1.3 mmag per 0.1%): 5-10 mmag from corner to corner. The true size
changes smoothly over the focal plane (atmosphere, focus), so the visit's stars together fix
it far better: a polynomial in focal-plane position of the fewest terms the stars ask for (up
to a quadratic; none for a PSF that does not vary), plus one offset per CCD (each CCD's mean
size is fixed well by its own stars, and the adaptive moments' bias on noisy data differs with
the crowd). Every source's PSF flux then moves by its CCD model's size error against that
field, times the flux's response to a size error (PSF_KSIZ), normalised to a mean of 1 over
the CCD's PSF stars, whose aperture correction already holds the mean. The model itself is
left as it is: the coadds and the difference images use the CCD's own.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from drp_flows.tasks.camera import Camera, focal_plane
from drp_flows.tasks.psf_model import terms

FIELD_DEGREE = 2            # the size field over the focal plane: at most a quadratic
SNR_CAP = 300.0             # a star's weight stops growing here (the moments' systematics)
MIN_STARS = 5               # per unknown of the visit's fit, and per CCD for its offset
MAX_CHANGE = 0.02           # a model's size error beyond this is not one (a bad CCD): no correction
CLIP_SIGMA = 4.0


def field_terms(fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """The size field's terms over the focal plane up to FIELD_DEGREE, without the constant
    (each CCD's offset)."""
    return np.column_stack([fx ** (d - k) * fy ** k for d in range(1, FIELD_DEGREE + 1)
                            for k in range(d + 1)])


def size_factors(tables: dict[int, Table], camera: Camera, response: dict[int, float]
                 ) -> dict[int, np.ndarray]:
    """Per detector, the factor on each of its sources' PSF fluxes (all 1 where the visit or
    the CCD has too few PSF stars, or its model is off by more than MAX_CHANGE). `tables`:
    each detector's star table (calibrate's columns psf_used, psf_size, psf_model_size, x, y,
    snr); `response`: each detector's PSF_KSIZ."""
    ones = {d: np.ones(len(t)) for d, t in tables.items()}
    stars = {}
    for d, t in tables.items():
        used = (np.asarray(t["psf_used"], bool) & np.isfinite(np.asarray(t["psf_size"], float))
                & np.isfinite(np.asarray(t["psf_model_size"], float)))
        if used.sum() >= MIN_STARS and np.isfinite(response.get(d, np.nan)):
            stars[d] = np.flatnonzero(used)
    n_terms = len(stars) + field_terms(np.zeros(1), np.zeros(1)).shape[1]
    if not stars or sum(len(i) for i in stars.values()) < MIN_STARS * n_terms:
        return ones
    dets = sorted(stars)
    blocks, value, weight = [], [], []
    for k, d in enumerate(dets):
        t, i = tables[d], stars[d]
        fx, fy = focal_plane(camera, d, np.asarray(t["x"], float)[i], np.asarray(t["y"], float)[i])
        offset = np.zeros((len(i), len(dets)))
        offset[:, k] = 1.0
        blocks.append(np.hstack([offset, field_terms(fx, fy)]))
        value.append(np.asarray(t["psf_size"], float)[i])
        weight.append(np.minimum(np.asarray(t["snr"], float)[i], SNR_CAP) ** 2)
    a, v, w = np.vstack(blocks), np.concatenate(value), np.concatenate(weight)
    scale = float(np.median(v))             # sizes in units of the visit's (a fit in ln size
    v, w = v / scale, w * scale ** 2        # bends a field that is linear in size)
    keep = np.ones(len(v), bool)
    for _ in range(4):        # clipped: a star HSM measured on a neighbour's wing
        coef = np.linalg.lstsq(a[keep] * np.sqrt(w[keep])[:, None], v[keep] * np.sqrt(w[keep]),
                               rcond=None)[0]
        pull = (v - a @ coef) * np.sqrt(w)
        spread = 1.4826 * np.median(np.abs(pull[keep]))
        new = np.abs(pull) < CLIP_SIGMA * spread
        if (new == keep).all():
            break
        keep = new
    # the fewest field terms the stars ask for (BIC, as the CCDs' models choose theirs): a
    # field fitted to a flat PSF's noisy sizes moved fluxes by 1-2 mmag across each CCD
    best = None
    for degree in range(FIELD_DEGREE + 1):        # field_terms' columns come by degree
        n_field = (degree + 1) * (degree + 2) // 2 - 1
        cols = len(dets) + n_field
        c = np.linalg.lstsq(a[keep, :cols] * np.sqrt(w[keep])[:, None],
                            v[keep] * np.sqrt(w[keep]), rcond=None)[0]
        chi2 = float(np.sum(((v[keep] - a[keep, :cols] @ c) * np.sqrt(w[keep]) / spread) ** 2))
        bic = chi2 + cols * np.log(keep.sum())
        if best is None or bic < best[0]:
            best = (bic, np.r_[c, np.zeros(a.shape[1] - cols)])
    coef = best[1]
    field = coef[len(dets):]
    out = dict(ones)
    for k, d in enumerate(dets):
        t, i = tables[d], stars[d]
        x, y = np.asarray(t["x"], float), np.asarray(t["y"], float)
        # the CCD model's size over the CCD (its polynomial, through its sizes at the stars)
        model_terms = terms(x, y, 2 if len(i) >= 12 else 1 if len(i) >= 6 else 0, camera.ccd_size)
        model = np.linalg.lstsq(model_terms[i], np.asarray(t["psf_model_size"], float)[i] / scale,
                                rcond=None)[0]
        fx, fy = focal_plane(camera, d, x, y)
        error = model_terms @ model / (coef[k] + field_terms(fx, fy) @ field) - 1   # model / true - 1
        if np.abs(error[i]).max() > MAX_CHANGE:
            continue
        bias = 1 + response[d] * np.clip(error, -MAX_CHANGE, MAX_CHANGE)
        out[d] = np.mean(bias[i]) / bias
    return out


def correct_fluxes(tables: dict[int, Table], camera: Camera, response: dict[int, float]) -> None:
    """Apply `size_factors` to each detector's star table in place: PSF fluxes, their errors
    and magnitudes (the zeropoint is unchanged: the factors average 1 over the PSF stars),
    the factor kept as `psf_size_factor`."""
    for d, factor in size_factors(tables, camera, response).items():
        t = tables[d]
        for column in ("psf_flux", "psf_flux_err"):
            t[column] *= factor
        t["mag"] -= 2.5 * np.log10(factor)
        t["psf_size_factor"] = factor
