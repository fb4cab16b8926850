"""Step 2: global photometric calibration from repeated isolated stars (an übercal stand-in
for FGCM's fit cycle).

Model, per band: m_inst(i) + ZP(visit, detector) = m(star) for every observation i of an
isolated star, with m_inst = -2.5 log10(PSF flux in e-). Reference-catalog magnitudes enter as
priors on the star magnitudes (the gauge), the preliminary zeropoints as a loose prior on each
ZP (so a CCD cut off from every reference star still has a solution). The star magnitudes are
eliminated (Schur complement): the remaining system is dense in the zeropoints only, which
keeps thousands of ZPs fast (0.08 s for 900 ZPs / 438k observations vs 20-40 s with lsqr).

Observations are clipped (down to 3 sigma) and re-weighted with errors predicted from the model flux
(weights from measured fluxes favour stars that fluctuated up); stars with chi2/dof > 4
(variables) are dropped, and so are reference stars whose observed magnitude disagrees with the
catalog's (a blended neighbour: they set the gauge). As in step 1, a star whose flux the CCD's
background error moves by more than 0.5% is left out (with every star in, the demo's zeropoints
came out 1-2 mmag low in every band but u). 10% of the stars, chosen by a hash of their ID,
are reserved: they never enter the fit and measure the repeatability it reaches.

Then FGCM's physical model: ZP = visit term (atmosphere) + detector term (superstar flat) +
a per-CCD gray part. The free zeropoints fix the two terms and tau, the gray scatter beyond
their errors; a last solve has each ZP's prior at the model with width tau. A CCD with few
stars (u: ~30 on a 512-px CCD, 5 mmag free) then borrows from the model what its stars lack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table, vstack
from scipy import sparse
from scipy.linalg import cho_factor, cho_solve

from drp_flows.tasks.calibrate import CROWDING_FLUX_LIMIT, MIN_SAFE_ZP_STARS

CLIP_SIGMA = 3.0
MAX_STAR_CHI2 = 4.0        # reduced chi2 above which a star is dropped (a variable)
SYS_FLOOR = 0.002          # mag, added in quadrature per observation (flat-field noise)
ZP_PRIOR_SIGMA = 0.5       # mag, loose prior on each ZP around its single-frame value
GRAY_FLOOR = 0.001         # mag, least per-CCD scatter about the visit + detector model
MIN_MODEL_DOF = 10
RESERVED_FRACTION = 0.1
CLIP_SCHEDULE = (np.inf, 10.0, 5.0, CLIP_SIGMA, CLIP_SIGMA)
PA1_SNR = 200.0            # SRD: PA1 from bright stars


@dataclass
class BandSolution:
    zeropoints: Table      # visit, detector, band, zero_point, zero_point_err, n_obs, n_star
    stars: Table           # tract, isolated_star_id, band, mag, mag_err, n_obs, reserved, variable, ref_mag


def reserved(tract: np.ndarray, star_id: np.ndarray, fraction: float = RESERVED_FRACTION) -> np.ndarray:
    """Deterministic reserve flag (Knuth multiplicative hash), the same wherever it is run."""
    key = (np.asarray(tract, np.uint64) << np.uint64(32)) + np.asarray(star_id, np.uint64)
    h = (key * np.uint64(2654435761)) % np.uint64(2 ** 32)
    return h < np.uint64(int(fraction * 2 ** 32))


def schur_solve(z: np.ndarray, s: np.ndarray, y: np.ndarray, w: np.ndarray, n_z: int, n_s: int,
                prior_mag: np.ndarray, prior_w: np.ndarray, zp0: np.ndarray, zp_w: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of y_i + ZP[z_i] - m[s_i] with priors on m and ZP, star magnitudes
    eliminated. Returns (ZP, ZP error, m)."""
    c = sparse.csr_matrix((w, (z, s)), shape=(n_z, n_s))          # C[z, s] = sum of w
    d = np.bincount(z, w, n_z) + zp_w
    a_ss = np.bincount(s, w, n_s) + prior_w
    b_z = -np.bincount(z, w * y, n_z) + zp_w * zp0
    b_s = np.bincount(s, w * y, n_s) + prior_w * prior_mag
    inv_a = np.divide(1.0, a_ss, out=np.zeros(n_s), where=a_ss > 0)   # unconstrained stars: out
    schur = np.diag(d) - (c @ sparse.diags(inv_a) @ c.T).toarray()
    factor = cho_factor(schur)
    zp = cho_solve(factor, b_z + c @ (b_s * inv_a))
    zp_err = np.sqrt(np.diag(cho_solve(factor, np.eye(n_z))))
    mag = (b_s + c.T @ zp) * inv_a
    return zp, zp_err, mag


def least_squares_system(z: np.ndarray, s: np.ndarray, y: np.ndarray, w: np.ndarray, n_z: int,
                         n_s: int, prior_mag: np.ndarray, prior_w: np.ndarray, zp0: np.ndarray,
                         zp_w: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray]:
    """The same problem as `schur_solve` as one sparse weighted system A [ZP, m] = b, for
    checking it and measuring what the elimination saves (iterative solvers such as lsqr)."""
    rows = np.arange(len(y))
    a = sparse.csr_matrix((np.r_[np.ones(len(y)), -np.ones(len(y))],
                           (np.r_[rows, rows], np.r_[z, n_z + s])), shape=(len(y), n_z + n_s))
    a = sparse.vstack([sparse.diags(np.sqrt(w)) @ a,
                       sparse.csr_matrix((np.sqrt(prior_w), (np.arange(n_s), n_z + np.arange(n_s))),
                                         shape=(n_s, n_z + n_s)),
                       sparse.csr_matrix((np.sqrt(zp_w), (np.arange(n_z), np.arange(n_z))),
                                         shape=(n_z, n_z + n_s))]).tocsr()
    return a, np.r_[-np.sqrt(w) * y, np.sqrt(prior_w) * prior_mag, np.sqrt(zp_w) * zp0]


def repeated_observations(rng: np.random.Generator, n_visit: int, n_detector: int, n_star: int,
                          per_star: int, sky_var: float = 2000.0, mags: tuple = (16.0, 21.0),
                          ref_every: int = 3) -> tuple[Table, Table, np.ndarray, np.ndarray]:
    """A catalogue-level survey for step 2 at any scale without images: random CCDs (50 mmag
    zeropoint scatter) observe stars `per_star` times with photon and sky noise; every
    `ref_every`-th star is in a 10 mmag reference catalog. Returns (observations, refcat,
    true zeropoints by visit * n_detector + detector, true magnitudes)."""
    n_z = n_visit * n_detector
    true_zp = 31.0 + rng.normal(0, 0.05, n_z)
    true_mag = rng.uniform(*mags, n_star)
    z = rng.integers(0, n_z, n_star * per_star)
    s = np.repeat(np.arange(n_star), per_star)
    flux = 10 ** (-0.4 * (true_mag[s] - true_zp[z]))
    flux_err = np.sqrt(flux + sky_var)
    measured = flux + rng.normal(0, flux_err)
    obs = Table({"visit": z // n_detector, "detector": z % n_detector, "band": np.full(len(s), "r"),
                 "tract": np.zeros(len(s), int), "isolated_star_id": s, "psf_flux": measured,
                 "psf_flux_err": flux_err, "snr": measured / flux_err,
                 "ref_id": np.where(s % ref_every == 0, s, -1)})
    ref = Table({"id": np.arange(n_star), "r_mag": true_mag + rng.normal(0, 0.01, n_star),
                 "r_magErr": np.full(n_star, 0.01)})
    return obs, ref, true_zp, true_mag


def zeropoint_model(ccd_keys: np.ndarray, zp: np.ndarray, zp_err: np.ndarray
                    ) -> tuple[np.ndarray, float] | None:
    """Per-visit plus per-detector zeropoints fitted to the free per-CCD ones, and tau, the
    per-CCD scatter about them beyond the formal errors (moments, floored at GRAY_FLOOR).

    None when the model has too few degrees of freedom to measure tau (fewer than
    MIN_MODEL_DOF CCDs beyond its parameters).
    """
    _, v = np.unique(ccd_keys[:, 0], return_inverse=True)
    _, d = np.unique(ccd_keys[:, 1], return_inverse=True)
    n_v, n = v.max() + 1, len(zp)
    x = np.zeros((n, n_v + d.max() + 1))
    x[np.arange(n), v.ravel()] = 1
    x[np.arange(n), n_v + d.ravel()] = 1
    rank = np.linalg.matrix_rank(x)
    if n - rank < MIN_MODEL_DOF:
        return None
    tau2 = GRAY_FLOOR ** 2
    for _ in range(10):
        sw = 1 / np.sqrt(zp_err ** 2 + tau2)
        coef = np.linalg.lstsq(x * sw[:, None], zp * sw, rcond=None)[0]
        resid = zp - x @ coef
        new = max(GRAY_FLOOR ** 2, np.sum(resid ** 2) / (n - rank) - np.mean(zp_err ** 2))
        if abs(new - tau2) < 1e-4 * tau2:
            break
        tau2 = new
    return x @ coef, float(np.sqrt(tau2))


def crowding_safe(z: np.ndarray, s: np.ndarray, y: np.ndarray, zp0: np.ndarray,
                  bias_flux: np.ndarray, candidates: np.ndarray, ref_mag: np.ndarray
                  ) -> np.ndarray:
    """The observations whose flux the CCD's background error (`bias_flux`, e-: NEA x
    BKG_ERR, calibrate.background_crowding) moves by less than CROWDING_FLUX_LIMIT, step 1's
    rule for its zeropoint stars; a CCD with fewer than MIN_SAFE_ZP_STARS of them keeps all.
    A star's flux is predicted from its reference magnitude (`ref_mag`, NaN: none), else its
    mean single-frame one: a cut on measured fluxes keeps the stars that fluctuated up, and on
    a star tied to the reference catalog that moves the zeropoints."""
    n_s, n_z = len(ref_mag), len(zp0)
    mag = np.bincount(s, zp0[z] + y, n_s) / np.maximum(np.bincount(s, minlength=n_s), 1)
    mag = np.where(np.isfinite(ref_mag), ref_mag, mag)
    safe = 10 ** (-0.4 * (mag[s] - zp0[z])) * CROWDING_FLUX_LIMIT > bias_flux[z]
    starved = np.bincount(z, safe & candidates, n_z) < MIN_SAFE_ZP_STARS
    return candidates & (safe | starved[z])


def solve_band(obs: Table, ref: Table, band: str, prelim: dict[tuple, float],
               bias_flux: dict[tuple, float] | None = None,
               sys_floor: float = SYS_FLOOR) -> BandSolution:
    """Zeropoints of one band's CCDs from its isolated-star observations; `prelim`: their
    single-frame zeropoints, `bias_flux`: the flux their background's error moves a PSF flux by
    (e-; none: 0)."""
    obs = obs[(obs["psf_flux"] > 0) & np.isfinite(obs["psf_flux_err"])]
    ccd_keys, z = np.unique(np.column_stack([obs["visit"], obs["detector"]]), axis=0,
                            return_inverse=True)
    star_keys, s = np.unique(np.column_stack([obs["tract"], obs["isolated_star_id"]]), axis=0,
                             return_inverse=True)
    z, s = z.ravel(), s.ravel()
    n_z, n_s = len(ccd_keys), len(star_keys)
    flux, flux_err = np.asarray(obs["psf_flux"], float), np.asarray(obs["psf_flux_err"], float)
    y = -2.5 * np.log10(flux)
    is_reserved = reserved(star_keys[:, 0], star_keys[:, 1])

    # reference magnitude per star: the refcat star its sources matched most often
    prior_mag, prior_w = np.zeros(n_s), np.zeros(n_s)
    matched = np.asarray(obs["ref_id"]) >= 0
    pairs, counts = np.unique(np.column_stack([s[matched], np.asarray(obs["ref_id"])[matched]]),
                              axis=0, return_counts=True)
    order = np.lexsort((-counts, pairs[:, 0]))
    first = order[np.r_[True, np.diff(pairs[order, 0]) != 0]] if len(order) else order
    ref_sorted = np.argsort(ref["id"])
    k = np.searchsorted(ref["id"], pairs[first, 1], sorter=ref_sorted)
    k = ref_sorted[np.minimum(k, len(ref) - 1)]
    found = np.asarray(ref["id"])[k] == pairs[first, 1]
    star = pairs[first, 0][found]
    prior_mag[star] = np.asarray(ref[f"{band}_mag"])[k[found]]
    prior_w[star] = 1.0 / np.asarray(ref[f"{band}_magErr"])[k[found]] ** 2
    zp0 = np.array([prelim.get((int(v), int(d)), np.nan) for v, d in ccd_keys])
    zp0 = np.where(np.isfinite(zp0), zp0, np.nanmedian(zp0) if np.isfinite(zp0).any() else 0.0)
    zp_w = np.full(n_z, 1 / ZP_PRIOR_SIGMA ** 2)

    sigma = np.hypot(1.0857 * flux_err / flux, sys_floor)
    bias = np.array([(bias_flux or {}).get((int(v), int(d)), 0.0) for v, d in ccd_keys])
    fitted = crowding_safe(z, s, y, zp0, bias, ~is_reserved[s],
                           np.where(prior_w > 0, prior_mag, np.nan))
    use, variable, anchored = fitted, np.zeros(n_s, bool), prior_w > 0

    def solve():
        nonlocal sigma
        keep = use & ~variable[s]
        result = schur_solve(z[keep], s[keep], y[keep], 1 / sigma[keep] ** 2, n_z, n_s,
                             prior_mag, prior_w * anchored * ~variable, zp0, zp_w)
        zp, _, mag = result
        sigma = np.hypot(1.0857 * flux_err / np.maximum(10 ** (-0.4 * (mag[s] - zp[z])), 1e-3),
                         sys_floor)
        # each reference star's magnitude from its observations alone against the catalog's
        w = np.where(keep, 1 / sigma ** 2, 0.0)
        obs_w = np.bincount(s, w, n_s)
        own = np.bincount(s, w * (y + zp[z]), n_s) / np.maximum(obs_w, 1e-30)
        ref_pull = np.where((obs_w > 0) & (prior_w > 0), (own - prior_mag) / np.sqrt(
            1 / np.maximum(prior_w, 1e-30) + 1 / np.maximum(obs_w, 1e-30)), 0.0)
        return result, (y + zp[z] - mag[s]) / sigma, ref_pull

    # clip outliers with a shrinking threshold, so a few variables cannot drag the first
    # solution far enough for good stars to be clipped; then drop the variables and re-fit.
    # Reference stars are clipped alike: one measured brighter than the catalog in every
    # visit (a neighbour blended in) pulls every zeropoint with it, the gauge itself (g: 2% of
    # them are 50-100 mmag bright, and the zeropoints came out +1 mmag)
    for threshold in CLIP_SCHEDULE:
        (zp, zp_err, mag), pull, ref_pull = solve()
        use = fitted & (np.abs(pull) < threshold)
        anchored = (prior_w > 0) & (np.abs(ref_pull) < threshold)
    chi2 = np.bincount(s, np.where(fitted, pull ** 2, 0), n_s)
    dof = np.bincount(s, fitted, n_s) - 1
    variable = (dof >= 2) & (chi2 / np.maximum(dof, 1) > MAX_STAR_CHI2)
    for _ in range(2):
        (zp, zp_err, mag), pull, ref_pull = solve()
        use = fitted & (np.abs(pull) < CLIP_SIGMA)
        anchored = (prior_w > 0) & (np.abs(ref_pull) < CLIP_SIGMA)
    # FGCM's physical model: a per-visit (atmosphere) plus a per-detector (superstar flat)
    # term, the free per-CCD part shrunk towards it by its measured scatter
    model = zeropoint_model(ccd_keys, zp, zp_err)
    if model is not None:
        zp0, zp_w = model[0], np.full(n_z, 1 / model[1] ** 2)
        (zp, zp_err, mag), pull, _ = solve()

    # reserved stars and variables: magnitudes from the fitted zeropoints alone
    w = 1 / sigma ** 2
    out = is_reserved | variable
    mean = np.bincount(s, w * (y + zp[z]), n_s) / np.maximum(np.bincount(s, w, n_s), 1e-30)
    mag[out] = mean[out]
    keep = use & ~variable[s]
    ccd_star = np.unique(np.column_stack([z[keep], s[keep]]), axis=0)
    zeropoints = Table({"visit": ccd_keys[:, 0], "detector": ccd_keys[:, 1],
                        "band": np.full(n_z, band), "zero_point": zp, "zero_point_err": zp_err,
                        "n_obs": np.bincount(z[keep], minlength=n_z),
                        "n_star": np.bincount(ccd_star[:, 0], minlength=n_z)})
    stars = Table({"tract": star_keys[:, 0], "isolated_star_id": star_keys[:, 1],
                   "band": np.full(n_s, band), "mag": mag,
                   "mag_err": 1 / np.sqrt(np.maximum(np.bincount(s, w, n_s), 1e-30)),
                   "n_obs": np.bincount(s, minlength=n_s), "reserved": is_reserved, "variable": variable,
                   "ref_mag": np.where(prior_w > 0, prior_mag, np.nan)})
    return BandSolution(zeropoints, stars)


def fit_cycle(sources: list[Table], ref: Table, summaries: list[Table]) -> tuple[Table, Table]:
    """All bands of a campaign: (zeropoints per CCD, standard stars)."""
    obs = vstack([t for t in sources if len(t)], metadata_conflicts="silent")
    summary = vstack(summaries, metadata_conflicts="silent")
    keys = [(int(v), int(d)) for v, d in zip(summary["visit"], summary["detector"], strict=True)]
    prelim = dict(zip(keys, np.asarray(summary["zero_point"], float), strict=True))
    # the flux each CCD's background error moves a PSF flux by (a header without it: 0)
    taken = np.asarray(summary["nea"], float) * np.asarray(summary["background_err"], float)
    bias_flux = dict(zip(keys, np.nan_to_num(taken), strict=True))
    zps, stars = [], []
    for band in sorted(set(obs["band"])):
        sol = solve_band(obs[obs["band"] == band], ref, band, prelim, bias_flux)
        sol.zeropoints.meta = {}
        zps.append(sol.zeropoints)
        stars.append(sol.stars)
    zeropoints, standard = vstack(zps), vstack(stars)
    fitted = {(int(v), int(d)) for v, d in zip(zeropoints["visit"], zeropoints["detector"], strict=True)}
    missing = [r for r in summary if (int(r["visit"]), int(r["detector"])) not in fitted]
    zeropoints["status"] = "fit"
    if missing:   # CCDs without isolated stars keep their single-frame zeropoint, flagged
        extra = Table({"visit": [r["visit"] for r in missing], "detector": [r["detector"] for r in missing],
                       "band": [r["band"] for r in missing],
                       "zero_point": [r["zero_point"] for r in missing],
                       "zero_point_err": [r["zero_point_err"] for r in missing],
                       "n_obs": np.zeros(len(missing), int), "n_star": np.zeros(len(missing), int),
                       "status": ["single_frame"] * len(missing)})
        zeropoints = vstack([zeropoints, extra])
    zeropoints.sort(["visit", "detector"])
    return zeropoints, standard


def calibrated_mag_err(snr: np.ndarray, zp_err: np.ndarray, sys_floor: float = SYS_FLOOR) -> np.ndarray:
    """Error of a calibrated magnitude: photon noise, the zeropoint's error and the per-
    observation systematic floor that the fit itself assumes (as FGCM's error model)."""
    return np.sqrt((1.0857 / np.asarray(snr, float)) ** 2 + np.asarray(zp_err, float) ** 2 + sys_floor ** 2)


def repeatability(obs: Table, zeropoints: Table, min_snr: float = PA1_SNR,
                  sys_floor: float = SYS_FLOOR) -> dict:
    """PA1 per band: the median over bright stars of the rms of their calibrated magnitudes,
    and the chi2/dof of the same repeats normalised by their calibrated-magnitude errors. A
    few variable stars would own a summed chi2, so stars beyond chi2/dof = 25 (a 5-sigma
    star) are counted, not summed."""
    row_of = {(int(v), int(d)): k for k, (v, d) in
              enumerate(zip(zeropoints["visit"], zeropoints["detector"], strict=True))}
    zp = np.append(np.asarray(zeropoints["zero_point"], float), np.nan)    # [-1]: no zeropoint
    zp_err = np.append(np.asarray(zeropoints["zero_point_err"], float), np.nan)
    out = {}
    for band in sorted(set(obs["band"])):
        o = obs[(obs["band"] == band) & (obs["snr"] >= min_snr)]
        if not len(o):
            continue
        k = np.array([row_of.get((int(v), int(d)), -1)
                      for v, d in zip(o["visit"], o["detector"], strict=True)])
        mag = zp[k] - 2.5 * np.log10(np.asarray(o["psf_flux"], float))
        err = calibrated_mag_err(o["snr"], zp_err[k], sys_floor)
        _, s = np.unique(np.column_stack([o["tract"], o["isolated_star_id"]]), axis=0, return_inverse=True)
        s = s.ravel()
        n = np.bincount(s)
        good = n[s] >= 2
        if not good.any():
            continue
        w = 1 / err ** 2
        mean_w = np.bincount(s, w * mag) / np.bincount(s, w)
        mean = np.bincount(s, mag) / n
        rms = np.sqrt(np.bincount(s, (mag - mean[s]) ** 2) / np.maximum(n - 1, 1))
        chi2 = np.bincount(s, ((mag - mean_w[s]) / err) ** 2)
        multi = n >= 2
        steady = multi & (chi2 / np.maximum(n - 1, 1) <= 25)
        out[band] = {"pa1_mmag": float(np.median(rms[multi]) * 1000),
                     "chi2_dof": float(chi2[steady].sum() / max((n[steady] - 1).sum(), 1)),
                     "n_star": int(multi.sum()), "n_outlier": int((multi & ~steady).sum())}
    return out
