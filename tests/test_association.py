"""Step 5 algorithms on synthetic catalogs with known answers: DIA association, light-curve
statistics and variable flags, moving-object linking."""

import numpy as np
from astropy.table import Table, vstack

from drp_flows.tasks.association import (
    associate_dia_sources,
    dia_objects,
    light_curve_stats,
    match_visit,
)
from drp_flows.tasks.isolated_stars import chord, unit_vectors
from drp_flows.tasks.moving_objects import MIN_NIGHTS, link, mover_candidates

RA0, DEC0 = 53.1, -28.1
ARCSEC = 1 / 3600


def test_one_source_per_object_and_the_closer_one_wins():
    objects = unit_vectors(np.array([RA0]), np.array([DEC0]))
    cos = np.cos(np.radians(DEC0))
    sources = unit_vectors(RA0 + np.array([0.6, 0.2, 3.0]) * ARCSEC / cos, np.full(3, DEC0))
    assert match_visit(objects, sources, chord(1.0)).tolist() == [-1, 0, -1]


def test_static_sources_become_one_object_each():
    rng = np.random.default_rng(1)
    n_static, n_visits = 60, 6
    ra = RA0 + rng.uniform(-0.05, 0.05, n_static)
    dec = DEC0 + rng.uniform(-0.05, 0.05, n_static)
    rows = []
    for v in range(n_visits):
        seen = rng.uniform(0, 1, n_static) < 0.8
        noise = rng.normal(0, 0.1 * ARCSEC, (2, n_static))
        for k in np.flatnonzero(seen):
            rows.append((v * 1000 + k, 100 + v, 61000.1 + v, ra[k] + noise[0, k], dec[k] + noise[1, k],
                         k, v % 2 == 0, "gr"[v % 2]))
        for j in range(5):                   # noise peaks, seen once
            rows.append((v * 1000 + 900 + j, 100 + v, 61000.1 + v, RA0 + rng.uniform(-0.05, 0.05),
                         DEC0 + rng.uniform(-0.05, 0.05), -1, False, "r"))
    src = Table(rows=rows, names=("dia_source_id", "visit", "mjd", "ra", "dec", "truth",
                                  "is_negative", "band"))
    src["is_dipole"] = src["dia_source_id"] % 7 == 0
    src["is_residual"] = False
    out = associate_dia_sources(src, 10 ** 12)
    static = out[out["truth"] >= 0]
    for k in range(n_static):               # every star's sources share one object, of its own
        ids = set(static["dia_object_id"][static["truth"] == k])
        assert len(ids) == 1
    assert len(set(static["dia_object_id"])) == n_static
    objects = dia_objects(out)
    assert len(objects) == n_static + 5 * n_visits
    assert objects["dia_object_id"].min() == 10 ** 12
    star = objects[objects["n_dia_sources"] > 1]       # sources alternate sign and band by visit
    assert ((star["n_negative"] > 0) & (star["n_negative"] < star["n_dia_sources"])).mean() > 0.9
    assert (star["n_bands"] == 2).mean() > 0.9
    assert (star["n_reliable"] < star["n_dia_sources"]).any()


def _forced(obj_id: int, flux: np.ndarray, band: np.ndarray, mjd: np.ndarray, err: float = 100.0):
    return Table({"dia_object_id": np.full(len(flux), obj_id), "band": band, "mjd": mjd,
                  "psf_flux": flux, "psf_flux_err": np.full(len(flux), err)})


def test_variables_flagged_and_constant_or_template_movers_not():
    rng = np.random.default_rng(2)
    mjd = np.repeat(61000.1 + np.arange(4), 3) + np.tile([0, 0.04, 0.08], 4)
    band = np.tile(["g", "r", "i"], 4)
    tables, truth, negative, bands, coadd_flux = [], [], [], [], []
    n = 600
    for k in range(n):
        kind = ["constant", "variable", "template mover", "faded variable", "variable",
                "faded in g"][k % 6]
        if kind == "constant":
            true = np.zeros(12)
        elif kind == "variable":      # 0.3 mag sinusoid of a 21st-mag star (~13,000 nJy)
            true = 13000 * 0.3 * 0.92 * np.sin(2 * np.pi * mjd / 1.7 + k)
        elif kind == "faded variable":   # bright in the templates, fainter since, by 5-20%
            true = -13000 * np.linspace(0.05, 0.2, 12)
        else:     # an asteroid in the g template, or a star bright in it: -2,000 nJy in g since
            true = np.where(band == "g", -2000.0, 0.0)
        tables.append(_forced(k, true + rng.normal(0, 100, 12), band, mjd))
        truth.append("variable" if kind.startswith("faded") else kind)
        # a faded variable detected only in g, as negatives: like a template mover but changing
        negative.append(3 if kind in ("template mover", "faded variable", "faded in g") else 1)
        bands.append(1 if kind in ("template mover", "faded variable", "faded in g") else 2)
        # the deep coadds: the mover in g only (one visit of three), a star in every band
        coadd_flux.append({"g": 700.0, "r": 0.0, "i": 0.0} if kind == "template mover"
                          else {"g": 5000.0, "r": 6000.0, "i": 7000.0})
    ra = RA0 + np.arange(n) * 10 * ARCSEC / np.cos(np.radians(DEC0))
    objects = Table({"dia_object_id": np.arange(n), "ra": ra, "dec": np.full(n, DEC0),
                     "n_dia_sources": np.full(n, 3), "n_reliable": np.full(n, 3),
                     "n_negative": negative, "n_bands": bands})
    coadd = Table({"coord_ra": ra + 0.2 * ARCSEC, "coord_dec": np.full(n, DEC0)})
    for b in "gri":
        coadd[f"{b}_psf_flux"] = [f[b] + rng.normal(0, 30) for f in coadd_flux]
        coadd[f"{b}_psf_flux_err"] = np.full(n, 30.0)
    stats = light_curve_stats(objects, vstack(tables), coadd)
    # without the coadds a star faded in one band is what a mover in that band's template is
    alone = light_curve_stats(objects, vstack(tables))
    assert alone["is_template_transient"][np.arange(n) % 6 == 5].all()
    truth = np.array(truth)
    assert stats["is_variable"][truth == "variable"].mean() >= 0.95
    assert stats["is_variable"][truth != "variable"].mean() <= 0.01
    assert np.median(stats["stetson_j"][truth == "variable"]) > 1.0
    assert abs(np.median(stats["stetson_j"][truth == "constant"])) < 0.3
    chi2_dof = stats["psf_flux_chi2"] / stats["n_forced"]
    assert 0.8 < np.median(chi2_dof[truth == "constant"]) < 1.2
    assert stats["is_template_transient"][truth == "template mover"].all()
    assert not stats["is_template_transient"][truth != "template mover"].any()


def test_asteroids_linked_across_nights_and_noise_left_alone():
    rng = np.random.default_rng(3)
    n_ast, nights, rounds = 12, 4, 3
    rate = rng.uniform(0.04, 0.08, n_ast) * 3600            # arcsec/day
    angle = rng.uniform(-0.35, 0.35, n_ast) + np.where(rng.uniform(0, 1, n_ast) < 0.5, 0, np.pi)
    x0, y0 = rng.uniform(-600, 600, (2, n_ast))
    cos = np.cos(np.radians(DEC0))
    rows, k = [], 0
    for night in range(nights):
        for rnd in range(rounds):
            t = 61000.1 + night + rnd / 24
            visit = night * 10 + rnd
            dt = t - 61001.6
            for a in range(n_ast):
                if rng.uniform() < 0.15:          # missed: in a template, a gap, too faint
                    continue
                x = x0[a] + rate[a] * np.cos(angle[a]) * dt + rng.normal(0, 0.1)
                y = y0[a] + rate[a] * np.sin(angle[a]) * dt + rng.normal(0, 0.1)
                rows.append((k, visit, t, RA0 + x / 3600 / cos, DEC0 + y / 3600, a))
                k += 1
            for _ in range(40):                    # noise peaks and unassociated residuals
                x, y = rng.uniform(-900, 900, 2)
                rows.append((k, visit, t, RA0 + x / 3600 / cos, DEC0 + y / 3600, -1))
                k += 1
    src = Table(rows=rows, names=("dia_source_id", "visit", "mjd", "ra", "dec", "asteroid"))
    ss_object, ss_source = link(src)
    truth = dict(zip(src["dia_source_id"], src["asteroid"], strict=True))
    owners = [np.array([truth[s] for s in ss_source["dia_source_id"][ss_source["ss_object_id"] == o]])
              for o in ss_object["ss_object_id"]]
    assert all(len(set(o)) == 1 and o[0] >= 0 for o in owners), "a link mixes sources"
    assert (ss_object["n_nights"] >= MIN_NIGHTS).all()
    linked = {int(o[0]) for o in owners}
    assert len(linked) >= 0.9 * n_ast
    for row, o in zip(ss_object, owners, strict=True):       # rates in deg/day, within 1"/day
        assert abs(np.hypot(row["rate_ra"], row["rate_dec"]) * 3600 - rate[o[0]]) < 1.0


def test_movers_crossing_one_place_on_two_nights_stay_candidates():
    """Association joins two asteroids that cross one place on different nights in one DIA
    object (the demo lost a findable asteroid so); a star seen twice in a night is no mover."""
    night1, night2 = 61000.1, 61001.1
    rows = [  # dia_source_id, dia_object_id, mjd, is_negative, is_dipole, is_residual
        (1, 10, night1, False, False, False),           # asteroid A here on night 1
        (2, 10, night2, False, False, False),           # asteroid B here on night 2
        (3, 11, night1, False, False, False),           # a variable, twice on night 1
        (4, 11, night1 + 0.04, False, False, False),
        (5, 12, night2, True, False, False),            # negative, a dipole, a residual
        (6, 13, night2, False, True, False),
        (7, 14, night2, False, False, True),
        (8, 15, night2, False, False, False)]           # a lone positive source
    src = Table(rows=rows, names=("dia_source_id", "dia_object_id", "mjd", "is_negative",
                                  "is_dipole", "is_residual"))
    assert list(mover_candidates(src)["dia_source_id"]) == [1, 2, 8]
    assert len(mover_candidates(src[:0])) == 0


def test_a_bright_stars_residuals_never_make_a_variable():
    """Subtraction residuals recur on a bright star at every epoch; flagged as residuals, they
    leave its object unflagged however large its chi2."""
    mjd = 61000.1 + np.arange(6)
    forced = _forced(7, np.array([5000.0, -6000, 4000, -5000, 6000, -4000]), np.full(6, "r"), mjd,
                     err=400.0)
    objects = Table({"dia_object_id": [7], "n_dia_sources": [6], "n_reliable": [0],
                     "n_negative": [3], "n_bands": [1]})
    stats = light_curve_stats(objects, forced)
    assert stats["psf_flux_chi2_prob"][0] < 1e-10 and not stats["is_variable"][0]
    objects["n_reliable"] = 2
    assert light_curve_stats(objects, forced)["is_variable"][0]
