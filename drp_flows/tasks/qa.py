"""Science QA of step 1 against the simulation's truth (SCIENCE.md validation targets).

- WCS: the fitted WCS evaluated at the true pixel positions of bright (S/N >= 50) reference
  stars, against their true sky positions; rms in mas (target <= 10).
- Zeropoint: calibrated zeropoint minus the true one per CCD; rms in mmag (target <= 10).
- Completeness: fraction of isolated true stars (no brighter star within 2.5 FWHM: depth, not
  crowding) detected vs magnitude relative to each CCD's m5; 50% should be at m5 +- 0.1 mag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from lsst.daf.butler import Butler
from scipy.spatial import cKDTree

from drp_flows.tasks.camera import INSTRUMENT, PIXEL_SCALE
from drp_flows.tasks.simulate import star_mags
from drp_flows.tasks.skymap import header_wcs

TARGETS = {"wcs_rms_mas": 10.0, "zp_rms_mmag": 10.0, "completeness50_offset_mag": 0.1}
BRIGHT_SNR = 50.0
MAG_BINS = np.arange(-3.0, 1.51, 0.1)


@dataclass
class Step1QA:
    n_ccd: int = 0
    wcs_rms_mas: float = float("nan")
    zp_rms_mmag: float = float("nan")
    zp_mean_mmag: float = float("nan")
    completeness50_offset_mag: float = float("nan")
    per_ccd: Table = field(default_factory=Table)
    completeness: dict = field(default_factory=dict)

    def checks(self) -> list[dict]:
        return [
            {"metric": "single-frame WCS vs truth (bright stars, rms)", "value": self.wcs_rms_mas,
             "unit": "mas", "target": f"<= {TARGETS['wcs_rms_mas']}",
             "pass": bool(self.wcs_rms_mas <= TARGETS["wcs_rms_mas"])},
            {"metric": "single-frame zeropoint vs truth (rms)", "value": self.zp_rms_mmag,
             "unit": "mmag", "target": f"<= {TARGETS['zp_rms_mmag']}",
             "pass": bool(self.zp_rms_mmag <= TARGETS["zp_rms_mmag"])},
            {"metric": "50% completeness (isolated stars) minus m5", "value": self.completeness50_offset_mag,
             "unit": "mag", "target": f"within +-{TARGETS['completeness50_offset_mag']}",
             "pass": bool(abs(self.completeness50_offset_mag)
                          <= TARGETS["completeness50_offset_mag"])},
        ]


def _truth(survey: Path):
    ccd = Table.read(survey / "truth" / "ccd_visits.parquet")
    visits = Table.read(survey / "truth" / "visits.parquet")
    stars = Table.read(survey / "truth" / "stars.parquet")
    return {(int(r["visit"]), int(r["detector"])): r for r in ccd}, visits, stars


def ccd_qa(image_header: fits.Header, primary: fits.Header, stars: Table, truth_row,
           truth_stars: Table, band: str, mjd: float, n: int) -> tuple[dict, np.ndarray, np.ndarray]:
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
           "zp_err_mmag": (primary["ZP"] - truth_row["zp_true"]) * 1000,
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
    truth_stars.sort("id")
    mjd = {int(v["visit"]): float(v["mjd"]) for v in visits}
    rows, dm_all, found_all = [], [], []
    for butler in butlers:
        refs = butler.registry.queryDatasets("preliminary_visit_image", collections=collection,
                                             instrument=INSTRUMENT, findFirst=True)
        stars_by_visit: dict[int, Table] = {}
        for ref in sorted(refs, key=lambda r: (r.dataId["visit"], r.dataId["detector"])):
            visit, detector = int(ref.dataId["visit"]), int(ref.dataId["detector"])
            uri = butler.getURI(ref)
            with uri.open("rb") as f:
                hdul = fits.open(f, lazy_load_hdus=True)
                primary, image_header = hdul[0].header.copy(), hdul["IMAGE"].header.copy()
            if visit not in stars_by_visit:
                stars_by_visit[visit] = butler.get("single_visit_star", instrument=INSTRUMENT,
                                                   visit=visit, collections=collection)
            vs = stars_by_visit[visit]
            stars = vs[vs["detector"] == detector]
            row, dm, found = ccd_qa(image_header, primary, stars, truth_ccd[(visit, detector)],
                                    truth_stars, primary["BAND"], mjd[visit],
                                    int(image_header["NAXIS1"]))
            rows.append(row)
            dm_all.append(dm)
            found_all.append(found)
    qa = Step1QA(n_ccd=len(rows))
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
    qa.completeness50_offset_mag = _crossing(np.array(centres), np.array(frac), 0.5)
    return qa


def _crossing(x: np.ndarray, y: np.ndarray, level: float) -> float:
    """First x where y falls through `level` (linear interpolation)."""
    below = np.flatnonzero((y[:-1] >= level) & (y[1:] < level))
    if not below.size:
        return float("nan")
    i = below[-1]
    return float(x[i] + (level - y[i]) * (x[i + 1] - x[i]) / (y[i + 1] - y[i]))


def write_report(qa: Step1QA, out: Path, title: str) -> Path:
    """Markdown + JSON + PNG plots; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    checks = qa.checks()
    (out / "qa.json").write_text(json.dumps({"n_ccd": qa.n_ccd, "checks": checks,
                                             "zp_mean_mmag": qa.zp_mean_mmag,
                                             "completeness": qa.completeness}, indent=1))
    if len(qa.per_ccd):
        fig, ax = plt.subplots(1, 3, figsize=(15, 4))
        for band in sorted(set(qa.per_ccd["band"])):
            sel = qa.per_ccd["band"] == band
            ax[0].hist(qa.per_ccd["zp_err_mmag"][sel], bins=20, histtype="step", label=band)
            ax[1].scatter(qa.per_ccd["psf_fwhm"][sel], qa.per_ccd["wcs_rms_mas"][sel], s=8, label=band)
        ax[0].set(xlabel="zeropoint - truth (mmag)", ylabel="CCDs", title="Single-frame zeropoint")
        ax[1].set(xlabel="PSF FWHM (arcsec)", ylabel="WCS rms vs truth (mas)", title="Astrometry")
        ax[0].legend()
        ax[1].legend()
        ax[2].plot(qa.completeness["dm"], qa.completeness["fraction"], "o-")
        ax[2].axvline(0, color="k", ls=":")
        ax[2].axhline(0.5, color="k", ls=":")
        ax[2].set(xlabel="true mag - m5", ylabel="fraction detected", title="Completeness")
        fig.tight_layout()
        fig.savefig(out / "step1_qa.png", dpi=80)
        plt.close(fig)
    lines = [f"# {title}", "", f"{qa.n_ccd} CCDs checked against the simulation's truth.", "",
             "| metric | value | target | result |", "|---|---:|---|---|"]
    for c in checks:
        lines.append(f"| {c['metric']} | {c['value']:.2f} {c['unit']} | {c['target']} | "
                     f"{'PASS' if c['pass'] else 'FAIL'} |")
    lines += ["", "![step 1 QA](step1_qa.png)", ""]
    path = out / "qa.md"
    path.write_text("\n".join(lines))
    return path
