"""Science QA of step 5 (DIA objects, light curves, moving objects) against the simulation's truth.

- Variables recovered: of the truth variables detectable as such, the fraction with a DIA
  object flagged variable within 1". Target >= 95%. Detectable: on at least two difference
  images the true change from the template is at S/N >= 6 (where DIA is complete) and at least
  RESIDUAL_FRACTION of the flux of the brightest star within DIPOLE_FWHM, itself or a
  neighbour (below that a change looks like that star's subtraction residual, and step 4 flags
  it so, as it must for the residuals of bright stars).
- False flags: of the DIA objects with no truth variable within 1" (noise peaks, subtraction
  residuals, asteroids, template asteroids), the fraction flagged variable. Target <= 1%.
- Asteroids linked: an asteroid is findable (MOPS's criterion) when DIA found it on at least
  two difference images in each of at least MIN_NIGHTS nights; it is linked when a solar-system
  object spans MIN_NIGHTS nights with at least 80% of its sources on that asteroid.
  Target >= 90%.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.table import Table, vstack
from lsst.daf.butler import Butler
from scipy.spatial import cKDTree

from drp_flows.tasks.association import MIN_DETECTIONS_VARIABLE
from drp_flows.tasks.diffim import RESIDUAL_FRACTION
from drp_flows.tasks.isolated_stars import chord, unit_vectors
from drp_flows.tasks.moving_objects import MIN_NIGHTS, night_of
from drp_flows.validation.qa import check
from drp_flows.validation.simulate import asteroid_positions

TARGETS = {"variables_recovered": 0.95, "false_flags": 0.01, "asteroids_linked": 0.90}
DETECTABLE_SNR = 6.0
MATCH_ARCSEC = 1.0
LINK_PURITY = 0.8


def detectable_variables(epochs: Table) -> dict[int, int]:
    """Truth variables by id with the number of their epochs whose change from the template is
    detectable and not residual-like; those with MIN_DETECTIONS_VARIABLE or more."""
    var = epochs[epochs["kind"] == "variable"]
    delta = np.abs(np.asarray(var["delta"]))
    with np.errstate(invalid="ignore"):
        good = (delta >= DETECTABLE_SNR * np.asarray(var["err"])) \
            & (delta >= RESIDUAL_FRACTION * np.asarray(var["near_flux"]))
    ids, counts = np.unique(np.asarray(var["id"])[good], return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts, strict=True)
            if c >= MIN_DETECTIONS_VARIABLE}


def _near(ra: np.ndarray, dec: np.ndarray, ra_t: np.ndarray, dec_t: np.ndarray) -> np.ndarray:
    """Index of the nearest truth position within MATCH_ARCSEC of each position, or -1."""
    if not len(ra) or not len(ra_t):
        return np.full(len(ra), -1)
    dist, idx = cKDTree(unit_vectors(ra_t, dec_t)).query(unit_vectors(ra, dec),
                                                         distance_upper_bound=chord(MATCH_ARCSEC))
    return np.where(np.isfinite(dist), idx, -1)


@dataclass
class Step5QA:
    name = "step 5: DIA objects, light curves and moving objects"
    n_dia_objects: int = 0
    n_flagged: int = 0
    n_detectable: int = 0
    n_recovered: int = 0
    n_not_variable: int = 0
    n_false_flags: int = 0
    n_findable: int = 0
    n_linked: int = 0
    n_ss_objects: int = 0
    n_false_links: int = 0
    light_curves: list = field(default_factory=list)     # (id, forced table, truth epochs)
    tracks: list = field(default_factory=list)           # ((truth ra, dec), (linked ra, dec))

    def checks(self) -> list[dict]:
        recovered = self.n_recovered / self.n_detectable if self.n_detectable else float("nan")
        false = self.n_false_flags / self.n_not_variable if self.n_not_variable else float("nan")
        linked = self.n_linked / self.n_findable if self.n_findable else float("nan")
        out = [check(f"variables recovered ({self.n_recovered} of {self.n_detectable} with a "
                     f"change at S/N >= {DETECTABLE_SNR:.0f} and >= {100 * RESIDUAL_FRACTION:.0f}% "
                     f"on >= {MIN_DETECTIONS_VARIABLE} images)", 100 * recovered, "%",
                     f">= {100 * TARGETS['variables_recovered']:.0f}",
                     recovered >= TARGETS["variables_recovered"]),
               check(f"false variable flags ({self.n_false_flags} of {self.n_not_variable} DIA "
                     "objects not on a variable)", 100 * false, "%",
                     f"<= {100 * TARGETS['false_flags']:.0f}", false <= TARGETS["false_flags"])]
        if self.n_findable:
            out.append(check(f"asteroids linked ({self.n_linked} of {self.n_findable} findable on "
                             f">= {MIN_NIGHTS} nights; {self.n_false_links} false links)",
                             100 * linked, "%", f">= {100 * TARGETS['asteroids_linked']:.0f}",
                             linked >= TARGETS["asteroids_linked"] and not self.n_false_links))
        return out

    def summary(self) -> dict:
        return {"n_dia_objects": self.n_dia_objects, "n_flagged": self.n_flagged,
                "n_detectable": self.n_detectable, "n_recovered": self.n_recovered,
                "n_not_variable": self.n_not_variable, "n_false_flags": self.n_false_flags,
                "n_ss_objects": self.n_ss_objects, "n_findable": self.n_findable,
                "n_linked": self.n_linked, "n_false_links": self.n_false_links}

    def plot(self, plt, out: Path) -> str | None:
        if not self.light_curves and not self.tracks:
            return None
        n = len(self.light_curves)
        fig, axes = plt.subplots(1, n + 1, figsize=(3.2 * (n + 1), 3.4), squeeze=False)
        for ax, (vid, forced, truth) in zip(axes[0], self.light_curves, strict=False):
            for band in sorted(set(forced["band"])):
                f, t = forced[forced["band"] == band], truth[truth["band"] == band]
                line = ax.errorbar(f["mjd"], f["psf_flux"] / 1e3, f["psf_flux_err"] / 1e3, fmt="o",
                                   ms=3, label=band)
                ax.plot(t["mjd"], t["delta"] / 1e3, "x", color=line[0].get_color())
            ax.set(title=f"variable {vid}", xlabel="MJD", ylabel="difference flux (uJy)")
            ax.legend(fontsize=6)
        ax = axes[0][-1]
        for (ra_t, dec_t), (ra_f, dec_f) in self.tracks:
            ax.plot(ra_t, dec_t, "-", lw=0.6, color="0.6")
            ax.plot(ra_f, dec_f, ".", ms=3)
        ax.invert_xaxis()
        ax.set(title="asteroids: truth, linked", xlabel="RA", ylabel="Dec")
        fig.suptitle("o forced photometry, x truth", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "step5_qa.png", dpi=90)
        plt.close(fig)
        return "step5_qa.png"


def step5_qa(butler: Butler, collection: str, survey: Path, epochs: Table | None) -> Step5QA:
    """QA over the DIA objects and solar-system objects gathered at the campaign site; `epochs`
    are step 4's truth transients per difference image."""
    def gather(name: str) -> Table:
        tables = [butler.get(r) for r in butler.registry.queryDatasets(name, collections=collection,
                                                                       findFirst=True)]
        tables = [t for t in tables if len(t)]
        return vstack(tables, metadata_conflicts="silent") if tables else Table()

    return evaluate(gather("dia_object"), gather("dia_object_forced_source"), gather("ss_object"),
                    gather("ss_source"), epochs, Table.read(survey / "truth" / "stars.parquet"),
                    Table.read(survey / "truth" / "asteroids.parquet"))


def evaluate(objects: Table, forced: Table, ss_object: Table, ss_source: Table,
             epochs: Table | None, stars: Table, asteroids: Table) -> Step5QA:
    qa = Step5QA()
    if epochs is None or not len(objects):
        return qa
    qa.n_dia_objects, qa.n_flagged = len(objects), int(objects["is_variable"].sum())
    var = stars[stars["is_variable"]]
    on_var = _near(np.asarray(objects["ra"]), np.asarray(objects["dec"]),
                   np.asarray(var["ra"]), np.asarray(var["dec"]))
    n_epochs = detectable_variables(epochs)
    detectable = set(n_epochs)
    flagged_var = {int(var["id"][k]) for k in on_var[objects["is_variable"] & (on_var >= 0)]}
    qa.n_detectable, qa.n_recovered = len(detectable), len(detectable & flagged_var)
    qa.n_not_variable = int((on_var < 0).sum())
    qa.n_false_flags = int((objects["is_variable"] & (on_var < 0)).sum())
    for vid in sorted(detectable & flagged_var, key=lambda i: -n_epochs[i])[:3]:
        k = int(np.flatnonzero((on_var >= 0) & (np.asarray(var["id"])[np.maximum(on_var, 0)] == vid)
                               & objects["is_variable"])[0])
        qa.light_curves.append((vid, forced[forced["dia_object_id"] == objects["dia_object_id"][k]],
                                epochs[(epochs["kind"] == "variable") & (epochs["id"] == vid)]))
    _asteroid_qa(qa, ss_object, ss_source, epochs, asteroids)
    return qa


def _asteroid_qa(qa: Step5QA, ss_object: Table, ss_source: Table, epochs: Table,
                 asteroids: Table) -> None:
    """Findable asteroids (found >= 2 times a night on >= MIN_NIGHTS nights) and their links."""
    found = epochs[(epochs["kind"] == "asteroid") & epochs["found"]]
    findable = set()
    for aid in np.unique(found["id"]):
        nights = night_of(np.asarray(found["mjd"][found["id"] == aid]))
        _, counts = np.unique(nights, return_counts=True)
        if (counts >= 2).sum() >= MIN_NIGHTS:
            findable.add(int(aid))
    qa.n_findable, qa.n_ss_objects = len(findable), len(ss_object)
    linked = set()
    by_id = {int(a["id"]): a for a in asteroids}
    for row in ss_object:
        src = ss_source[ss_source["ss_object_id"] == row["ss_object_id"]]
        owner = np.full(len(src), -1)
        for k, s in enumerate(src):      # the asteroid at each source's position and epoch
            ra, dec = asteroid_positions(asteroids, float(s["mjd"]))
            sep = np.hypot((ra - s["ra"]) * np.cos(np.radians(dec)), dec - s["dec"]) * 3600
            if sep.min() < MATCH_ARCSEC:
                owner[k] = int(asteroids["id"][np.argmin(sep)])
        ids, counts = np.unique(owner, return_counts=True)
        best = ids[np.argmax(counts)]
        if best >= 0 and counts.max() >= LINK_PURITY * len(src) and row["n_nights"] >= MIN_NIGHTS:
            linked.add(int(best))
            mjd = np.linspace(float(src["mjd"].min()) - 0.2, float(src["mjd"].max()) + 0.2, 50)
            path = np.array([asteroid_positions(Table(rows=[by_id[int(best)]]), m) for m in mjd])
            qa.tracks.append(((path[:, 0, 0], path[:, 1, 0]),
                              (np.asarray(src["ra"]), np.asarray(src["dec"]))))
        else:
            qa.n_false_links += 1
    qa.n_linked = len(findable & linked)
