"""Isolated-star association per tract (Rubin's IsolatedStarAssociationTask, step 1 tail).

Sources of every visit on a tract (S/N >= 10, not saturated, blended or at an edge) are linked
across visits by friends-of-friends at 1"; a star seen twice in one visit is confused and
dropped; a star with another star within 2" is not isolated and dropped. The result is the
star list (`isolated_star`) and each star's observations (`isolated_star_source`), the input
of the global photometric calibration.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table, vstack
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from drp_flows.tasks.skymap import MiniSkymap

MATCH_RADIUS = 1.0        # arcsec
ISOLATION_RADIUS = 2.0    # arcsec
MIN_SNR = 10.0
SOURCE_COLUMNS = ("visit", "detector", "band", "ra", "dec", "psf_flux", "psf_flux_err", "mag",
                  "mag_err", "snr", "ref_id")


def unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra), np.radians(dec)
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def chord(arcsec: float) -> float:
    """Chord length on the unit sphere of an angle (kd-trees on unit vectors work in chords)."""
    return 2 * np.sin(np.radians(arcsec / 3600) / 2)


def associate(star_tables: list[Table], tract: int, skymap: MiniSkymap) -> tuple[Table, Table]:
    """Isolated stars on one tract and their observations."""
    tables = []
    for t in star_tables:
        if len(t):
            ok = (t["snr"] >= MIN_SNR) & ~t["saturated"] & ~t["edge"] & ~t["blended"]
            tables.append(t[ok][list(SOURCE_COLUMNS)])
    empty = Table({"isolated_star_id": np.zeros(0, np.int64)})
    if not tables:
        return empty, Table({c: [] for c in ("isolated_star_id", "tract", *SOURCE_COLUMNS)})
    src = vstack(tables, metadata_conflicts="silent")
    src = src[skymap.tract_of(np.asarray(src["ra"]), np.asarray(src["dec"])) == tract]
    xyz = unit_vectors(np.asarray(src["ra"]), np.asarray(src["dec"]))
    pairs = cKDTree(xyz).query_pairs(chord(MATCH_RADIUS), output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(src),) * 2)
    _, label = connected_components(graph, directed=False)

    # a star observed twice in one visit is a confused blend: drop the whole group
    visit_label = np.unique(np.column_stack([label, src["visit"]]), axis=0, return_counts=True)
    n_labels = label.max() + 1
    confused = np.zeros(n_labels, bool)
    confused[visit_label[0][visit_label[1] > 1, 0]] = True
    counts = np.bincount(label, minlength=n_labels)
    centre = np.zeros((n_labels, 3))
    np.add.at(centre, label, xyz)
    centre /= np.linalg.norm(centre, axis=1)[:, None]

    # isolation: no other star (isolated or not) within 2"
    crowded = np.zeros(n_labels, bool)
    close = cKDTree(centre).query_pairs(chord(ISOLATION_RADIUS), output_type="ndarray")
    crowded[close.ravel()] = True
    good = ~confused & ~crowded
    new_id = np.full(n_labels, -1, np.int64)
    new_id[good] = np.arange(good.sum())

    ra = np.degrees(np.arctan2(centre[:, 1], centre[:, 0])) % 360
    dec = np.degrees(np.arcsin(np.clip(centre[:, 2], -1, 1)))
    stars = Table({"isolated_star_id": new_id[good], "ra": ra[good], "dec": dec[good],
                   "nsource": counts[good], "tract": np.full(good.sum(), tract)})
    keep = good[label]
    sources = src[keep]
    sources.add_column(new_id[label[keep]], name="isolated_star_id", index=0)
    sources.add_column(np.full(len(sources), tract), name="tract", index=1)
    sources.sort(["isolated_star_id", "visit"])
    return stars, sources
