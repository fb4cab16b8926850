"""Science QA of step 1 against the simulation's truth (SCIENCE.md validation targets).

- WCS: the fitted WCS evaluated at the true pixel positions of bright (S/N >= 50) reference
  stars, against their true sky positions; rms in mas (target <= 10).
- Zeropoint: calibrated zeropoint minus the true one per CCD; rms in mmag (target <= 10).
- Completeness: fraction of isolated true stars (no brighter star within 2.5 FWHM: depth, not
  crowding) detected vs magnitude relative to each CCD's m5; 50% should be at m5 +- 0.1 mag.
- WCS and zeropoint per band too (the worst band against the same targets), and the PSF QA of
  validation/qa_psf.py per band: the empirical model against the true PSF at reserved stars,
  bright stars' magnitudes against their true total ones, their gradient across a CCD, and
  galaxies among the PSF stars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from lsst.daf.butler import Butler
from scipy.spatial import cKDTree

from drp_flows.sites.butler import open_dataset_file
from drp_flows.tasks.camera import INSTRUMENT, PIXEL_SCALE
from drp_flows.tasks.global_calib import SYS_FLOOR, repeatability
from drp_flows.tasks.isolated_stars import chord, unit_vectors
from drp_flows.tasks.psf_model import PixelPsf
from drp_flows.tasks.skymap import header_wcs
from drp_flows.validation import qa_psf
from drp_flows.validation.simulate import load_survey, star_mags

TARGETS = {"wcs_rms_mas": 10.0, "am1_mas": 10.0, "zp_rms_mmag": 10.0, "completeness50_offset_mag": 0.1,
           # a reported zeropoint error may understate the truth's scatter by 2x at most
           "zp_pull_rms": 2.0,
           "global_zp_rms_mmag": 2.0, "global_zp_u_rms_mmag": 3.0, "pa1_gri_mmag": 5.0,
           "pa1_uzy_mmag": 7.5, "pa1_chi2": (0.8, 1.3)}
BRIGHT_SNR = 50.0
AM1_ANNULUS_ARCMIN = 5.0   # SRD; 1' when the camera's footprint is under three times that
MAG_BINS = np.arange(-3.0, 1.51, 0.1)


def check(metric: str, value: float, unit: str, target: str, ok: bool) -> dict:
    return {"metric": metric, "value": float(value), "unit": unit, "target": target,
            "pass": bool(ok)}


@dataclass
class Step1QA:
    name = "step 1: single-frame calibration"
    n_ccd: int = 0
    wcs_rms_mas: float = float("nan")
    zp_rms_mmag: float = float("nan")
    zp_mean_mmag: float = float("nan")
    completeness50_offset_mag: float = float("nan")
    per_ccd: Table = field(default_factory=Table)
    completeness: dict = field(default_factory=dict)
    am1: dict = field(default_factory=dict)
    psf: dict = field(default_factory=dict)     # band -> qa_psf.band_psf_qa's figures
    flux_fraction: dict = field(default_factory=dict)   # (visit, detector) -> ccd_flux_fraction

    def checks(self) -> list[dict]:
        return [
            check("single-frame WCS vs truth (bright stars, rms)", self.wcs_rms_mas, "mas",
                  f"<= {TARGETS['wcs_rms_mas']}", self.wcs_rms_mas <= TARGETS["wcs_rms_mas"]),
            check("single-frame zeropoint vs truth (rms)", self.zp_rms_mmag, "mmag",
                  f"<= {TARGETS['zp_rms_mmag']}", self.zp_rms_mmag <= TARGETS["zp_rms_mmag"]),
            check("50% completeness (isolated stars) minus m5", self.completeness50_offset_mag,
                  "mag", f"within +-{TARGETS['completeness50_offset_mag']}",
                  abs(self.completeness50_offset_mag) <= TARGETS["completeness50_offset_mag"]),
        ] + ([self._am1_check()] if self.am1 else []) + self._band_checks()

    def _band_checks(self) -> list[dict]:
        """Each metric's worst band against its target, every band's value in the metric."""
        if not len(self.per_ccd):
            return []
        per = self.per_ccd
        bands = sorted(set(per["band"]))
        wcs = {b: float(np.sqrt(per["wcs_sq_sum"][per["band"] == b].sum()
                                / max(per["wcs_n"][per["band"] == b].sum(), 1))) for b in bands}
        zp = {b: float(np.sqrt(np.mean(per["zp_err_mmag"][per["band"] == b] ** 2))) for b in bands}
        # honest errors: the error against the truth over the error calibrate reported
        pull = {b: float(np.sqrt(np.mean((per["zp_err_mmag"] / per["zp_reported_mmag"])
                                         [per["band"] == b] ** 2))) for b in bands}
        rows = [("single-frame WCS vs truth (rms)", wcs, "mas", 1.0, TARGETS["wcs_rms_mas"]),
                ("single-frame zeropoint vs truth (rms)", zp, "mmag", 1.0, TARGETS["zp_rms_mmag"]),
                ("single-frame zeropoint vs truth over its reported error (rms)", pull, "", 1.0,
                 TARGETS["zp_pull_rms"])]
        t = qa_psf.TARGETS
        if self.psf:
            psf = self.psf
            rows += [
                ("PSF model size vs true PSF at reserved stars (rms)",
                 {b: v["psf_size"] for b, v in psf.items()}, "%", 100.0, t["psf_size"]),
                ("PSF model e1, e2 vs true PSF at reserved stars (rms)",
                 {b: v["psf_e"] for b, v in psf.items()}, "x 1e-3", 1e3, t["psf_e"]),
                (f"PSF magnitude - true total, S/N >= {qa_psf.BRIGHT_SNR:g} stars (|median|)",
                 {b: abs(v["psf_mag_mmag"]) for b, v in psf.items()}, "mmag", 1.0, t["psf_mag_mmag"]),
                ("PSF magnitude residual, change corner to corner of a CCD (rms)",
                 {b: v["gradient_mmag"] for b, v in psf.items()}, "mmag", 1.0, t["gradient_mmag"]),
                ("galaxies among the PSF model's stars",
                 {b: v["galaxy_fraction"] for b, v in psf.items()}, "%", 100.0, t["galaxy_fraction"])]
        out = []
        for metric, values, unit, scale, target in rows:
            finite = {b: v for b, v in values.items() if np.isfinite(v)}
            worst = max(finite, key=finite.get) if finite else None
            listed = ", ".join(f"{b} {scale * v:.2f}" for b, v in values.items())
            value = finite[worst] if worst else float("nan")
            out.append(check(f"{metric}, worst band ({listed})", scale * value, unit,
                             f"<= {scale * target:g}", value <= target))
        return out

    def _am1_check(self) -> dict:
        a = self.am1
        scaled = "; annulus scaled from 5' to fit the small camera" if a["annulus_arcmin"] < 5 else ""
        return check(f"AM1: separation repeatability, r and i stars of 17-21.5 mag, pairs "
                     f"{a['annulus_arcmin']:g}' +- 20% apart ({a['n_pairs']} pairs{scaled})",
                     a["am1_mas"], "mas", f"<= {TARGETS['am1_mas']}", a["am1_mas"] <= TARGETS["am1_mas"])

    def summary(self) -> dict:
        return {"n_ccd": self.n_ccd, "zp_mean_mmag": self.zp_mean_mmag,
                "completeness": self.completeness, "am1": self.am1, "psf": self.psf}

    def plot(self, plt, out: Path) -> str | None:
        if not len(self.per_ccd):
            return None
        fig, ax = plt.subplots(1, 3, figsize=(15, 4))
        for band in sorted(set(self.per_ccd["band"])):
            sel = self.per_ccd["band"] == band
            ax[0].hist(self.per_ccd["zp_err_mmag"][sel], bins=20, histtype="step", label=band)
            ax[1].scatter(self.per_ccd["psf_fwhm"][sel], self.per_ccd["wcs_rms_mas"][sel], s=8, label=band)
        ax[0].set(xlabel="zeropoint - truth (mmag)", ylabel="CCDs", title="Single-frame zeropoint")
        ax[1].set(xlabel="PSF FWHM (arcsec)", ylabel="WCS rms vs truth (mas)", title="Astrometry")
        ax[0].legend()
        ax[1].legend()
        ax[2].plot(self.completeness["dm"], self.completeness["fraction"], "o-")
        ax[2].axvline(0, color="k", ls=":")
        ax[2].axhline(0.5, color="k", ls=":")
        ax[2].set(xlabel="true mag - m5", ylabel="fraction detected", title="Completeness")
        fig.tight_layout()
        fig.savefig(out / "step1_qa.png", dpi=80)
        plt.close(fig)
        return "step1_qa.png"


@lru_cache(maxsize=2)
def _truth(survey: Path):
    """Truth rows by (visit, detector), the visits and the stars (sorted by id); read once per
    survey, so callers must not change them."""
    ccd = Table.read(survey / "truth" / "ccd_visits.parquet")
    visits = Table.read(survey / "truth" / "visits.parquet")
    stars = Table.read(survey / "truth" / "stars.parquet")
    stars.sort("id")
    return {(int(r["visit"]), int(r["detector"])): r for r in ccd}, visits, stars


def true_zeropoint(truth_row, flux_fraction: float) -> float:
    """The true zeropoint on the scale of the CCD's fluxes, which measure `flux_fraction` of a
    star's total (`ccd_flux_fraction`)."""
    return float(truth_row["zp_true"]) + 2.5 * float(np.log10(flux_fraction))


def ccd_flux_fraction(psf: PixelPsf | None, header: fits.Header, camera, detector: int,
                      psf_field: str, seeing: float) -> float:
    """What a CCD's fluxes (`header`: its calibrate keys) measure of a star's total flux: the
    empirical model's PSF flux times the aperture correction applied, or the Moffat's PSF
    flux, of the FWHM fitted (qa_psf.psf_flux_fraction). A zeropoint is right when it makes
    point sources' magnitudes right; a Moffat 0.2% too wide (u: a visit's FWHM from a few dozen
    stars) gives fluxes 0.2% high, and a zeropoint 2 mmag high that calibrates them right."""
    if psf is not None:
        return qa_psf.psf_flux_fraction(psf, camera, detector, psf_field, seeing) * float(header["APCORR"])
    return qa_psf.psf_flux_fraction(float(header["PSF_FWHM"]) / PIXEL_SCALE, camera, detector,
                                    psf_field, seeing)


def ccd_qa(image_header: fits.Header, primary: fits.Header, stars: Table, truth_row,
           truth_stars: Table, band: str, mjd: float, n: int, flux_fraction: float
           ) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of one CCD; also (true mag - m5, detected?) for the truth stars on it."""
    fitted, true_wcs = header_wcs(image_header), header_wcs(fits.Header.fromstring(truth_row["wcs"]))
    bright = stars[(stars["snr"] >= BRIGHT_SNR) & (stars["ref_id"] >= 0)]
    idx = np.searchsorted(truth_stars["id"], bright["ref_id"])
    ts = truth_stars[idx]
    tx, ty = true_wcs.all_world2pix(np.asarray(ts["ra"]), np.asarray(ts["dec"]), 0)
    fra, fdec = fitted.all_pix2world(tx, ty, 0)
    dra = (fra - ts["ra"]) * np.cos(np.radians(ts["dec"])) * 3.6e6
    ddec = (fdec - ts["dec"]) * 3.6e6
    sq = np.asarray(dra ** 2 + ddec ** 2)

    ax, ay = true_wcs.all_world2pix(np.asarray(truth_stars["ra"]), np.asarray(truth_stars["dec"]), 0)
    margin = 3 / PIXEL_SCALE  # stay off the edges, where detection is flagged
    on = (ax > margin) & (ax < n - 1 - margin) & (ay > margin) & (ay < n - 1 - margin)
    near = (ax > -margin) & (ax < n + margin) & (ay > -margin) & (ay < n + margin)
    all_mags = star_mags(truth_stars, band, mjd)
    on &= _isolated(ax, ay, all_mags, near, 2.5 * primary["PSF_FWHM"] / PIXEL_SCALE)
    mags = all_mags[on]
    found = np.zeros(on.sum(), bool)
    if len(stars):
        dist, _ = cKDTree(np.column_stack([stars["x"], stars["y"]])).query(
            np.column_stack([ax[on], ay[on]]))
        found = dist < 2.0
    row = {"visit": truth_row["visit"], "detector": truth_row["detector"], "band": band,
           "zp_err_mmag": (primary["ZP"] - true_zeropoint(truth_row, flux_fraction)) * 1000,
           "zp_reported_mmag": primary["ZP_ERR"] * 1000,
           "wcs_sq_sum": float(sq.sum()), "wcs_n": int(sq.size),
           "wcs_rms_mas": float(np.sqrt(sq.mean())) if sq.size else np.nan,
           "m5": primary["M5"], "psf_fwhm": primary["PSF_FWHM"]}
    return row, np.asarray(mags - primary["M5"]), found


def _isolated(x, y, mags, near, radius: float) -> np.ndarray:
    """Stars with no brighter star within radius (pixels)."""
    iso = np.zeros(len(x), bool)
    idx = np.flatnonzero(near)
    tree = cKDTree(np.column_stack([x[idx], y[idx]]))
    for k, neighbours in zip(idx, tree.query_ball_point(np.column_stack([x[idx], y[idx]]), radius),
                             strict=True):
        iso[k] = not any(mags[idx[j]] < mags[k] for j in neighbours if idx[j] != k)
    return iso


def step1_qa(butlers: list[Butler], collection: str, survey: Path) -> Step1QA:
    """QA over the step-1 outputs in `collection` of every given site Butler."""
    truth_ccd, visits, truth_stars = _truth(survey)
    mjd = {int(v["visit"]): float(v["mjd"]) for v in visits}
    seeing = {int(v["visit"]): float(v["seeing"]) for v in visits}
    camera = load_survey(survey)[0].camera
    galaxy_path = survey / "truth" / "galaxies.parquet"
    galaxies = Table.read(galaxy_path) if galaxy_path.exists() else None
    rows, dm_all, found_all, psf_ccds, fractions = [], [], [], [], {}
    for butler in butlers:
        # each site's own CCDs: a boundary visit's images moved to a neighbour count at home
        own = {int(r.dataId["visit"]) for r in butler.registry.queryDatasets(
            "single_visit_star", collections=collection, instrument=INSTRUMENT, findFirst=True)}
        refs = butler.registry.queryDatasets("preliminary_visit_image", collections=collection,
                                             instrument=INSTRUMENT, findFirst=True)
        stars_by_visit: dict[int, Table] = {}
        for ref in sorted(refs, key=lambda r: (r.dataId["visit"], r.dataId["detector"])):
            visit, detector = int(ref.dataId["visit"]), int(ref.dataId["detector"])
            if visit not in own:
                continue
            with open_dataset_file(butler, ref) as f:
                hdul = fits.open(f, lazy_load_hdus=True)
                primary, image_header = hdul[0].header.copy(), hdul["IMAGE"].header.copy()
                psf = PixelPsf.from_hdu(hdul["PSF"]) if "PSF" in hdul else None
            if visit not in stars_by_visit:
                stars_by_visit[visit] = butler.get("single_visit_star", instrument=INSTRUMENT,
                                                   visit=visit, collections=collection)
            vs = stars_by_visit[visit]
            stars = vs[vs["detector"] == detector]
            truth_row = truth_ccd[(visit, detector)]
            psf_field = str(truth_row["psf_field"]) if "psf_field" in truth_row.colnames else ""
            fractions[(visit, detector)] = ccd_flux_fraction(psf, primary, camera, detector,
                                                             psf_field, seeing[visit])
            row, dm, found = ccd_qa(image_header, primary, stars, truth_row, truth_stars,
                                    primary["BAND"], mjd[visit], int(image_header["NAXIS1"]),
                                    fractions[(visit, detector)])
            rows.append(row)
            dm_all.append(dm)
            found_all.append(found)
            if psf is not None:
                psf_ccds.append(qa_psf.ccd_psf_qa(psf, stars, truth_stars, galaxies, camera,
                                                  detector, psf_field, seeing[visit],
                                                  primary["BAND"], mjd[visit]))
    qa = Step1QA(n_ccd=len(rows), psf=qa_psf.band_psf_qa(psf_ccds), flux_fraction=fractions)
    if not rows:
        return qa
    per = Table(rows=rows)
    qa.per_ccd = per
    qa.wcs_rms_mas = float(np.sqrt(per["wcs_sq_sum"].sum() / max(per["wcs_n"].sum(), 1)))
    qa.zp_rms_mmag = float(np.sqrt(np.mean(per["zp_err_mmag"] ** 2)))
    qa.zp_mean_mmag = float(np.mean(per["zp_err_mmag"]))
    dm, found = np.concatenate(dm_all), np.concatenate(found_all)
    idx = np.digitize(dm, MAG_BINS) - 1
    centres, frac = [], []
    for i in range(len(MAG_BINS) - 1):
        sel = idx == i
        if sel.sum() >= 5:
            centres.append((MAG_BINS[i] + MAG_BINS[i + 1]) / 2)
            frac.append(float(found[sel].mean()))
    qa.completeness = {"dm": centres, "fraction": frac}
    qa.completeness50_offset_mag = completeness50(dm, found)
    tracts = {}       # each tract's isolated-star sources once, wherever they were made or moved
    for butler in butlers:
        for ref in butler.registry.queryDatasets("isolated_star_source", collections=collection,
                                                 findFirst=True):
            if int(ref.dataId["tract"]) not in tracts:
                tracts[int(ref.dataId["tract"])] = butler.get(ref)
    if tracts:
        footprint_arcmin = 3 * load_survey(survey)[0].ccd_size * PIXEL_SCALE / 60
        qa.am1 = am1(vstack(list(tracts.values()), metadata_conflicts="silent"),
                     AM1_ANNULUS_ARCMIN if footprint_arcmin >= 3 * AM1_ANNULUS_ARCMIN else 1.0)
    return qa


def am1(sources: Table, annulus_arcmin: float) -> dict:
    """AM1 as Rubin's faro computes it: stars of median magnitude 17-21.5 in r and i, pairs
    whose mean positions are annulus +- 20% apart; per pair the sample std of their separation
    over the visits that see both; the median over pairs (mas)."""
    s = sources[np.isin(sources["band"], ["r", "i"]) & np.isfinite(sources["mag"])]
    keys, star = np.unique(np.column_stack([s["tract"], s["isolated_star_id"], s["band"] == "r"]),
                           axis=0, return_inverse=True)
    star = star.ravel()
    n = np.bincount(star)
    xyz = np.zeros((len(keys), 3))
    np.add.at(xyz, star, unit_vectors(np.asarray(s["ra"]), np.asarray(s["dec"])))
    # each star's median magnitude: sort by star, then magnitude, and take the middle of each run
    order = np.lexsort((np.asarray(s["mag"]), star))
    sorted_mag, first = np.asarray(s["mag"])[order], np.r_[0, np.cumsum(n)[:-1]]
    mags = 0.5 * (sorted_mag[first + (n - 1) // 2] + sorted_mag[first + n // 2])
    good = np.flatnonzero((mags >= 17.0) & (mags <= 21.5) & (n >= 2))
    mean = xyz[good] / np.linalg.norm(xyz[good], axis=1, keepdims=True)
    lo, hi = chord(annulus_arcmin * 0.8 * 60), chord(annulus_arcmin * 1.2 * 60)
    pairs = cKDTree(mean).query_pairs(hi, output_type="ndarray")
    pairs = pairs[np.linalg.norm(mean[pairs[:, 0]] - mean[pairs[:, 1]], axis=1) >= lo]
    by_star = {int(k): {} for k in good}
    for k, v, ra, dec in zip(star, s["visit"], s["ra"], s["dec"], strict=True):
        if int(k) in by_star:
            by_star[int(k)][int(v)] = (float(ra), float(dec))
    stds = []
    for a, b in pairs:
        pa, pb = by_star[int(good[a])], by_star[int(good[b])]
        common = sorted(pa.keys() & pb.keys())
        if len(common) >= 2:
            u = unit_vectors(*np.array([pa[v] for v in common]).T)
            w = unit_vectors(*np.array([pb[v] for v in common]).T)
            sep = np.degrees(np.arccos(np.clip(np.sum(u * w, axis=1), -1, 1))) * 3.6e6
            stds.append(float(np.std(sep, ddof=1)))
    return {"annulus_arcmin": annulus_arcmin, "n_pairs": len(stds),
            "am1_mas": float(np.median(stds)) if stds else float("nan")}


def completeness50(dm: np.ndarray, detected: np.ndarray) -> float:
    """Where the detected fraction falls through 50% (in magnitude minus depth): a logistic
    curve c / (1 + exp((dm - m) / w)) fitted to every star within 1.5 mag of the depth by
    maximum likelihood. Where 0.1-mag bins of the curve last crossed 50% scattered by 0.017
    mag (rms, 7,000 simulated stars; the demo's u band read -0.10 one run, fitted -0.06); the
    fit, using every star, by 0.007."""
    from scipy.optimize import minimize

    ok = np.isfinite(dm) & (np.abs(dm) < 1.5)
    x, y = dm[ok], np.asarray(detected, float)[ok]
    if len(x) < 20 or y.min() == y.max():
        return float("nan")

    def nll(p):
        c, m, w = 1 / (1 + np.exp(-p[0])), p[1], np.exp(p[2])
        prob = np.clip(c / (1 + np.exp(np.clip((x - m) / w, -50, 50))), 1e-9, 1 - 1e-9)
        return -np.sum(y * np.log(prob) + (1 - y) * np.log(1 - prob))

    fit = minimize(nll, [3.0, 0.0, np.log(0.15)], method="Nelder-Mead",
                   options={"xatol": 1e-5, "fatol": 1e-5, "maxiter": 4000})
    c, m, w = 1 / (1 + np.exp(-fit.x[0])), fit.x[1], np.exp(fit.x[2])
    return float(m + w * np.log(2 * c - 1)) if c > 0.5 else float("nan")


@dataclass
class Step2QA:
    """Global calibration against truth: zeropoints of fitted CCDs, and the repeatability
    (PA1, S/N >= 200) of isolated stars calibrated with them."""

    name = "step 2: global photometric calibration"
    per_ccd: Table = field(default_factory=Table)
    pa1: dict = field(default_factory=dict)
    reserved_pa1: dict = field(default_factory=dict)
    n_visit_summary: int = 0
    n_visit: int = 0

    def _rms(self, column: str, band: str | None = None) -> float:
        if not len(self.per_ccd):
            return float("nan")
        t = self.per_ccd[self.per_ccd["status"] == "fit"]
        values = np.asarray(t[column][t["band"] == band] if band else t[column])
        values = values[np.isfinite(values)]
        return float(np.sqrt(np.mean(values ** 2))) if len(values) else float("nan")

    def checks(self) -> list[dict]:
        rms, prelim = self._rms("zp_err_mmag"), self._rms("prelim_err_mmag")
        out = [check("zeropoint after global calibration vs truth (rms)", rms, "mmag",
                     f"<= {TARGETS['global_zp_rms_mmag']}", rms <= TARGETS["global_zp_rms_mmag"])]
        if len(self.per_ccd) and "u" in set(self.per_ccd["band"]):   # few stars, a target of its own
            u = self._rms("zp_err_mmag", "u")
            out.append(check("zeropoint after global calibration vs truth, u (rms)", u, "mmag",
                             f"<= {TARGETS['global_zp_u_rms_mmag']}",
                             u <= TARGETS["global_zp_u_rms_mmag"]))
        out.append(check("zeropoint vs truth: global calibration against single frame (rms)",
                         rms, "mmag", f"< single-frame {prelim:.2f}", rms < prelim))
        lo, hi = TARGETS["pa1_chi2"]
        for band, p in self.pa1.items():
            target = TARGETS["pa1_gri_mmag" if band in "gri" else "pa1_uzy_mmag"]
            out.append(check(f"PA1 {band} ({p['n_star']} stars, S/N >= 200)", p["pa1_mmag"], "mmag",
                             f"<= {target}", p["pa1_mmag"] <= target))
            out.append(check(f"PA1 {band}: chi2/dof with the calibrated-magnitude errors (photon, "
                             f"zeropoint, {SYS_FLOOR * 1000:.0f} mmag floor; {p['n_outlier']} stars "
                             f"beyond 5 sigma, variables, left out)", p["chi2_dof"], "", f"{lo}-{hi}",
                             lo <= p["chi2_dof"] <= hi))
        out.append(check("final visit summaries at the campaign site", self.n_visit_summary, "visits",
                         f"= {self.n_visit}", self.n_visit_summary == self.n_visit))
        return out

    def summary(self) -> dict:
        bands = sorted(set(self.per_ccd["band"])) if len(self.per_ccd) else []
        return {"zp_rms_mmag": self._rms("zp_err_mmag"),
                "single_frame_zp_rms_mmag": self._rms("prelim_err_mmag"),
                "zp_rms_mmag_by_band": {b: self._rms("zp_err_mmag", b) for b in bands},
                "single_frame_zp_rms_mmag_by_band": {b: self._rms("prelim_err_mmag", b) for b in bands},
                "star_offset_rms_mmag_by_band": {b: self._rms("offset_mmag", b) for b in bands},
                "single_frame_star_offset_rms_mmag_by_band": {b: self._rms("prelim_offset_mmag", b)
                                                              for b in bands},
                "pa1": self.pa1, "reserved_stars_repeatability_snr50": self.reserved_pa1}

    def details(self) -> str:
        """Per-band breakdown: where the pooled numbers come from. The bright stars' calibrated
        magnitudes vs truth show what a user sees, free of any flux scale a zeropoint absorbs;
        they cannot rank the two calibrations, since a single-frame zeropoint is fitted to the
        very measurements of those stars and so cancels their photon noise."""
        summary = self.summary()
        lines = ["| band | ZP vs truth, global | single frame | bright stars vs truth, global "
                 "| single frame | PA1 (mmag) |", "|---|---:|---:|---:|---:|---:|"]
        for b, rms in summary["zp_rms_mmag_by_band"].items():
            lines.append(f"| {b} | {rms:.2f} | {summary['single_frame_zp_rms_mmag_by_band'][b]:.2f} | "
                         f"{summary['star_offset_rms_mmag_by_band'][b]:.2f} | "
                         f"{summary['single_frame_star_offset_rms_mmag_by_band'][b]:.2f} | "
                         f"{self.pa1.get(b, {}).get('pa1_mmag', float('nan')):.2f} |")
        return "Per band (rms over CCDs, mmag):\n\n" + "\n".join(lines)

    def plot(self, plt, out: Path) -> str | None:
        if not len(self.per_ccd):
            return None
        fit = self.per_ccd[self.per_ccd["status"] == "fit"]
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        bins = np.linspace(-15, 15, 31)
        ax[0].hist(fit["prelim_err_mmag"], bins=bins, histtype="step", label="single frame")
        ax[0].hist(fit["zp_err_mmag"], bins=bins, histtype="stepfilled", alpha=0.5, label="global")
        ax[0].set(xlabel="zeropoint - truth (mmag)", ylabel="CCDs", title="Zeropoint residuals")
        ax[0].legend()
        bands = list(self.pa1)
        ax[1].bar(bands, [self.pa1[b]["pa1_mmag"] for b in bands])
        ax[1].axhline(TARGETS["pa1_gri_mmag"], color="k", ls=":")
        ax[1].set(xlabel="band", ylabel="PA1 (mmag)", title="Repeatability, S/N >= 200")
        fig.tight_layout()
        fig.savefig(out / "step2_qa.png", dpi=80)
        plt.close(fig)
        return "step2_qa.png"


def _magnitude_offsets(sources: Table, zp: dict, truth_stars: Table, mjd: dict,
                       min_snr: float = 100.0, min_stars: int = 5) -> dict[tuple, float]:
    """Per CCD, the median of calibrated minus true magnitude of its bright reference stars:
    the calibration error as a user sees it, free of the flux scale a zeropoint absorbs."""
    s = sources[(sources["ref_id"] >= 0) & (sources["snr"] >= min_snr)]
    out = {}
    keys = np.column_stack([s["visit"], s["detector"]])
    for visit, detector in np.unique(keys, axis=0):
        on = s[(keys[:, 0] == visit) & (keys[:, 1] == detector)]
        if len(on) < min_stars or (int(visit), int(detector)) not in zp:
            continue
        true = star_mags(truth_stars[np.searchsorted(truth_stars["id"], on["ref_id"])],
                         on["band"][0], mjd[int(visit)])
        cal = zp[(int(visit), int(detector))] - 2.5 * np.log10(np.asarray(on["psf_flux"], float))
        out[(int(visit), int(detector))] = float(np.median(cal - true))
    return out


def step2_qa(butler: Butler, collection: str, survey: Path, flux_fraction: dict) -> Step2QA:
    """QA of the global calibration, at the campaign site that holds every site's stars;
    `flux_fraction`: step 1's QA's (Step1QA.flux_fraction), times the factor the visit summary
    moved each CCD's fluxes by (psf_flux_scale: a Moffat's to the visit's FWHM)."""
    truth_ccd, visits, truth_stars = _truth(survey)
    mjd = {int(v["visit"]): float(v["mjd"]) for v in visits}
    qa = Step2QA()
    registry = butler.registry
    zps = list(registry.queryDatasets("fgcm_zeropoints", collections=collection, findFirst=True))
    prelims = list(registry.queryDatasets("preliminary_visit_summary", collections=collection,
                                          findFirst=True))
    qa.n_visit = len(prelims)
    qa.n_visit_summary = len(list(registry.queryDatasets("visit_summary", collections=collection,
                                                         findFirst=True)))
    if not zps:
        return qa
    zeropoints = butler.get(zps[0])
    prelim = vstack([butler.get(r) for r in prelims], metadata_conflicts="silent")
    prelim_zp = {(int(r["visit"]), int(r["detector"])): r["zero_point"] for r in prelim}
    scale = {(int(r["visit"]), int(r["detector"])): float(r["psf_flux_scale"]) for r in prelim}
    true = np.array([true_zeropoint(truth_ccd[(int(v), int(d))],
                                    flux_fraction[(int(v), int(d))] * scale[(int(v), int(d))])
                     for v, d in zip(zeropoints["visit"], zeropoints["detector"], strict=True)])
    per = zeropoints["visit", "detector", "band", "status"]
    per["zp_err_mmag"] = (zeropoints["zero_point"] - true) * 1000
    per["prelim_err_mmag"] = np.array([prelim_zp[(int(v), int(d))] for v, d in
                                       zip(per["visit"], per["detector"], strict=True)]) * 1000 - true * 1000
    sources = vstack([butler.get(r) for r in registry.queryDatasets(
        "isolated_star_source", collections=collection, findFirst=True)], metadata_conflicts="silent")
    keys = [(int(v), int(d)) for v, d in zip(per["visit"], per["detector"], strict=True)]
    for column, zp in (("offset_mmag", dict(zip(keys, zeropoints["zero_point"], strict=True))),
                       ("prelim_offset_mmag", prelim_zp)):
        offsets = _magnitude_offsets(sources, zp, truth_stars, mjd)
        per[column] = np.array([offsets.get(k, np.nan) for k in keys]) * 1000
    qa.per_ccd = per
    qa.pa1 = repeatability(sources, zeropoints)
    stars = butler.get("fgcm_standard_star", instrument=INSTRUMENT, collections=collection)
    held_out = {(int(t), int(i)) for t, i, r in
                zip(stars["tract"], stars["isolated_star_id"], stars["reserved"], strict=True) if r}
    keep = np.array([(int(t), int(i)) in held_out for t, i in
                     zip(sources["tract"], sources["isolated_star_id"], strict=True)], bool)
    qa.reserved_pa1 = repeatability(sources[keep], zeropoints, min_snr=50.0)
    return qa


@dataclass
class Step3QA:
    """Property maps against the truth footprint: the same HEALPix pixelisation of every
    processed CCD's true WCS must give the same number of exposures and exposure time."""

    name = "step 3: coadds and property maps"
    n_maps: int = 0
    n_pixels: int = 0
    nexp_exact: float = float("nan")      # fraction of pixels
    exptime_exact: float = float("nan")

    def checks(self) -> list[dict]:
        return [check(f"n_exposure maps = truth footprint ({self.n_maps} tract-band maps, "
                      f"{self.n_pixels} pixels)", 100 * self.nexp_exact, "% of pixels",
                      ">= 99.5 (the rest: centres within the WCS error of a CCD edge)",
                      self.nexp_exact >= 0.995),
                check("exposure-time maps = truth footprint", 100 * self.exptime_exact,
                      "% of pixels", ">= 99.5", self.exptime_exact >= 0.995)]

    def summary(self) -> dict:
        return {"n_maps": self.n_maps, "n_pixels": self.n_pixels}

    def plot(self, plt, out: Path) -> str | None:
        return None


class FootprintTruth:
    """The truth footprint: every processed CCD (one with a final visit summary) through its
    true WCS, pixelised as the property maps are."""

    def __init__(self, butler: Butler, collection: str, survey: Path):
        from drp_flows.validation.simulate import load_survey

        cfg, _ = load_survey(survey)
        self.sky, self.n = cfg.skymap, cfg.ccd_size
        self.truth_ccd, _, _ = _truth(survey)
        self.summaries = [butler.get(r) for r in butler.registry.queryDatasets(
            "visit_summary", collections=collection, findFirst=True)]
        self._band_pixels: dict[str, tuple] = {}

    def exact(self, nexp, exptime, band: str, tract: int | None = None) -> tuple[int, int, int]:
        """(pixels, exact n_exposure, exact exposure time) over every pixel that the maps or
        the truth put in the tract (in the skymap when tract is None)."""
        import hpgeom

        from drp_flows.tasks.property_maps import NSIDE, CcdInput, ccd_pixels

        if band not in self._band_pixels:   # once per band, whichever tracts ask
            footprints = [ccd_pixels(CcdInput(header_wcs(fits.Header.fromstring(
                self.truth_ccd[(int(r["visit"]), int(r["detector"]))]["wcs"])), (self.n, self.n),
                0, 0, 0, 0)) for summary in self.summaries for r in summary if r["band"] == band]
            truth_pix, truth_count = np.unique(np.concatenate(footprints), return_counts=True)
            ra, dec = hpgeom.pixel_to_angle(NSIDE, truth_pix, nest=True)
            self._band_pixels[band] = truth_pix, truth_count, self.sky.tract_of(ra, dec)
        truth_pix, truth_count, where = self._band_pixels[band]
        inside = where >= 0 if tract is None else where == tract
        truth = dict(zip(truth_pix[inside], truth_count[inside], strict=True))
        pixels = np.union1d(nexp.valid_pixels, truth_pix[inside])
        expected = np.array([truth.get(p, 0) for p in pixels], float)

        def values(m):
            v = m.get_values_pix(pixels)
            return np.where(v > hpgeom.UNSEEN, v, 0)
        return (len(pixels), int((values(nexp) == expected).sum()),
                int(np.isclose(values(exptime), 30.0 * expected).sum()))


def step3_qa(butler: Butler, collection: str, survey: Path) -> Step3QA:
    """QA of the per-tract property maps gathered at the campaign site: every pixel that the
    maps or the truth footprint (processed CCDs through their true WCS) put in the tract."""
    truth = FootprintTruth(butler, collection, survey)
    qa = Step3QA()
    exact_n = exact_t = 0
    for ref in butler.registry.queryDatasets("deep_coadd_n_exposure_map_sum", collections=collection,
                                             findFirst=True):
        exptime = butler.get("deep_coadd_exposure_time_map_sum", dataId=ref.dataId,
                             collections=collection)
        n, good_n, good_t = truth.exact(butler.get(ref), exptime, ref.dataId["band"],
                                        int(ref.dataId["tract"]))
        exact_n += good_n
        exact_t += good_t
        qa.n_pixels += n
        qa.n_maps += 1
    if qa.n_pixels:
        qa.nexp_exact, qa.exptime_exact = exact_n / qa.n_pixels, exact_t / qa.n_pixels
    return qa


def write_report(sections: list, out: Path, title: str) -> Path:
    """Markdown + JSON + PNG plots of QA sections (each with name, checks, summary, and a plot
    that writes one PNG or several and returns their names); returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "Every metric against the simulation's truth, with its target.", ""]
    doc = {}
    for section in sections:
        checks = section.checks()
        doc[section.name] = {"checks": checks, **section.summary()}
        lines += [f"## {section.name}", "", checks_markdown(checks), ""]
        details = section.details() if hasattr(section, "details") else ""
        if details:
            lines += [details, ""]
        pngs = section.plot(plt, out) or []
        for png in [pngs] if isinstance(pngs, str) else pngs:
            lines += [f"![{section.name}]({png})", ""]
    (out / "qa.json").write_text(json.dumps(doc, indent=1, default=float))
    path = out / "qa.md"
    path.write_text("\n".join(lines))
    return path


def checks_markdown(checks: list[dict]) -> str:
    lines = ["| metric | value | target | result |", "|---|---:|---|---|"]
    lines += [f"| {c['metric']} | {c['value']:.2f} {c['unit']} | {c['target']} | "
              f"{'PASS' if c['pass'] else 'FAIL'} |" for c in checks]
    return "\n".join(lines)
