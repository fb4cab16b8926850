"""Single-frame calibration (Rubin's calibrateImage): background, PSF, detection, measurement,
reference match, astrometric fit and photometric zeropoint of one post-ISR CCD.

Recipe from SCIENCE.md: sep background in 128 px cells and 5-sigma peaks of the PSF-matched
significance image (a Moffat of the fitted FWHM as the kernel); windowed centroids; PSF
(optimal) fluxes from the fitted Moffat (total fluxes), or with psf_model="empirical" from a
model that varies over the CCD (psf_model.py) corrected to a 3" aperture measured on the PSF
stars with their neighbours subtracted (Rubin's calibFlux aperture: the zeropoint is then on
that aperture's scale); refcat match by offset voting then nearest neighbour;
TAN-SIP fit by linear least squares as meas_astrom's FitTanSipWcsTask (0-based pixels);
photoCal-style zeropoint
(3-sigma clipped, 20 iterations, inverse-variance weighted) over reference stars with predicted
S/N >= 15, selected and weighted on the reference magnitude so that noise cannot bias it.
"""

from __future__ import annotations

import numpy as np
import sep
from astropy.stats import sigma_clipped_stats
from astropy.table import Table
from astropy.wcs import WCS, Sip
from scipy.ndimage import maximum_filter
from scipy.signal import oaconvolve
from scipy.spatial import cKDTree
from scipy.stats import chi2 as chi2_dist

from drp_flows.errors import DataError
from drp_flows.tasks.camera import PIXEL_SCALE
from drp_flows.tasks.images import Exposure, bit
from drp_flows.tasks.isolated_stars import unit_vectors
from drp_flows.tasks.psf import fit_fwhm, moffat_stamps, psf_flux, stamp_indices
from drp_flows.tasks.psf_model import fit_pixel_psf, select_candidates, size_response

DETECTION_SIGMA = 5.0
BACKGROUND_CELL = 128
MIN_REF_MATCHES = 8
MIN_SIP_MATCHES = 20
MIN_ZP_STARS = 5
ZP_DEPTH_MARGIN = 1.2    # mag above the 5-sigma depth: predicted S/N >= 15
CROWDING_FLUX_LIMIT = 0.005   # largest flux error the background may cause a zeropoint star
MIN_SAFE_ZP_STARS = 30
VISIT_PSF_PROBABILITY = 1e-3
APCORR_RADIUS = 15.0     # pixels (3"): PSF fluxes are corrected to this aperture's
APCORR_ANNULUS = (20.0, 30.0)   # pixels: its local background
MOFFAT, EMPIRICAL = "moffat", "empirical"
PSF_MODELS = (MOFFAT, EMPIRICAL)


class CalibrationError(DataError):
    """The CCD cannot be calibrated (too few stars or reference matches)."""


def psf_kernel(fwhm_px: float) -> np.ndarray:
    """The PSF model as the matched-filter kernel."""
    return moffat_stamps(np.zeros(1), np.zeros(1), fwhm_px, int(np.ceil(1.5 * fwhm_px)))[3][0]


def subtract_background(exp: Exposure) -> tuple[np.ndarray, np.ndarray, float]:
    """Background-subtracted image, the background variance map, and the mean sky.

    One pass over every good pixel: a second pass on blank sky only (away from the
    detections, as the coadds' objects step does) made the demo's faint PSF fluxes 1-1.5%
    too bright at S/N 20-50, against +0.1-0.5% with one pass.
    """
    n = exp.image.shape[0]
    cell = min(BACKGROUND_CELL, max(32, n // 2))
    bad = (exp.mask & (bit("BAD") | bit("SAT"))) != 0
    bkg = sep.Background(exp.image, mask=bad, bw=cell, bh=cell, fw=3, fh=3)
    return exp.image - bkg.back(), bkg.rms() ** 2, float(bkg.globalback)


def significance(image: np.ndarray, bkg_var: np.ndarray, fwhm_px: float) -> np.ndarray:
    """PSF-matched significance: (I * P) / sqrt(V * P^2), with V the background variance, so
    that a point source at the 5-sigma depth m5 peaks at 5."""
    k = psf_kernel(fwhm_px)
    with np.errstate(invalid="ignore", divide="ignore"):
        return oaconvolve(image, k, mode="same") / np.sqrt(oaconvolve(bkg_var, k * k, mode="same"))


def detect(image: np.ndarray, bkg_var: np.ndarray, bad: np.ndarray, fwhm_px: float,
           thresh: float) -> tuple[Table, np.ndarray]:
    """Peaks above `thresh` in the significance image (Rubin's footprints-and-peaks, with
    every peak a source: blends of stars a few FWHM apart stay two sources). Returns the
    peaks (x, y, significance, blended) and the above-threshold footprint mask."""
    sig = significance(image, bkg_var, fwhm_px)
    size = max(3, int(round(fwhm_px)) | 1)
    peaks = (sig == maximum_filter(sig, size=size)) & (sig > thresh) & ~bad
    y, x = np.nonzero(peaks)
    blended = np.zeros(len(x), bool)
    if len(x) > 1:
        pairs = cKDTree(np.column_stack([x, y])).query_pairs(2 * fwhm_px, output_type="ndarray")
        blended[pairs.ravel()] = True
    table = Table({"x": x.astype(float), "y": y.astype(float), "significance": sig[y, x],
                   "blended": blended})
    return table, sig > thresh


def centroids(image: np.ndarray, objs: Table, fwhm_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Windowed centroids (sep.winpos) started from the integer peaks."""
    x0, y0 = np.asarray(objs["x"], float), np.asarray(objs["y"], float)
    x, y, _ = sep.winpos(image, x0, y0, np.full(len(x0), fwhm_px / 2.3548))
    ok = np.isfinite(x) & np.isfinite(y) & (np.hypot(x - x0, y - y0) < fwhm_px)
    return np.where(ok, x, x0), np.where(ok, y, y0)


def measure_fwhm(image: np.ndarray, bkg_var: np.ndarray, objs: Table, guess_px: float
                 ) -> tuple[float, float]:
    """PSF FWHM and its error (pixels): clipped median of Moffat fits to the brightest
    unblended stars, and the error of that median.

    Only stars at significance > 200 (at least the ten brightest): fits to fainter ones scatter
    and lean on the background, and the PSF flux scale follows the FWHM (1% in FWHM is ~10
    mmag in zeropoint); with them the per-CCD FWHM error was 0.45% rms, without 0.15%.
    """
    unblended = objs[~objs["blended"]]
    unblended.sort("significance", reverse=True)
    n = max(int((unblended["significance"] > 200).sum()), min(10, len(unblended)))
    if n < 3:
        raise CalibrationError(f"only {n} unblended stars to measure the PSF")
    objs = unblended[:n]
    x, y = centroids(image, objs, guess_px)
    fwhm = fit_fwhm(image, bkg_var, x, y, guess_px)
    _, median, std = sigma_clipped_stats(fwhm, sigma=3)
    return float(median), float(1.2533 * std / np.sqrt(n))


def visit_psf_fwhm(fwhm: np.ndarray, fwhm_err: np.ndarray) -> float | None:
    """The PSF FWHM of a whole visit from its detectors' (finalizeCharacterization's role),
    when they agree: the weighted mean, or None when their scatter says the PSF varies
    across the focal plane (chi2 probability below VISIT_PSF_PROBABILITY).

    One detector's bright stars fix its FWHM to 0.1-0.6% (u has ~10 per 512-px CCD), and its
    PSF fluxes, so its zeropoint, follow that error one to one; a visit's nine pool it.
    """
    ok = np.isfinite(fwhm) & np.isfinite(fwhm_err) & (fwhm_err > 0)
    if ok.sum() < 2:
        return None
    w = 1 / fwhm_err[ok] ** 2
    mean = float(np.sum(w * fwhm[ok]) / np.sum(w))
    chi2 = float(np.sum(w * (fwhm[ok] - mean) ** 2))
    return mean if chi2_dist.sf(chi2, ok.sum() - 1) >= VISIT_PSF_PROBABILITY else None


def match_offset(src_xy: np.ndarray, ref_xy: np.ndarray, search: float) -> np.ndarray:
    """Shift (dx, dy) to add to ref pixels to land on sources: the mode of all pair offsets."""
    tree = cKDTree(ref_xy)
    pairs = tree.query_ball_point(src_xy, search)
    d = np.array([src_xy[i] - ref_xy[j] for i, js in enumerate(pairs) for j in js])
    if len(d) == 0:
        raise CalibrationError("no reference stars near any source")
    bins = np.arange(-search, search + 1.0, 1.0)
    hist, xe, ye = np.histogram2d(d[:, 0], d[:, 1], bins=[bins, bins])
    i, j = np.unravel_index(np.argmax(hist), hist.shape)
    peak = np.array([(xe[i] + xe[i + 1]) / 2, (ye[j] + ye[j + 1]) / 2])
    near = np.hypot(*(d - peak).T) < 2.0
    return np.median(d[near], axis=0)


def match_nearest(src_xy: np.ndarray, ref_xy: np.ndarray, radius: float):
    """One-to-one nearest matches within radius: (source index, ref index)."""
    dist, j = cKDTree(ref_xy).query(src_xy, distance_upper_bound=radius)
    i = np.flatnonzero(np.isfinite(dist))
    j = j[i]
    order = np.argsort(dist[i])
    _, first = np.unique(j[order], return_index=True)
    keep = order[first]
    return i[keep], j[keep]


def fit_tan_sip(x: np.ndarray, y: np.ndarray, ra: np.ndarray, dec: np.ndarray,
                degree: int | None) -> WCS:
    """A TAN(-SIP) WCS from matched 0-based pixel and sky positions, by linear least squares as
    meas_astrom's FitTanSipWcsTask fits it: with the tangent point fixed at the centre of the
    sky positions, their tangent-plane coordinates are one polynomial of the pixel offsets
    from CRPIX (CD times the offsets with the SIP terms added), linear in its coefficients;
    CRPIX is moved to where the polynomial is zero and the fit repeated. (astropy's
    fit_wcs_from_points fits the same model by non-linear least squares, 20x slower.)"""
    centre = np.mean(unit_vectors(ra, dec), axis=0)
    crval = [np.degrees(np.arctan2(centre[1], centre[0])) % 360,
             np.degrees(np.arcsin(centre[2] / np.linalg.norm(centre)))]
    plane = WCS(naxis=2)                 # pixel = tangent-plane coordinates in degrees
    plane.wcs.ctype, plane.wcs.crval, plane.wcs.crpix = ["RA---TAN", "DEC--TAN"], crval, [0, 0]
    xi, eta = plane.wcs_world2pix(ra, dec, 1)   # 1-based: CRPIX 0 puts CRVAL at 0
    powers = [(p, q) for total in range(1 + (degree or 1)) for p in range(total, -1, -1)
              for q in [total - p]]      # (0, 0), (1, 0), (0, 1), then SIP's (p, q)
    crpix = np.array([np.mean(x), np.mean(y)])
    for _ in range(5):
        u, v = x - crpix[0], y - crpix[1]
        design = np.column_stack([u ** p * v ** q for p, q in powers])
        coef = np.linalg.lstsq(design, np.column_stack([xi, eta]), rcond=None)[0]
        cd = coef[1:3].T
        step = np.linalg.solve(cd, coef[0])
        if np.all(np.abs(step) < 1e-6):
            break
        crpix = crpix - step
    wcs = WCS(naxis=2)
    wcs.wcs.crval, wcs.wcs.crpix, wcs.wcs.cd = crval, crpix + 1, cd
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    if degree:
        wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        a, b = np.zeros((degree + 1, degree + 1)), np.zeros((degree + 1, degree + 1))
        for (p, q), (da, db) in zip(powers[3:], np.linalg.solve(cd, coef[3:].T).T, strict=True):
            a[p, q], b[p, q] = da, db
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def fit_astrometry(x, y, ref: Table, wcs0: WCS, n: int, sip_degree: int):
    """Match to the refcat and fit TAN-SIP; returns the WCS, the matched source indices and the
    residual rms (mas)."""
    rx, ry = wcs0.all_world2pix(np.asarray(ref["coord_ra"]), np.asarray(ref["coord_dec"]), 0)
    on = (rx > -20) & (rx < n + 20) & (ry > -20) & (ry < n + 20)
    ref, rx, ry = ref[on], rx[on], ry[on]
    if len(ref) < MIN_REF_MATCHES:
        raise CalibrationError(f"only {len(ref)} reference stars on the CCD")
    src = np.column_stack([x, y])
    shift = match_offset(src, np.column_stack([rx, ry]), search=30.0)
    si, ri = match_nearest(src, np.column_stack([rx, ry]) + shift, radius=2.0)
    wcs, resid = None, None
    for radius in (1.0, 0.5, 0.5):
        if len(si) < MIN_REF_MATCHES:
            raise CalibrationError(f"only {len(si)} reference matches (need {MIN_REF_MATCHES})")
        # SIP terms only when the matches constrain them well (2 x 12 parameters at degree 2)
        degree = sip_degree if len(si) >= MIN_SIP_MATCHES else None
        fitted = fit_tan_sip(x[si], y[si], np.asarray(ref["coord_ra"][ri], float),
                             np.asarray(ref["coord_dec"][ri], float), degree)
        px, py = fitted.all_world2pix(np.asarray(ref["coord_ra"]), np.asarray(ref["coord_dec"]), 0)
        s2, r2 = match_nearest(src, np.column_stack([px, py]), radius=radius)
        r = np.hypot(x[s2] - px[r2], y[s2] - py[r2])
        _, med, std = sigma_clipped_stats(r, sigma=3)
        keep = r < med + 3 * std
        if wcs is not None and keep.sum() < MIN_REF_MATCHES:
            break        # a tighter match would leave too few stars: the last fit stands
        wcs, si, ri, resid = fitted, s2[keep], r2[keep], r[keep]
    rms_mas = float(np.sqrt(np.mean(resid ** 2)) * PIXEL_SCALE * 1000)
    return wcs, si, rms_mas


def calibrate(exp: Exposure, refcat: Table, band: str, sip_degree: int = 2,
              fwhm_guess_arcsec: float = 1.0, psf_model: str = EMPIRICAL) -> tuple[Exposure, Table]:
    """Calibrate one post-ISR CCD: the preliminary visit image and its star table.

    `psf_model`: "empirical" (the campaign's), the model that varies over the CCD
    (psf_model.py) with fluxes corrected to APCORR_RADIUS, the zeropoint on that aperture's
    scale; or "moffat", the CCD's fitted Moffat, whose PSF fluxes are total fluxes (what
    step 1 measured before issue 21; validation/scenes.py compares the two)."""
    n = exp.image.shape[0]
    bad = (exp.mask & (bit("BAD") | bit("SAT"))) != 0
    image, bkg_var, sky = subtract_background(exp)
    image = np.ascontiguousarray(image, dtype=np.float32)

    fwhm = fwhm_guess_arcsec / PIXEL_SCALE
    for _ in range(2):
        objs, _ = detect(image, bkg_var, bad, fwhm, thresh=10.0)
        fwhm, fwhm_err = measure_fwhm(image, bkg_var, objs, fwhm)
    objs, footprints = detect(image, bkg_var, bad, fwhm, thresh=DETECTION_SIGMA)
    crowding = background_crowding(image, bad, footprints, fwhm)
    mask = exp.mask | np.where(footprints, bit("DETECTED"), 0).astype(np.int32)

    x, y = centroids(image, objs, fwhm)
    saturated = _touches(exp.mask, x, y, bit("SAT"), 2 * fwhm)
    edge = (x < 2 * fwhm) | (x > n - 1 - 2 * fwhm) | (y < 2 * fwhm) | (y > n - 1 - 2 * fwhm)
    flux, flux_err = psf_flux(image, bkg_var, x, y, fwhm, variance=exp.variance)
    clean = ~saturated & ~edge & ~objs["blended"] & np.isfinite(flux / flux_err)
    if psf_model not in PSF_MODELS:
        raise ValueError(f"psf_model {psf_model!r}: choose from {PSF_MODELS}")
    # the aperture the fluxes are corrected to (empirical), or a QA check of the Moffat's
    ap, ap_err, _ = sep.sum_circle(image, x, y, APCORR_RADIUS if psf_model == EMPIRICAL
                                   else 4 * fwhm, err=np.sqrt(exp.variance), mask=bad, subpix=5)
    if psf_model == EMPIRICAL:
        psf, psf_stars, flux, flux_err, apcorr, apcorr_err = empirical_photometry(
            image, bkg_var, exp.variance, bad, x, y, flux / flux_err, clean, flux, fwhm, ap_err)
        nea = apcorr ** 2 / float((psf.centred(np.array([n / 2]), np.array([n / 2])) ** 2).sum())
    else:
        psf, psf_stars = None, None
        # QA only: Moffat PSF fluxes are total fluxes; this ratio drifts from 1 if it is off
        bright = clean & (flux / flux_err > 50)
        apcorr = float(np.median(ap[bright] / flux[bright])) if bright.any() else float("nan")
        nea = 1.0 / float((moffat_stamps(np.zeros(1), np.zeros(1), fwhm,
                                         int(np.ceil(4 * fwhm)))[3] ** 2).sum())
    snr = flux / flux_err
    clean &= np.isfinite(snr)

    good = clean & (snr > 20)
    if good.sum() < 3 * MIN_REF_MATCHES:   # few bright stars (blue band, small CCD): go fainter
        good = clean & (snr > 10)
    wcs, si, wcs_rms = fit_astrometry(x[good], y[good], refcat, exp.wcs, n, sip_degree)

    # photometric matches over all clean detections, now that the WCS is good
    px, py = wcs.all_world2pix(np.asarray(refcat["coord_ra"]), np.asarray(refcat["coord_dec"]), 0)
    ok = clean & (snr > DETECTION_SIGMA)
    pi, pr = match_nearest(np.column_stack([x[ok], y[ok]]), np.column_stack([px, py]), radius=1.0)
    phot_idx, phot_ref = np.flatnonzero(ok)[pi], refcat[pr]
    zp_points = phot_ref[f"{band}_mag"] + 2.5 * np.log10(flux[phot_idx])
    # measured background noise (as Rubin's skyNoise), the noise detection thresholds on; the
    # variance plane misses master-calib and confusion noise
    sky_noise = float(np.sqrt(np.median(bkg_var[~bad])))

    def depth(zeropoint: float) -> float:
        return float(zeropoint - 2.5 * np.log10(5 * sky_noise * np.sqrt(nea)))

    # Select and weight on the reference magnitude, not the measured flux: a cut or a weight
    # on the measured flux keeps stars that fluctuated up and biases the zeropoint bright.
    zp0 = sigma_clipped_stats(zp_points[snr[phot_idx] >= 10], sigma=3, maxiters=20)[1]
    ref_mag = np.asarray(phot_ref[f"{band}_mag"])
    use = ref_mag < depth(zp0) - ZP_DEPTH_MARGIN
    if use.sum() < MIN_ZP_STARS:
        raise CalibrationError(f"only {use.sum()} reference stars bright enough for the zeropoint")
    # and, where enough are, bright enough that the background's own error moves their flux
    # by less than CROWDING_FLUX_LIMIT (`background_crowding`)
    ref_flux = 10 ** (-0.4 * (ref_mag - zp0))
    safe = use & (ref_flux * CROWDING_FLUX_LIMIT > nea * crowding)
    if safe.sum() >= MIN_SAFE_ZP_STARS:
        use = safe
    ref_err = np.asarray(phot_ref[f"{band}_magErr"])[use]
    zp, zp_err, n_zp = weighted_zeropoint(zp_points[use], ref_mag[use], ref_err, zp0,
                                          nea * sky_noise ** 2)
    # its error holds the background's: the zeropoint again with every flux moved by it
    moved = zp_points[use] + 1.0857 * nea * crowding / ref_flux[use]
    zp_err = float(np.hypot(zp_err, weighted_zeropoint(moved, ref_mag[use], ref_err, zp0,
                                                       nea * sky_noise ** 2)[0] - zp))
    # not the aperture correction's error: every flux shares it and the zeropoint, fitted to
    # them, takes it (calibrated magnitudes are free of it; APCORR_E says it for the record)
    m5 = depth(zp)

    ra, dec = wcs.all_pix2world(x, y, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mag = zp - 2.5 * np.log10(flux)
        mag_err = 1.0857 / snr
    ref_id = np.full(len(x), -1, dtype=np.int64)
    ref_id[phot_idx] = phot_ref["id"]
    stars = Table({
        "source_id": np.arange(len(x), dtype=np.int64), "x": x, "y": y, "ra": ra, "dec": dec,
        "psf_flux": flux, "psf_flux_err": flux_err, "ap_flux": ap, "ap_flux_err": ap_err,
        "mag": mag, "mag_err": mag_err, "snr": snr, "saturated": saturated, "edge": edge,
        "blended": objs["blended"], "significance": objs["significance"], "ref_id": ref_id,
        "psf_used": np.isin(np.arange(len(x)), psf_stars.used if psf_stars else []),
        "psf_reserved": np.isin(np.arange(len(x)), psf_stars.reserved if psf_stars else []),
        # HSM sigma (pixels) of the data and of the model at the PSF stars: the visit's PSF
        # size over the focal plane (visit_psf.py)
        "psf_size": at_stars(len(x), psf_stars.used if psf_stars else [],
                             psf_stars.data_size if psf_stars else []),
        "psf_model_size": at_stars(len(x), psf_stars.used if psf_stars else [],
                                   psf_stars.model_size if psf_stars else []),
    })
    meta = exp.metadata.copy()
    for key, value, comment in [
        ("ZP", float(zp), "mag of 1 e- of PSF flux (flat-fielded)"),
        ("ZP_ERR", zp_err, "mag"),
        ("ZP_NSTAR", n_zp, "reference stars in the zeropoint"),
        ("PSF_FWHM", fwhm * PIXEL_SCALE, "arcsec"),
        ("FWHM_ERR", fwhm_err * PIXEL_SCALE, "arcsec, error of PSF_FWHM"),
        ("SKYBG", sky, "e- per pixel"),
        ("SKYNOISE", sky_noise, "e- per pixel"),
        ("BKG_ERR", crowding, "e- per pixel, blank sky after background"),
        ("NEA", nea, "pixels, noise-equivalent area of the PSF fluxes"),
        ("M5", m5, "5-sigma point-source depth"),
        ("NSOURCE", len(x), "detections at 5 sigma"),
        ("WCS_RMS", wcs_rms, "mas, reference match residual"),
        ("WCS_NREF", len(si), "reference stars in the astrometric fit"),
        ("PSFMODEL", psf_model, "PSF fluxes from: moffat | empirical"),
    ]:
        meta[key] = (value, comment)
    if psf_model == MOFFAT:
        if np.isfinite(apcorr):   # FITS headers hold no NaN; no bright star, no QA value
            meta["APCORR"] = (apcorr, "QA: 4-FWHM aperture / PSF flux, bright stars")
    else:
        meta["ZP"] = (float(zp), "mag of 1 e- of aperture-corrected PSF flux")
        for key, value, comment in [
            ("APCORR", apcorr, "applied: aperture / PSF-model flux, PSF stars"),
            ("APCORR_E", apcorr_err, "error of APCORR"),
            ("APRADIUS", APCORR_RADIUS, "pixels, the aperture fluxes are corrected to"),
            ("PSF_EMP", psf.empirical, "PSF fitted to the stars (else a Moffat)"),
            ("PSF_DEG", psf.degree, "polynomial degree of the PSF model over the CCD"),
            ("PSF_NFIT", len(psf_stars.used), "stars the PSF model was fitted to"),
            ("PSF_NRES", len(psf_stars.reserved), "reserved stars (PSF QA)"),
            ("PSF_KSIZ", size_response(psf), "PSF flux / true per model size / true")]:
            meta[key] = (value, comment)
        for key, resid, comment in (("PSF_DSIZ", psf_stars.size_resid, "size/size"),
                                    ("PSF_DE1", psf_stars.e1_resid, "e1"),
                                    ("PSF_DE2", psf_stars.e2_resid, "e2")):
            finite = resid[np.isfinite(resid)]
            if finite.size:   # FITS headers hold no NaN
                meta[key] = (float(np.sqrt(np.mean(finite ** 2))),
                             f"rms data-model {comment}, reserved")
    return Exposure(image=image, variance=exp.variance, mask=mask, wcs=wcs, metadata=meta,
                    psf=psf), stars


def at_stars(n: int, index, values) -> np.ndarray:
    """A column of n sources: `values` at `index`, NaN elsewhere."""
    column = np.full(n, np.nan)
    column[np.asarray(index, int)] = values
    return column


def empirical_photometry(image: np.ndarray, bkg_var: np.ndarray, variance: np.ndarray,
                         bad: np.ndarray, x: np.ndarray, y: np.ndarray, snr: np.ndarray,
                         clean: np.ndarray, first: np.ndarray, fwhm: float, ap_err: np.ndarray):
    """The empirical PSF model (psf_model.py), its stars, every source's flux and error from
    it corrected to APCORR_RADIUS (`ap_err`: each source's aperture flux error), and that
    correction with its error."""
    candidates, cand_moments = select_candidates(image, x, y, snr, clean, fwhm)
    psf, psf_stars = fit_pixel_psf(image, bkg_var, x, y, first, candidates, cand_moments, fwhm,
                                   image.shape[0])
    flux, flux_err = psf_flux(image, bkg_var, x, y, psf, variance=variance)
    used = psf_stars.used
    clean_ap = isolated_aperture_flux(image, bad, psf, x, y, flux, used)
    factor, error = aperture_correction(flux[used], flux_err[used], clean_ap, ap_err[used])
    return psf, psf_stars, flux * factor, flux_err * factor, factor, error


def isolated_aperture_flux(image: np.ndarray, bad: np.ndarray, psf, x: np.ndarray,
                           y: np.ndarray, flux: np.ndarray, stars: np.ndarray) -> np.ndarray:
    """Aperture fluxes (APCORR_RADIUS) of `stars` with every other detection's PSF model
    subtracted first (in the demo's crowded fields a neighbour inside 3" made the aperture
    correction 0.5-1% high), less the local background of that residual image in an annulus
    (APCORR_ANNULUS): the CCD's background holds the crowd's light, which made the 3"
    aperture lose 0.5% in r (-5 mmag of zeropoint, in crowded large-seeing CCDs)."""
    ix, iy, offs, prof = psf.stamps(x, y, psf.half)
    models = prof * np.where(np.isfinite(flux) & (flux > 0), flux, 0.0)[:, None, None]
    flat, inside = stamp_indices(ix, iy, offs, image.shape)
    scene = np.bincount(flat[inside], weights=models[inside], minlength=image.size)
    residual = image - scene.reshape(image.shape)
    ap, _, _ = sep.sum_circle(residual, x[stars], y[stars], APCORR_RADIUS, mask=bad, subpix=5,
                              bkgann=APCORR_ANNULUS)
    c = float(psf.half)
    for k, i in enumerate(stars):      # and the star's own model back
        ap[k] += sep.sum_circle(np.ascontiguousarray(models[i]), [c + x[i] - ix[i]],
                                [c + y[i] - iy[i]], APCORR_RADIUS, subpix=5)[0][0]
    return ap


def aperture_correction(flux: np.ndarray, flux_err: np.ndarray, ap: np.ndarray,
                        ap_err: np.ndarray) -> tuple[float, float]:
    """Aperture flux over PSF-model flux of the PSF stars: a weighted mean, clipped at 3
    robust sigma about the median (a neighbour the detection missed), and its error. The
    model holds the core; the aperture the wings it leaves out, as Rubin's calibFlux
    aperture does."""
    ratio = ap / flux
    err = np.abs(ratio) * np.hypot(ap_err / ap, flux_err / flux)
    ok = np.isfinite(ratio) & np.isfinite(err) & (err > 0)
    ratio, err = ratio[ok], err[ok]
    if ratio.size == 0:
        raise CalibrationError("no PSF star with an aperture flux for the aperture correction")
    centre = float(np.median(ratio))
    spread = 1.4826 * float(np.median(np.abs(ratio - centre)))
    keep = np.abs(ratio - centre) < 3 * np.maximum(err, spread)
    w = 1 / err[keep] ** 2
    mean = float(np.sum(w * ratio[keep]) / np.sum(w))
    # the formal error, scaled up when the stars scatter more than their errors say
    chi2_dof = float(np.sum(w * (ratio[keep] - mean) ** 2)) / max(keep.sum() - 1, 1)
    return mean, float(np.sqrt(max(chi2_dof, 1.0) / np.sum(w)))


def blank_sky(detected: np.ndarray, fwhm: float) -> np.ndarray:
    """Pixels 2 FWHM or more from every detected pixel (the wings of bright stars widen the
    footprints' reach): the sky a background or a noise level is measured on."""
    return ~maximum_filter(detected, size=int(4 * fwhm) | 1)


def background_crowding(image: np.ndarray, bad: np.ndarray, footprints: np.ndarray,
                        fwhm: float) -> float:
    """How uncertain the background under a star is (e- per pixel): the median of the blank
    sky (away from every detection, grown by 2 FWHM) after the background that PSF fluxes
    are measured against (over every good pixel) is subtracted. The truth lies between the
    two (the light of undetected stars and of the detected ones' wings, as much as lies
    under a star): measured against truth on both skies, r-band stars at S/N 15-30 come out
    +25 mmag faint against the first and -34 mmag bright against the second, bright stars
    within 1 mmag of both; the two differ by 0.3-0.45% of the sky in r, 0 if no sky is
    blank. (In u, whose 29 e- sky is far from Gaussian, the first is 1-3% low.)"""
    blank = ~bad & blank_sky(footprints, fwhm)
    if blank.sum() < 0.01 * blank.size:      # no blank sky to compare with: no term
        return 0.0
    return float(abs(np.median(image[blank])))


def weighted_zeropoint(zp_points: np.ndarray, ref_mag: np.ndarray, ref_err: np.ndarray,
                       zp0: float, noise_var: float) -> tuple[float, float, int]:
    """Inverse-variance weighted zeropoint with 3-sigma clipping (20 iterations at most).

    Errors are predicted from the reference magnitude, the first-pass zeropoint and the sky
    noise (noise_var = NEA x sky variance), never from the measured flux.
    """
    flux = 10 ** (-0.4 * (ref_mag - zp0))
    sigma = np.hypot(1.0857 * np.sqrt(flux + noise_var) / flux, ref_err)
    keep = np.ones(len(zp_points), bool)
    zp = zp0
    for _ in range(20):
        w = 1 / sigma[keep] ** 2
        zp = float(np.sum(w * zp_points[keep]) / np.sum(w))
        new = np.abs(zp_points - zp) < 3 * sigma
        if (new == keep).all() or new.sum() < MIN_ZP_STARS:
            break
        keep = new
    return zp, float(1 / np.sqrt(np.sum(1 / sigma[keep] ** 2))), int(keep.sum())


def _touches(mask: np.ndarray, x, y, plane: int, radius: float) -> np.ndarray:
    hit = (mask & plane) != 0
    if not hit.any():
        return np.zeros(len(x), bool)
    yy, xx = np.nonzero(hit)
    dist, _ = cKDTree(np.column_stack([xx, yy])).query(np.column_stack([x, y]))
    return dist < radius
