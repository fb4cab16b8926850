"""Science QA of step 3's objects against the simulation's truth, over the object tables and
the per-tract depth maps gathered at the campaign site.

- Coadd completeness: of the isolated non-variable true stars (no neighbour of a tenth of
  their flux within 3", `isolated_truth`), the fraction detected in a band (an object within
  1" with the band among its detections), vs the true magnitude minus the coadd depth that the
  psf_maglim property map predicts at the star; 50% should fall at that depth (the coadd's own
  m5) +- 0.1 mag, SCIENCE.md's target for single frames, checking detection and map alike.
- Flux scale: median PSF magnitude minus true magnitude of bright (S/N >= 50) isolated stars,
  per band: the coadds' nJy calibration after the global calibration, within 1% (10 mmag).
  It checks the coadd's PSF (`coadd_psf`) too: one Moffat fitted to the patch instead left
  fluxes 5-10 mmag low in the demo.
- Flux pulls: (flux - true) / error of isolated stars at S/N 10-50, robust std, 1 +- 0.15 as
  for difference images: the coadd variance, its rescaling and the PSF together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import hpgeom
import numpy as np
from astropy.table import Table, vstack
from lsst.daf.butler import Butler
from scipy.spatial import cKDTree

from drp_flows.tasks.camera import BANDS
from drp_flows.tasks.coadd import NJY_MAG0
from drp_flows.tasks.isolated_stars import chord, unit_vectors
from drp_flows.tasks.property_maps import NSIDE
from drp_flows.tasks.skymap import SKYMAP_NAME
from drp_flows.validation.qa import MAG_BINS, check, completeness50

TARGETS = {"completeness50_offset_mag": 0.1, "flux_scale_mmag": 10.0, "pull_std": (0.85, 1.15)}
ISOLATION_ARCSEC = 3.0
ISOLATION_DMAG = 2.5          # a neighbour of a tenth of the flux
MATCH_ARCSEC = 1.0


@dataclass
class ObjectQA:
    name = "step 3: coadd objects"
    n_object: int = 0
    per_band: dict = field(default_factory=dict)
    cutout: tuple | None = None           # (rgb image, title, x, y) of one patch

    def checks(self) -> list[dict]:
        out = []
        for band, p in sorted(self.per_band.items()):
            off = p["completeness50_offset_mag"]
            out.append(check(f"coadd 50% completeness minus depth-map m5, {band} ({p['n_truth']} "
                             f"isolated stars)", off, "mag",
                             f"within +-{TARGETS['completeness50_offset_mag']}",
                             abs(off) <= TARGETS["completeness50_offset_mag"]))
            out.append(check(f"coadd PSF magnitudes - truth, {band} ({p['n_bright']} stars, "
                             f"S/N >= 50, median)", p["flux_scale_mmag"], "mmag",
                             f"within +-{TARGETS['flux_scale_mmag']}",
                             abs(p["flux_scale_mmag"]) <= TARGETS["flux_scale_mmag"]))
            lo, hi = TARGETS["pull_std"]
            out.append(check(f"coadd flux pulls, {band} ({p['n_pull']} stars, S/N 10-50, robust std)",
                             p["pull_std"], "", f"{lo}-{hi}", lo <= p["pull_std"] <= hi))
        return out

    def summary(self) -> dict:
        return {"n_object": self.n_object, "per_band": self.per_band}

    def plot(self, plt, out: Path) -> str | None:
        if not self.per_band:
            return None
        fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
        for band, p in sorted(self.per_band.items()):
            ax[0].plot(p["dm"], p["fraction"], "o-", ms=3, label=band)
        ax[0].axvline(0, color="k", ls=":")
        ax[0].axhline(0.5, color="k", ls=":")
        ax[0].set(xlabel="true mag - depth map m5", ylabel="fraction detected",
                  title="Coadd completeness")
        ax[0].legend()
        if self.cutout is not None:
            rgb, title, x, y = self.cutout
            ax[1].imshow(rgb, origin="lower")
            ax[1].scatter(x, y, s=40, facecolors="none", edgecolors="w", lw=0.5)
            ax[1].set(title=title, xticks=[], yticks=[])
        else:
            ax[1].set_axis_off()
        fig.tight_layout()
        fig.savefig(out / "step3_objects_qa.png", dpi=90)
        plt.close(fig)
        return "step3_objects_qa.png"


def _gather(butler: Butler, name: str, collection: str) -> list:
    return [(r.dataId, butler.get(r)) for r in butler.registry.queryDatasets(
        name, collections=collection, findFirst=True)]


def band_qa(objects: Table, band: str, truth: Table, depth: np.ndarray) -> dict:
    """Completeness, flux scale and pulls of one band; `depth` is the map's m5 at each truth star."""
    tree = cKDTree(unit_vectors(np.asarray(objects["coord_ra"]), np.asarray(objects["coord_dec"])))
    dist, idx = tree.query(unit_vectors(np.asarray(truth["ra"]), np.asarray(truth["dec"])),
                           distance_upper_bound=chord(MATCH_ARCSEC))
    matched = np.isfinite(dist)
    idx = np.where(matched, idx, 0)
    detected = matched & np.asarray(objects[f"{band}_detected"])[idx]
    mag = np.asarray(truth[f"{band}_mag"], float)
    dm = mag - depth
    centres, frac = [], []
    which = np.digitize(dm, MAG_BINS) - 1
    for i in range(len(MAG_BINS) - 1):
        sel = which == i
        if sel.sum() >= 5:
            centres.append(float((MAG_BINS[i] + MAG_BINS[i + 1]) / 2))
            frac.append(float(detected[sel].mean()))
    flux = np.asarray(objects[f"{band}_psf_flux"], float)[idx]
    err = np.asarray(objects[f"{band}_psf_flux_err"], float)[idx]
    true_flux = 10 ** (0.4 * (NJY_MAG0 - mag))
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = true_flux / err
        bright = matched & (snr >= 50) & (flux > 0)
        faint = matched & (snr >= 10) & (snr < 50)
        offset = -2.5 * np.log10(flux[bright] / true_flux[bright])
        pulls = (flux[faint] - true_flux[faint]) / err[faint]
    return {"n_truth": int(len(truth)), "dm": centres, "fraction": frac,
            "completeness50_offset_mag": completeness50(dm, detected),
            "n_bright": int(bright.sum()),
            "flux_scale_mmag": float(np.median(offset) * 1000) if bright.any() else float("nan"),
            "n_pull": int(faint.sum()),
            "pull_std": float(1.4826 * np.median(np.abs(pulls - np.median(pulls))))
            if faint.any() else float("nan")}


def isolated_truth(survey: Path) -> Table:
    """Non-variable true stars with no star within ISOLATION_ARCSEC that has a tenth of their
    flux or more (in r): fainter neighbours closer than the 1" merge radius, or undetected,
    are blended into the star's flux by any PSF photometry, which would make the pulls measure
    the crowding rather than the errors (1.4-1.6 for stars with such a neighbour in the demo).
    On the galsim sky a galaxy of that flux counts as a neighbour too."""
    stars = Table.read(survey / "truth" / "stars.parquet")
    xyz = unit_vectors(np.asarray(stars["ra"]), np.asarray(stars["dec"]))
    mags = np.asarray(stars["r_mag"])
    alone = np.ones(len(stars), bool)
    pairs = cKDTree(xyz).query_pairs(chord(ISOLATION_ARCSEC), output_type="ndarray")
    if len(pairs):
        i, j = pairs.T
        alone[i[mags[j] < mags[i] + ISOLATION_DMAG]] = False
        alone[j[mags[i] < mags[j] + ISOLATION_DMAG]] = False
    if (survey / "truth" / "galaxies.parquet").exists():
        galaxies = Table.read(survey / "truth" / "galaxies.parquet")
        gal_mags = np.asarray(galaxies["r_mag"])
        near = cKDTree(unit_vectors(np.asarray(galaxies["ra"]), np.asarray(galaxies["dec"]))
                       ).query_ball_point(xyz, chord(ISOLATION_ARCSEC))
        alone &= np.array([not any(gal_mags[j] < m + ISOLATION_DMAG for j in js)
                           for js, m in zip(near, mags, strict=True)], bool)
    return stars[alone & ~np.asarray(stars["is_variable"])]


def object_qa(butler: Butler, site_butlers: list[Butler], collection: str, survey: Path) -> ObjectQA:
    """QA of the object tables at the campaign site (`butler`) against the truth and the depth
    maps; the cutout is of a coadd at the site that made it."""
    qa = ObjectQA()
    tables = {int(d["tract"]): t for d, t in _gather(butler, "object", collection)}
    if not tables:
        return qa
    qa.n_object = sum(len(t) for t in tables.values())
    truth = isolated_truth(survey)
    pix = hpgeom.angle_to_pixel(NSIDE, np.asarray(truth["ra"]), np.asarray(truth["dec"]))
    per_band: dict[str, list] = {}
    for data_id, depth_map in _gather(butler, "deep_coadd_psf_maglim_map_weighted_mean", collection):
        tract, band = int(data_id["tract"]), data_id["band"]
        if tract not in tables or f"{band}_detected" not in tables[tract].colnames:
            continue
        depth = depth_map.get_values_pix(pix)
        on = depth > hpgeom.UNSEEN
        per_band.setdefault(band, []).append((tables[tract], truth[on], depth[on]))
    for band, parts in per_band.items():
        objects = vstack([p[0] for p in parts], join_type="outer", metadata_conflicts="silent")
        stars = vstack([p[1] for p in parts])
        qa.per_band[band] = band_qa(objects, band, stars, np.concatenate([p[2] for p in parts]))
    tract = min(tables)
    for site_butler in site_butlers:
        qa.cutout = coadd_cutout(site_butler, collection,
                                 {"skymap": SKYMAP_NAME, "tract": tract, "patch": 0}, tables[tract])
        if qa.cutout is not None:
            break
    return qa


def coadd_cutout(butler: Butler, collection: str, data_id: dict, objects: Table) -> tuple | None:
    """An RGB picture of one patch from its three reddest bands (red to blue) with its
    objects; None if the site holds no coadd of the patch."""
    from astropy.visualization import make_lupton_rgb

    refs = {r.dataId["band"]: r for r in butler.registry.queryDatasets(
        "deep_coadd", collections=collection, findFirst=True, dataId=data_id)}
    bands = [b for b in reversed(BANDS) if b in refs][:3]
    if not bands:
        return None
    bands += [bands[-1]] * (3 - len(bands))
    images = [np.asarray(butler.get(refs[b])["IMAGE"].data, float) for b in bands]
    obj = objects[objects["patch"] == data_id["patch"]]
    return (make_lupton_rgb(*images, minimum=0, stretch=20, Q=8),
            f"tract {data_id['tract']} patch {data_id['patch']}: {''.join(reversed(bands))} coadd, objects",
            np.asarray(obj["x"]), np.asarray(obj["y"]))
