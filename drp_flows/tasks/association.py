"""DIA source association and DIA object light curves, per tract (Rubin's drpAssociation and
drpDiaCalculation, step 5).

Association goes visit by visit in time order, as ap_association does: each DIA source is
matched to at most one DIA object within 1" and each object to at most one source of a visit,
by min-cost (distance) assignment with a no-match option; an unmatched source founds a new
object. Signs are not separated: a variable star gives positive and negative sources on one
object.

Light curves come from forced PSF photometry of every difference image at every object (not
only the epochs where it was detected), so a variable is judged on all its epochs.
- chi2 is about zero: a difference flux is the change from the template, and a star that does
  not vary has none in any band. (About each band's mean would need two epochs per band not in
  the template, which a short campaign does not have, and would miss a star that stays off its
  template flux.)
- Stetson's J (Stetson 1996) is about each band's weighted mean, pairing observations of one
  night (in different bands), so that a star that brightens in every band that night scores
  high and uncorrelated noise does not.
An object is flagged variable when its chi2 has a probability below VARIABLE_PROBABILITY and it
was detected at least twice as a reliable source, neither a dipole nor a star's subtraction
residual (one 5-sigma noise peak makes a chi2 as large as a real change, and a bright star's
residuals recur), unless it is a template transient: only negative sources, all in one band, is
what a mover or flare caught in that band's template leaves, if its forced fluxes are also
what that leaves: one constant flux in that band, none in the others (a variable that was bright
in one band's template and fainter since also gives only negative sources in that band, but its
flux changes from image to image), and if the deep coadds show no star there in another band
(Rubin's DiaObject keeps its nearest coadd object for this): a mover is in one band's images
only, but a variable that faded since its template, by the same amount on the images of that
band, is a star in every band (one with a flux of at least STATIC_FRACTION of the change at
STATIC_SNR in another band). With three epochs a band and one in the template, the demo had 9
of its 267 detectable variables in that case.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table, vstack
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.stats import chi2 as chi2_dist

from drp_flows.tasks.camera import BANDS
from drp_flows.tasks.isolated_stars import chord, unit_vectors

MATCH_RADIUS = 1.0                 # arcsec
VARIABLE_PROBABILITY = 1e-5        # chi2 tail probability that flags a variable
MIN_DETECTIONS_VARIABLE = 2
PAIR_DAYS = 0.25                   # observations closer than this are one night's pair (Stetson)
STATIC_SNR = 5.0                   # a coadd object's flux in another band: a star is there
STATIC_FRACTION = 0.5              # ... when it is at least this fraction of the change


def sky_position(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of (not necessarily unit) vectors."""
    xyz = xyz / np.linalg.norm(xyz, axis=1)[:, None]
    return (np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) % 360,
            np.degrees(np.arcsin(np.clip(xyz[:, 2], -1, 1))))


def match_visit(objects: np.ndarray, sources: np.ndarray, radius: float) -> np.ndarray:
    """For each source (unit vector) the index of its object, or -1: the min-cost one-to-one
    assignment within `radius` (a chord), where leaving a source unmatched costs `radius`, so
    any match inside the radius beats none and two sources never share an object."""
    match = np.full(len(sources), -1)
    if not len(objects) or not len(sources):
        return match
    near = cKDTree(objects).query_ball_point(sources, radius)
    pairs = np.array([(i, j) for i, js in enumerate(near) for j in js], int).reshape(-1, 2)
    if not len(pairs):
        return match
    n_src = len(sources)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], n_src + pairs[:, 1])),
                       shape=(n_src + len(objects),) * 2)
    _, component = connected_components(graph, directed=False)
    dist = np.linalg.norm(sources[pairs[:, 0]] - objects[pairs[:, 1]], axis=1)
    for c in np.unique(component[pairs[:, 0]]):
        sel = component[pairs[:, 0]] == c
        src, obj = np.unique(pairs[sel, 0]), np.unique(pairs[sel, 1])
        if len(src) == 1 and len(obj) == 1:
            match[src[0]] = obj[0]
            continue
        # distances to the component's objects, then one no-match column per source
        cost = np.full((len(src), len(obj) + len(src)), 1e9)
        cost[np.searchsorted(src, pairs[sel, 0]), np.searchsorted(obj, pairs[sel, 1])] = dist[sel]
        cost[np.arange(len(src)), len(obj) + np.arange(len(src))] = radius
        rows, cols = linear_sum_assignment(cost)
        hit = cols < len(obj)
        match[src[rows[hit]]] = obj[cols[hit]]
    return match


def associate_dia_sources(sources: Table, first_id: int) -> Table:
    """The sources with a `dia_object_id`, objects numbered from `first_id` in order of their
    first detection; positions are the running mean of the sources' unit vectors."""
    sources = sources[np.lexsort((sources["dia_source_id"], sources["mjd"]))]
    xyz = unit_vectors(np.asarray(sources["ra"]), np.asarray(sources["dec"]))
    radius = chord(MATCH_RADIUS)
    sums = np.zeros((0, 3))
    object_of = np.full(len(sources), -1, np.int64)
    visits = np.asarray(sources["visit"])
    starts = np.flatnonzero(np.r_[True, visits[1:] != visits[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(sources)], strict=True):
        centres = sums / np.linalg.norm(sums, axis=1)[:, None] if len(sums) else sums
        match = match_visit(centres, xyz[lo:hi], radius)
        new = match < 0
        match[new] = len(sums) + np.arange(new.sum())
        sums = np.vstack([sums, np.zeros((new.sum(), 3))])
        np.add.at(sums, match, xyz[lo:hi])
        object_of[lo:hi] = match
    out = sources.copy()
    out.add_column(first_id + object_of, name="dia_object_id", index=1)
    return out


def dia_objects(dia_sources: Table) -> Table:
    """One row per DIA object: mean position, number of DIA sources (of them negative, and
    reliable: neither dipole nor star residual), number of bands, first and last epoch."""
    if not len(dia_sources):
        return Table({"dia_object_id": np.zeros(0, np.int64), "ra": np.zeros(0), "dec": np.zeros(0),
                      "n_dia_sources": np.zeros(0, int), "n_negative": np.zeros(0, int),
                      "n_reliable": np.zeros(0, int), "n_bands": np.zeros(0, int),
                      "first_mjd": np.zeros(0),
                      "last_mjd": np.zeros(0)})
    ids, index, counts = np.unique(dia_sources["dia_object_id"], return_inverse=True,
                                   return_counts=True)
    sums = np.zeros((len(ids), 3))
    np.add.at(sums, index, unit_vectors(np.asarray(dia_sources["ra"]), np.asarray(dia_sources["dec"])))
    ra, dec = sky_position(sums)
    mjd = np.asarray(dia_sources["mjd"])
    first, last = np.full(len(ids), np.inf), np.full(len(ids), -np.inf)
    np.minimum.at(first, index, mjd)
    np.maximum.at(last, index, mjd)
    def count(flags: np.ndarray) -> np.ndarray:
        return np.bincount(index, weights=flags.astype(float), minlength=len(ids)).astype(int)

    reliable = ~np.asarray(dia_sources["is_dipole"]) & ~np.asarray(dia_sources["is_residual"])
    pairs = np.unique(np.column_stack([index, np.unique(dia_sources["band"], return_inverse=True)[1]]),
                      axis=0)
    return Table({"dia_object_id": ids, "ra": ra, "dec": dec, "n_dia_sources": counts,
                  "n_negative": count(np.asarray(dia_sources["is_negative"])),
                  "n_reliable": count(reliable), "n_bands": np.bincount(pairs[:, 0], minlength=len(ids)),
                  "first_mjd": first, "last_mjd": last})


def light_curve_stats(objects: Table, forced: Table, coadd_objects: Table | None = None) -> Table:
    """The objects with their forced-photometry light-curve statistics and variable flag;
    `coadd_objects` is the tract's object table from the deep coadds (step 3)."""
    out = objects.copy()
    n_obj = len(out)
    chi2, n_forced = np.zeros(n_obj), np.zeros(n_obj, int)
    stetson_j = np.full(n_obj, np.nan)
    template_transient_prob = np.ones(n_obj)
    strongest_band, strongest_flux = np.full(n_obj, "", dtype="U1"), np.zeros(n_obj)
    row_of = {int(i): k for k, i in enumerate(out["dia_object_id"])}
    good = forced[np.isfinite(forced["psf_flux"]) & (forced["psf_flux_err"] > 0)]
    if len(good):
        good = good[np.lexsort((good["mjd"], good["dia_object_id"]))]
        ids = np.asarray(good["dia_object_id"])
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        for lo, hi in zip(starts, np.r_[starts[1:], len(good)], strict=True):
            lc = good[lo:hi]
            k = row_of[int(ids[lo])]
            z = np.asarray(lc["psf_flux"]) / np.asarray(lc["psf_flux_err"])
            chi2[k], n_forced[k] = float(np.sum(z ** 2)), len(lc)
            stetson_j[k] = _stetson_j(np.asarray(lc["mjd"]), _stetson_residuals(lc))
            template_transient_prob[k], strongest_band[k], strongest_flux[k] = \
                _constant_in_one_band(lc)
    with np.errstate(invalid="ignore"):
        p = np.where(n_forced > 0, chi2_dist.sf(chi2, np.maximum(n_forced, 1)), 1.0)
    out["n_forced"] = n_forced
    out["psf_flux_chi2"] = chi2
    out["psf_flux_chi2_prob"] = p
    out["stetson_j"] = stetson_j
    out["is_template_transient"] = ((out["n_negative"] == out["n_dia_sources"]) & (out["n_bands"] == 1)
                                    & (template_transient_prob >= VARIABLE_PROBABILITY)
                                    & ~_star_in_other_bands(out, strongest_band, strongest_flux,
                                                            coadd_objects))
    out["is_variable"] = ((p < VARIABLE_PROBABILITY) & ~out["is_template_transient"]
                          & (out["n_reliable"] >= MIN_DETECTIONS_VARIABLE))
    return out


def _star_in_other_bands(objects: Table, band: np.ndarray, flux: np.ndarray,
                         coadd_objects: Table | None) -> np.ndarray:
    """Whether the nearest coadd object within MATCH_RADIUS of each DIA object has, in a band
    other than `band`, a flux of at least STATIC_FRACTION of |`flux`| at STATIC_SNR."""
    star = np.zeros(len(objects), bool)
    if coadd_objects is None or not len(coadd_objects) or not len(objects):
        return star
    tree = cKDTree(unit_vectors(np.asarray(coadd_objects["coord_ra"]),
                                np.asarray(coadd_objects["coord_dec"])))
    dist, idx = tree.query(unit_vectors(np.asarray(objects["ra"]), np.asarray(objects["dec"])),
                           distance_upper_bound=chord(MATCH_RADIUS))
    near = np.isfinite(dist)
    for b in BANDS:
        if f"{b}_psf_flux" not in coadd_objects.colnames:
            continue
        f = np.asarray(coadd_objects[f"{b}_psf_flux"], float)[np.where(near, idx, 0)]
        e = np.asarray(coadd_objects[f"{b}_psf_flux_err"], float)[np.where(near, idx, 0)]
        with np.errstate(invalid="ignore"):
            star |= near & (band != b) & (f >= STATIC_SNR * e) & (f >= STATIC_FRACTION * np.abs(flux))
    return star


def _constant_in_one_band(lc: Table) -> tuple[float, str, float]:
    """Probability of the light curve under what a template transient leaves: the same
    difference flux on every image of one band (those sharing the template that caught it; the
    band of the strongest mean) and none in the others; and that band and its mean flux."""
    flux, err = np.asarray(lc["psf_flux"], float), np.asarray(lc["psf_flux_err"], float)
    band = np.asarray(lc["band"])
    w = 1 / err ** 2
    bands = np.unique(band)
    means = {b: np.sum((w * flux)[band == b]) / np.sum(w[band == b]) for b in bands}
    strongest = max(bands, key=lambda b: abs(means[b]) * np.sqrt(np.sum(w[band == b])))
    model = np.where(band == strongest, means[strongest], 0.0)
    return (float(chi2_dist.sf(np.sum(((flux - model) / err) ** 2), max(len(lc) - 1, 1))),
            str(strongest), float(means[strongest]))


def _stetson_residuals(lc: Table) -> np.ndarray:
    """Stetson's normalised residuals about each band's weighted mean,
    delta = sqrt(n / (n - 1)) (f - mean) / sigma (nan in bands seen once)."""
    flux, err = np.asarray(lc["psf_flux"], float), np.asarray(lc["psf_flux_err"], float)
    band = np.asarray(lc["band"])
    delta = np.full(len(lc), np.nan)
    for b in np.unique(band):
        sel = band == b
        n = int(sel.sum())
        if n >= 2:
            w = 1 / err[sel] ** 2
            delta[sel] = np.sqrt(n / (n - 1)) * (flux[sel] - np.sum(w * flux[sel]) / w.sum()) / err[sel]
    return delta


def _stetson_j(mjd: np.ndarray, delta: np.ndarray) -> float:
    """Stetson's J: consecutive observations within PAIR_DAYS form a pair (P = delta_i delta_j),
    the rest count alone (P = delta^2 - 1); J = mean of sign(P) sqrt|P|."""
    ok = np.isfinite(delta)
    t, d = mjd[ok], delta[ok]
    terms, i = [], 0
    while i < len(d):
        if i + 1 < len(d) and t[i + 1] - t[i] < PAIR_DAYS:
            terms.append(d[i] * d[i + 1])
            i += 2
        else:
            terms.append(d[i] ** 2 - 1)
            i += 1
    if not terms:
        return float("nan")
    p = np.array(terms)
    return float(np.mean(np.sign(p) * np.sqrt(np.abs(p))))


def concatenate(tables: list[Table]) -> Table:
    """Stack per-CCD tables, keeping the column layout when every one is empty."""
    non_empty = [t for t in tables if len(t)]
    if not non_empty:
        return tables[0][:0] if tables else Table()
    return vstack(non_empty, metadata_conflicts="silent")
