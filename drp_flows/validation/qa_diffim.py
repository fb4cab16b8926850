"""Science QA of step 4 (difference imaging) against the simulation's truth.

Per difference image, the truth transients are the variable stars (science flux minus their
mean flux over the template's visits), the asteroids where they are (positive) and where they
were in the template's visits (negative). At their true positions:
- completeness: a DIA source of the right sign (or a dipole) within 1", vs the true S/N (true
  flux difference over the forced-flux error); target >= 95% at S/N >= 6;
- flux pulls: (forced flux - true difference) / error, robust std; target 1.0 +- 0.15.
False positives are DIA sources on blank sky (no truth transient within 2 FWHM, no star the
image can detect within 3 FWHM), against DMTN-006's density of noise peaks above 5 sigma in a
PSF-filtered image, N = nu exp(-nu^2/2) / (2^(5/2) pi^(3/2)) npix / sigma_g^2, counted for both
signs over the blank pixels; target <= 2x.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.stats import mad_std
from astropy.table import Table, vstack
from lsst.daf.butler import Butler
from scipy.spatial import cKDTree

from drp_flows.sites.butler import open_dataset_file
from drp_flows.tasks.camera import INSTRUMENT, PIXEL_SCALE
from drp_flows.tasks.coadd import NJY_MAG0
from drp_flows.tasks.diffim import DETECTION_SIGMA, DIPOLE_FWHM, UNUSABLE, forced_photometry, measurable
from drp_flows.tasks.images import Exposure
from drp_flows.tasks.skymap import header_wcs
from drp_flows.validation.qa import check
from drp_flows.validation.simulate import asteroid_mags, asteroid_positions, star_mags

SNR_BINS = np.array([2, 3, 4, 5, 6, 8, 10, 15, 25, 50, 1e9])
MATCH_ARCSEC = 1.0
TARGETS = {"completeness": 0.95, "completeness_snr": 6.0, "fp_ratio": 2.0, "pull_std": (0.85, 1.15)}


def njy(mag: np.ndarray) -> np.ndarray:
    return 10 ** (-0.4 * (np.asarray(mag, float) - NJY_MAG0))


def noise_peaks_per_pixel(fwhm_px: float, nu: float = DETECTION_SIGMA) -> float:
    """DMTN-006: expected peaks above nu per pixel of a PSF-filtered white-noise image, one sign."""
    sigma_g = fwhm_px / 2.3548
    return nu * np.exp(-nu ** 2 / 2) / (2 ** 2.5 * np.pi ** 1.5) / sigma_g ** 2


def truth_transients(stars: Table, asteroids: Table, band: str, mjd: float,
                     template_mjds: list[float]) -> Table:
    """What a difference image should show: (id of the star or asteroid, ra, dec, its flux at
    the visit and delta_flux from the template in nJy, kind)."""
    var = stars[stars["is_variable"]]
    template_flux = np.mean([njy(star_mags(var, band, t)) for t in template_mjds], axis=0)
    ra_s, dec_s = asteroid_positions(asteroids, mjd)
    a_flux = njy(asteroid_mags(asteroids, band))
    flux = njy(star_mags(var, band, mjd))
    parts = [Table({"id": var["id"], "ra": var["ra"], "dec": var["dec"], "flux": flux,
                    "delta_flux": flux - template_flux, "kind": np.full(len(var), "variable")}),
             Table({"id": asteroids["id"], "ra": ra_s, "dec": dec_s, "flux": a_flux,
                    "delta_flux": a_flux, "kind": np.full(len(a_flux), "asteroid")})]
    for t in template_mjds:
        ra_t, dec_t = asteroid_positions(asteroids, t)
        parts.append(Table({"id": asteroids["id"], "ra": ra_t, "dec": dec_t,
                            "flux": np.zeros(len(a_flux)), "delta_flux": -a_flux / len(template_mjds),
                            "kind": np.full(len(a_flux), "template asteroid")}))
    return vstack(parts)


def near_points(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """The pixels (centres at integer x, y) closer than `radius` to any of the points: a disc
    painted around each point that reaches the image (a KD-tree query of every pixel costs
    seconds per CCD)."""
    ny, nx = shape
    r = int(np.ceil(radius)) + 1
    oy, ox = (o.ravel() for o in np.mgrid[-r:r + 1, -r:r + 1])
    x, y = np.asarray(x, float), np.asarray(y, float)
    reach = np.isfinite(x) & np.isfinite(y) & (x > -r) & (x < nx + r) & (y > -r) & (y < ny + r)
    x, y = x[reach, None], y[reach, None]
    px, py = np.round(x).astype(int) + ox, np.round(y).astype(int) + oy
    hit = ((px - x) ** 2 + (py - y) ** 2 < radius ** 2) & (px >= 0) & (px < nx) & (py >= 0) \
        & (py < ny)
    out = np.zeros(shape, bool)
    out[py[hit], px[hit]] = True
    return out


@dataclass
class CcdTruthMatch:
    epochs: Table             # per truth transient on the CCD: id, kind, delta, err, snr, found, pull
    n_fp: int
    fp_expected: float
    blank_pixels: int


def ccd_dia_qa(diff: Exposure, sources: Table, true_wcs, transients: Table, stars: Table,
               band: str, mjd: float) -> CcdTruthMatch:
    """Truth matching of one difference image and its DIA sources."""
    meta = diff.metadata
    fwhm = float(meta["PSF_FWHM"]) / PIXEL_SCALE
    ny, nx = diff.image.shape
    usable = ((diff.mask & UNUSABLE) == 0) & np.isfinite(diff.variance)
    tx, ty = true_wcs.all_world2pix(np.asarray(transients["ra"]), np.asarray(transients["dec"]), 0)
    on = measurable(diff, tx, ty, fwhm)
    tx, ty, t = tx[on], ty[on], transients[on]
    flux, err = forced_photometry(diff, tx, ty, fwhm, float(meta["ERRSCALE"]))
    delta = np.asarray(t["delta_flux"])
    found = np.zeros(len(t), bool)
    if len(sources) and len(t):
        tree = cKDTree(np.column_stack([sources["x"], sources["y"]]))
        for k, near in enumerate(tree.query_ball_point(np.column_stack([tx, ty]),
                                                       MATCH_ARCSEC / PIXEL_SCALE)):
            found[k] = any(sources["is_dipole"][j] or bool(sources["is_negative"][j]) == (delta[k] < 0)
                           for j in near)
    # blank sky: away from every transient and every star this image can detect
    sx, sy = true_wcs.all_world2pix(np.asarray(stars["ra"]), np.asarray(stars["dec"]), 0)
    star_flux = njy(star_mags(stars, band, mjd))
    detectable = star_flux > njy(float(meta["M5"]))
    # the brightest star within DIPOLE_FWHM of each transient: what the residual flag compares with
    near_flux = np.array([star_flux[j].max() if j else 0.0 for j in cKDTree(
        np.column_stack([sx, sy])).query_ball_point(np.column_stack([tx, ty]), DIPOLE_FWHM * fwhm)])
    all_tx, all_ty = true_wcs.all_world2pix(np.asarray(transients["ra"]),
                                            np.asarray(transients["dec"]), 0)
    blank_map = usable & ~near_points(usable.shape, sx[detectable], sy[detectable], 3 * fwhm) \
        & ~near_points(usable.shape, all_tx, all_ty, 2 * fwhm)
    blank = blank_map[usable]
    sxi = np.clip(np.round(np.asarray(sources["x"])).astype(int), 0, nx - 1)
    syi = np.clip(np.round(np.asarray(sources["y"])).astype(int), 0, ny - 1)
    n_fp = int(blank_map[syi, sxi].sum()) if len(sources) else 0
    with np.errstate(invalid="ignore", divide="ignore"):
        epochs = Table({"id": t["id"], "kind": t["kind"], "band": np.full(len(t), band),
                        "mjd": np.full(len(t), mjd), "flux": t["flux"],
                        "near_flux": np.maximum(near_flux, np.asarray(t["flux"])), "delta": delta, "err": err,
                        "snr": np.abs(delta) / err, "found": found, "pull": (flux - delta) / err})
    return CcdTruthMatch(epochs, n_fp, 2 * noise_peaks_per_pixel(fwhm) * int(blank.sum()),
                         int(blank.sum()))


@dataclass
class Step4QA:
    name = "step 4: difference imaging"
    n_ccd: int = 0
    n_transients: int = 0
    completeness: dict = field(default_factory=dict)    # snr bin lower edge -> (n, found)
    completeness_snr6: float = float("nan")
    pull_std: float = float("nan")
    n_fp: int = 0
    fp_expected: float = float("nan")
    blank_pixels: int = 0
    per_kind: dict = field(default_factory=dict)
    epochs: Table | None = None      # every truth transient on every difference image (step 5 QA)

    def checks(self) -> list[dict]:
        ratio = self.n_fp / self.fp_expected if self.fp_expected > 0 else float("nan")
        lo, hi = TARGETS["pull_std"]
        return [
            check(f"DIA completeness at true S/N >= {TARGETS['completeness_snr']:.0f} "
                  f"({self.n_ccd} difference images)", 100 * self.completeness_snr6, "%",
                  f">= {100 * TARGETS['completeness']:.0f}",
                  self.completeness_snr6 >= TARGETS["completeness"]),
            check(f"DIA false positives on blank sky / DMTN-006 theory ({self.n_fp} vs "
                  f"{self.fp_expected:.1f} expected over {self.blank_pixels} pixels)", ratio, "x",
                  f"<= {TARGETS['fp_ratio']}", ratio <= TARGETS["fp_ratio"]),
            check("difference flux pulls at the truth transients (robust std)", self.pull_std, "",
                  f"{lo}-{hi}", lo <= self.pull_std <= hi),
        ]

    def summary(self) -> dict:
        return {"n_ccd": self.n_ccd, "n_transients": self.n_transients,
                "completeness_by_snr": self.completeness, "per_kind": self.per_kind,
                "n_fp": self.n_fp, "fp_expected": self.fp_expected}

    def plot(self, plt, out: Path) -> str | None:
        if not self.completeness:
            return None
        edges = sorted(self.completeness, key=float)
        x = [float(e) for e in edges]
        frac = [self.completeness[e][1] / max(self.completeness[e][0], 1) for e in edges]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.semilogx(x, frac, "o-")
        ax.axhline(TARGETS["completeness"], color="k", ls=":")
        ax.axvline(TARGETS["completeness_snr"], color="k", ls=":")
        ax.set(xlabel="true S/N of the flux difference (bin lower edge)", ylabel="fraction detected",
               title="DIA completeness")
        fig.tight_layout()
        fig.savefig(out / "step4_qa.png", dpi=90)
        plt.close(fig)
        return "step4_qa.png"


def step4_qa(butlers: list[Butler], collection: str, survey: Path) -> Step4QA:
    """QA over the difference images and DIA sources of every given site Butler."""
    from drp_flows.validation.qa import _truth

    truth_ccd, visits, stars = _truth(survey)
    asteroids = Table.read(survey / "truth" / "asteroids.parquet")
    mjd = {int(v["visit"]): float(v["mjd"]) for v in visits}
    matches = []
    for butler in butlers:
        for ref in butler.registry.queryDatasets("difference_image", collections=collection,
                                                 instrument=INSTRUMENT, findFirst=True):
            visit, detector = int(ref.dataId["visit"]), int(ref.dataId["detector"])
            with open_dataset_file(butler, ref) as f:
                diff = Exposure.from_hdulist(fits.HDUList.fromstring(f.read()))
            if "NOTEMPL" in diff.metadata:       # a sliver of template: nothing differenced
                continue
            sources = butler.get("dia_source_detector", dataId=ref.dataId, collections=collection)
            band = diff.metadata["BAND"]
            transients = truth_transients(stars, asteroids, band, mjd[visit],
                                          [mjd[int(v)] for v in diff.metadata["TMPLVIS"].split()])
            true_wcs = header_wcs(fits.Header.fromstring(truth_ccd[(visit, detector)]["wcs"]))
            matches.append(ccd_dia_qa(diff, sources, true_wcs, transients, stars, band, mjd[visit]))
    qa = Step4QA(n_ccd=len(matches))
    if not matches:
        return qa
    qa.epochs = vstack([m.epochs for m in matches])
    snr, found, pull = (np.asarray(qa.epochs[c]) for c in ("snr", "found", "pull"))
    kind = np.asarray(qa.epochs["kind"])
    qa.n_transients = len(snr)
    idx = np.digitize(snr, SNR_BINS) - 1
    qa.completeness = {f"{SNR_BINS[i]:g}": (int((idx == i).sum()), int(found[idx == i].sum()))
                       for i in range(len(SNR_BINS) - 1) if (idx == i).any()}
    strong = snr >= TARGETS["completeness_snr"]
    qa.completeness_snr6 = float(found[strong].mean()) if strong.any() else float("nan")
    qa.pull_std = float(mad_std(pull[np.isfinite(pull)]))
    qa.per_kind = {k: {"n": int((kind == k).sum()), "n_snr6": int((strong & (kind == k)).sum()),
                       "found_snr6": int((found & strong & (kind == k)).sum())}
                   for k in np.unique(kind)}
    qa.n_fp = sum(m.n_fp for m in matches)
    qa.fp_expected = float(sum(m.fp_expected for m in matches))
    qa.blank_pixels = sum(m.blank_pixels for m in matches)
    return qa
