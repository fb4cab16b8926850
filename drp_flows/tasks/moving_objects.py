"""Moving-object linking over the whole campaign (the MOPS recipe: tracklets within a night,
linked across nights by linear motion).

The candidates are the positive DIA sources, neither dipoles nor star residuals, that are alone
on their DIA object that night (`mover_candidates`): a mover is never in the same place twice
in a night, but two movers can cross one place on different nights, and association then joins
them in one DIA object (the demo lost a findable asteroid so when only sources alone on their
DIA object were candidates).
- A tracklet is two or more detections of one night from different visits, moving at least
  MIN_MOTION and slower than MAX_RATE, on a straight line at a constant rate.
- Two tracklets of different nights link when each one's motion predicts the other's position
  and velocity; the pair's joint linear fit then collects tracklets of further nights.
- A link spanning MIN_NIGHTS nights with residuals below MAX_RMS becomes a solar-system
  object. Links are accepted greedily, longest first, and never share a detection.
Positions are in arcsec on the tangent plane at the candidates' mean position; over a field
of a degree or less, great-circle motion over a few nights is a straight line there.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

MIN_MOTION = 5.0             # arcsec within a night
MAX_RATE = 1.5 * 3600        # arcsec / day
MIN_NIGHTS = 3
TRACKLET_TOLERANCE = 1.0     # arcsec off the line through a tracklet's first two detections
VELOCITY_TOLERANCE = 25.0    # arcsec / day between two tracklets' rates (from ~1-hour baselines)
LINK_TOLERANCE = 2.0         # arcsec from a two-night fit's prediction
MAX_RMS = 0.5                # arcsec, residual rms of an accepted link's linear fit


def tangent_plane(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    """Gnomonic (x, y) in arcsec, x towards east."""
    ra, dec, ra0, dec0 = map(np.radians, (np.asarray(ra), np.asarray(dec), ra0, dec0))
    cos_c = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(ra - ra0)
    x = np.cos(dec) * np.sin(ra - ra0) / cos_c
    y = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(ra - ra0)) / cos_c
    return np.degrees(np.column_stack([x, y])) * 3600


def night_of(mjd: np.ndarray) -> np.ndarray:
    """The observing night (day_obs: the date at local noon in Chile, about MJD - 0.5)."""
    return np.floor(np.asarray(mjd) - 0.5).astype(int)


def linear_fit(t: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Position at the mean epoch, velocity (arcsec/day) and residual rms (arcsec)."""
    t0 = t.mean()
    dt = t - t0
    denom = float(np.sum(dt ** 2))
    v = (dt @ (xy - xy.mean(axis=0))) / denom if denom > 0 else np.zeros(2)
    p0 = xy.mean(axis=0)
    resid = xy - (p0 + np.outer(dt, v))
    return p0, v, float(np.sqrt(np.mean(np.sum(resid ** 2, axis=1))))


def mover_candidates(sources: Table) -> Table:
    """The DIA sources that can be movers (see the module's docstring)."""
    if not len(sources):
        return sources
    night = night_of(np.asarray(sources["mjd"]))
    _, which, count = np.unique(np.column_stack([np.asarray(sources["dia_object_id"]), night]),
                                axis=0, return_inverse=True, return_counts=True)
    alone = count[which.ravel()] == 1
    return sources[alone & ~np.asarray(sources["is_negative"]) & ~np.asarray(sources["is_dipole"])
                   & ~np.asarray(sources["is_residual"])]


def make_tracklets(t: np.ndarray, xy: np.ndarray, visit: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the tracklets of one night: every pair of detections from two visits
    with a plausible motion, extended by detections of further visits on its line; tracklets
    contained in a longer one are dropped."""
    order = np.argsort(t)
    t, xy, visit = t[order], xy[order], visit[order]
    tree = cKDTree(xy)
    found: set[tuple[int, ...]] = set()
    span = t.max() - t.min() if len(t) else 0.0
    for i in range(len(t)):
        for j in tree.query_ball_point(xy[i], MAX_RATE * span + 1e-9):
            dt = t[j] - t[i]
            if dt <= 0 or visit[j] == visit[i]:
                continue
            step = np.hypot(*(xy[j] - xy[i]))
            if step < MIN_MOTION or step > MAX_RATE * dt:
                continue
            v = (xy[j] - xy[i]) / dt
            members = {i, j}
            predicted = xy[i] + np.outer(t - t[i], v)
            close = np.hypot(*(xy - predicted).T) < TRACKLET_TOLERANCE
            for k in np.flatnonzero(close):
                if visit[k] not in {visit[m] for m in members}:
                    members.add(int(k))
            found.add(tuple(sorted(members)))
    longest = sorted(found, key=len, reverse=True)
    kept: list[set] = []
    for tr in longest:
        if not any(set(tr) <= k for k in kept):
            kept.append(set(tr))
    return [order[sorted(k)] for k in kept]


def link(sources: Table) -> tuple[Table, Table]:
    """Solar-system objects from the candidate DIA sources (columns dia_source_id, ra, dec,
    mjd, visit): (ss_object, ss_source)."""
    if not len(sources):
        return _ss_tables(sources, [], [], 0.0, 0.0)
    ra0, dec0 = float(np.mean(sources["ra"])), float(np.mean(sources["dec"]))
    xy = tangent_plane(sources["ra"], sources["dec"], ra0, dec0)
    t = np.asarray(sources["mjd"], float)
    visit = np.asarray(sources["visit"])
    nights = night_of(t)
    tracklets = []
    for n in np.unique(nights):
        idx = np.flatnonzero(nights == n)
        tracklets += [idx[tr] for tr in make_tracklets(t[idx], xy[idx], visit[idx])]
    if not tracklets:
        return _ss_tables(sources, [], [], ra0, dec0)
    fits = [linear_fit(t[tr], xy[tr]) for tr in tracklets]
    epoch = np.array([t[tr].mean() for tr in tracklets])
    pos = np.array([f[0] for f in fits])
    vel = np.array([f[1] for f in fits])
    night = np.array([nights[tr[0]] for tr in tracklets])

    # tracklet pairs of different nights whose motions predict each other
    dt = epoch[None, :] - epoch[:, None]
    predicted = pos[:, None, :] + vel[:, None, :] * dt[..., None]
    miss = np.hypot(*(predicted - pos[None, :, :]).transpose(2, 0, 1))
    dv = np.hypot(*(vel[:, None, :] - vel[None, :, :]).transpose(2, 0, 1))
    ok = (night[:, None] < night[None, :]) & (dv < VELOCITY_TOLERANCE) \
        & (miss < VELOCITY_TOLERANCE * np.abs(dt) + LINK_TOLERANCE)
    candidates = []
    for a, b in zip(*np.nonzero(ok), strict=True):
        members = list(tracklets[a]) + list(tracklets[b])
        p0, v, _ = linear_fit(t[members], xy[members])
        t_mid = t[members].mean()
        used_nights = {night[a], night[b]}
        for c in np.argsort(np.abs(epoch - t_mid)):
            if night[c] in used_nights:
                continue
            tr = tracklets[c]
            off = xy[tr] - (p0 + np.outer(t[tr] - t_mid, v))
            if np.all(np.hypot(*off.T) < LINK_TOLERANCE):
                members += list(tr)
                used_nights.add(night[c])
                p0, v, _ = linear_fit(t[members], xy[members])
                t_mid = t[members].mean()
        rms = linear_fit(t[members], xy[members])[2]
        if len(used_nights) >= MIN_NIGHTS and rms < MAX_RMS:
            candidates.append((len(used_nights), len(members), -rms, sorted(set(members))))
    taken = np.zeros(len(sources), bool)
    objects = []
    for *_, members in sorted(candidates, key=lambda c: c[:3], reverse=True):
        if not taken[members].any():
            taken[members] = True
            objects.append(np.array(members))
    fitted = [linear_fit(t[m], xy[m]) for m in objects]
    return _ss_tables(sources, objects, fitted, ra0, dec0, t, nights)


def _ss_tables(sources: Table, objects: list[np.ndarray], fitted: list, ra0: float, dec0: float,
               t: np.ndarray | None = None, nights: np.ndarray | None = None) -> tuple[Table, Table]:
    """ss_object (id, epoch, position, rate in deg/day, nights, sources, rms) and ss_source."""
    n = len(objects)
    obj = Table({"ss_object_id": np.arange(n, dtype=np.int64),
                 "epoch_mjd": np.array([t[m].mean() for m in objects]) if n else np.zeros(0),
                 "ra": np.zeros(n), "dec": np.zeros(n),
                 "rate_ra": np.array([f[1][0] for f in fitted]) / 3600 if n else np.zeros(0),
                 "rate_dec": np.array([f[1][1] for f in fitted]) / 3600 if n else np.zeros(0),
                 "n_nights": np.array([len(set(nights[m])) for m in objects], int) if n else np.zeros(0, int),
                 "n_sources": np.array([len(m) for m in objects], int),
                 "rms_arcsec": np.array([f[2] for f in fitted]) if n else np.zeros(0)})
    if n:
        obj["ra"], obj["dec"] = _from_tangent_plane(np.array([f[0] for f in fitted]), ra0, dec0)
    member = np.concatenate(objects) if n else np.zeros(0, int)
    owner = np.repeat(np.arange(n), [len(m) for m in objects]).astype(np.int64)
    src = Table({"ss_object_id": owner,
                 **{c: np.asarray(sources[c])[member] for c in ("dia_source_id", "visit", "mjd",
                                                                 "ra", "dec")}})
    return obj, src


def _from_tangent_plane(xy: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.radians(xy[:, 0] / 3600), np.radians(xy[:, 1] / 3600)
    ra0, dec0 = np.radians(ra0), np.radians(dec0)
    rho = np.hypot(x, y)
    c = np.arctan(rho)
    with np.errstate(invalid="ignore", divide="ignore"):
        dec = np.arcsin(np.cos(c) * np.sin(dec0) + np.where(rho > 0, y * np.sin(c) * np.cos(dec0) / rho, 0))
    ra = ra0 + np.arctan2(x * np.sin(c), rho * np.cos(dec0) * np.cos(c) - y * np.sin(dec0) * np.sin(c))
    return np.degrees(ra) % 360, np.degrees(dec)
