"""The mini-ComCam survey simulator: raws, calibration frames, a reference catalog and the truth.

No real data can be downloaded here, so the system observes a sky it makes itself and every
science step is checked against that truth. Deterministic from one seed: each CCD draws from its
own `SeedSequence((seed, kind, visit, detector))`, so any CCD can be (re)made alone and in parallel.

Signal chain (imSim's order, without crosstalk and CTI): electrons from sky + stars + asteroids
(drawn as Moffats at pixel centres, or with GalSim: validation/galsim_sky.py, with galaxies),
times the vignetted response and grey extinction, plus dark current, with Poisson noise; split
into amplifiers and flipped to readout order; read noise; divided by the per-amp gain; bias
level and bias structure added; serial and parallel overscan carry the same bias and noise.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from drp_flows.tasks.camera import (
    BANDS,
    DETECTOR_NAMES,
    INSTRUMENT,
    PHYSICAL_FILTERS,
    PIXEL_SCALE,
    SATURATION_ADU,
    Camera,
)
from drp_flows.tasks.psf import add_point_sources
from drp_flows.tasks.skymap import MiniSkymap, tangent_wcs
from drp_flows.validation.galsim_sky import (
    FAMILIES,
    PsfField,
    SceneDrawer,
    local_jacobian,
    make_galaxies,
)

# SMTN-002, 30 s visits: zeropoint (mag for 1 e-/s) and dark-sky brightness (mag/arcsec^2).
ZEROPOINT = {"u": 26.52, "g": 28.51, "r": 28.36, "i": 28.17, "z": 27.78, "y": 26.82}
SKY_MAG = {"u": 23.05, "g": 22.25, "r": 21.20, "i": 20.46, "z": 19.61, "y": 18.60}
EXPTIME = 30.0
DARK_CURRENT = 0.02       # e-/s
FIRST_NIGHT_MJD = 61000   # 2025-11-21 UTC, day_obs 20251120
VISIT_SPACING_S = 120.0   # one 30 s exposure plus slew
ROUND_SPACING_S = 3600.0  # revisits of a tract within a night: asteroids move >= 6" (tracklets)
SKIES = ("moffat", "galsim")   # Moffats at pixel centres, stars only; or validation/galsim_sky.py


@dataclass(frozen=True)
class SurveyConfig:
    """What to simulate. The defaults are the demo survey; tests shrink ccd_size and nights."""

    seed: int = 42
    ccd_size: int = 1024          # 4x the stars of 512 px, which global u zeropoints need
    nights: int = 3
    rounds_per_night: int = 3     # visits of every tract per night, one band per round
    bands: tuple[str, ...] = BANDS
    ra: float = 53.10             # field centre (the ECDFS, a ComCam field)
    dec: float = -28.10
    star_density: float = 150.0   # stars per arcmin^2 brighter than mag_faint (a low-latitude field)
    mag_bright: float = 17.0
    mag_faint: float = 25.0
    count_slope: float = 0.2      # d log10 N / dm
    variable_fraction: float = 0.02
    asteroids_per_tract: int = 12  # most leave the field or a CCD gap; some 15% are seen on 3 nights
    dither_arcsec: float = 20.0
    pointing_error_arcsec: float = 1.0
    refcat_mag_limit: float = 23.0
    n_bias: int = 5
    n_dark: int = 3
    n_flat: int = 3
    workers: int = 2
    sky: str = "moffat"           # or "galsim": GalSim PSFs varying over the field, and galaxies
    psf_family: str = FAMILIES[0]  # galsim sky: the PSF's family (validation/galsim_sky.py)
    psf_size_gradient: float = 0.03   # galsim sky: PSF size change, raft centre to edge
    galaxy_density: float = 50.0  # galsim sky: galaxies per arcmin^2 to r = 26

    def __post_init__(self):
        unknown = set(self.bands) - set(BANDS)
        if unknown:
            raise ValueError(f"bands: unknown {sorted(unknown)}; choose from {BANDS}")
        if self.sky not in SKIES:
            raise ValueError(f"sky: {self.sky!r} is not one of {SKIES}")
        if self.psf_family not in FAMILIES:
            raise ValueError(f"psf_family: {self.psf_family!r} is not one of {FAMILIES}")

    @property
    def camera(self) -> Camera:
        return Camera(ccd_size=self.ccd_size, seed=self.seed + 1)

    @property
    def skymap(self) -> MiniSkymap:
        fp = 3 * self.ccd_size + 2 * self.camera.gap_pixels
        return MiniSkymap(ra=self.ra, dec=self.dec, tract_pixels=int(np.ceil(fp * 1.15 / 16) * 16))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bands"] = list(self.bands)
        return d


@dataclass
class Visit:
    visit: int
    band: str
    tract: int           # the tract the pointing aims at (decides which site holds the raw)
    night: int
    mjd: float
    ra: float            # true boresight
    dec: float
    rotation: float      # deg
    seeing: float        # PSF FWHM, arcsec
    extinction: float    # grey, mag
    ra_reported: float = 0.0   # what the telescope says (pointing error)
    dec_reported: float = 0.0

    @property
    def day_obs(self) -> int:
        return int(Time(self.mjd - 0.5, format="mjd").strftime("%Y%m%d"))


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def plan_visits(cfg: SurveyConfig) -> list[Visit]:
    """The cadence: every night, `rounds_per_night` rounds over all tracts. Round r of tract t
    is always in band (t + r) mod 6, so a tract sees `rounds_per_night` bands, each once a
    night: repeats in one band come on different nights, which the global calibration, the
    templates, light curves and asteroid linking all need; all bands appear over the tracts."""
    rng = _rng(cfg.seed, 1)
    sky = cfg.skymap
    visits, k = [], 0
    for night in range(cfg.nights):
        for rnd in range(cfg.rounds_per_night):
            for tract in sky.tracts:
                band = cfg.bands[(rnd + tract) % len(cfg.bands)]
                ra0, dec0 = sky.tract_center(tract)
                dra, ddec = rng.uniform(-1, 1, 2) * cfg.dither_arcsec / 3600
                ra = ra0 + dra / np.cos(np.radians(dec0))
                mjd = FIRST_NIGHT_MJD + night + 0.1 + (rnd * ROUND_SPACING_S
                                                         + tract * VISIT_SPACING_S) / 86400
                perr = rng.normal(0, cfg.pointing_error_arcsec / 3600, 2)
                v = Visit(
                    visit=0, band=band, tract=tract, night=night, mjd=mjd,
                    ra=ra, dec=dec0 + ddec, rotation=float(rng.uniform(-2, 2)),
                    seeing=float(np.clip(rng.lognormal(np.log(1.0), 0.2), 0.7, 1.4)),
                    extinction=float(rng.uniform(0.0, 0.3)),
                    ra_reported=ra + perr[0] / np.cos(np.radians(dec0)),
                    dec_reported=dec0 + ddec + perr[1])
                v.visit = int(Time(v.mjd - 0.5, format="mjd").strftime("%Y%m%d")) * 100000 + k
                visits.append(v)
                k += 1
    return visits


def field_half_size(cfg: SurveyConfig) -> tuple[float, float]:
    """Half the width and height of the skymap's field, degrees."""
    sky = cfg.skymap
    return (sky.n_cols * sky.tract_pixels / 2 * PIXEL_SCALE / 3600,
            sky.n_rows * sky.tract_pixels / 2 * PIXEL_SCALE / 3600)


def galaxies(cfg: SurveyConfig) -> Table | None:
    """The galsim sky's galaxies (none on the Moffat sky)."""
    if cfg.sky != "galsim" or cfg.galaxy_density <= 0:
        return None
    return make_galaxies(cfg.seed, cfg.ra, cfg.dec, *field_half_size(cfg), cfg.galaxy_density)


def psf_field(cfg: SurveyConfig, visit: Visit) -> PsfField:
    """A visit's PSF over the focal plane on the galsim sky."""
    return PsfField.for_visit(visit.band, visit.seeing, _rng(cfg.seed, 16, visit.visit),
                              cfg.psf_family, cfg.psf_size_gradient)


def make_stars(cfg: SurveyConfig) -> Table:
    """Stars over the whole skymap with a power-law magnitude distribution and a stellar locus."""
    rng = _rng(cfg.seed, 2)
    half_w, half_h = field_half_size(cfg)
    area = 4 * half_w * half_h * 3600
    n = rng.poisson(cfg.star_density * area)
    field_wcs = tangent_wcs(cfg.ra, cfg.dec, (0.0, 0.0), 3600.0)   # 1 pixel = 1 degree
    ra, dec = field_wcs.all_pix2world(rng.uniform(-half_w, half_w, n),
                                      rng.uniform(-half_h, half_h, n), 0)
    # inverse-CDF draw from dN/dm ~ 10^(slope m) between the bright and faint limits
    a, b = 10 ** (cfg.count_slope * cfg.mag_bright), 10 ** (cfg.count_slope * cfg.mag_faint)
    r = np.log10(a + rng.uniform(0, 1, n) * (b - a)) / cfg.count_slope
    gr = rng.uniform(0.2, 1.4, n)
    mags = {"g": r + gr, "r": r, "u": r + gr + 0.9 + 0.9 * gr, "i": r - 0.4 * gr,
            "z": r - 0.55 * gr, "y": r - 0.6 * gr}
    t = Table({"id": np.arange(n, dtype=np.int64), "ra": ra, "dec": dec})
    for band in BANDS:
        t[f"{band}_mag"] = mags[band]
    var = rng.uniform(0, 1, n) < cfg.variable_fraction
    t["is_variable"] = var
    t["var_amplitude"] = np.where(var, rng.uniform(0.1, 0.5, n), 0.0)
    t["var_period"] = np.where(var, rng.uniform(0.3, 10.0, n), 0.0)
    t["var_phase"] = np.where(var, rng.uniform(0, 2 * np.pi, n), 0.0)
    return t


def star_mags(stars: Table, band: str, mjd: float) -> np.ndarray:
    """True magnitudes at a time: variables are sinusoids in magnitude."""
    m = np.asarray(stars[f"{band}_mag"], float)
    period = np.where(stars["var_period"] > 0, stars["var_period"], 1.0)
    return m + stars["var_amplitude"] * np.sin(2 * np.pi * (mjd - FIRST_NIGHT_MJD) / period
                                               + stars["var_phase"])


def make_asteroids(cfg: SurveyConfig) -> Table:
    """Slow main-belt-like movers (0.04-0.06 deg/day, mostly along RA, as near a stationary
    point) placed so that their whole track over the campaign stays inside the field: a tract
    is 0.1 deg wide with 512-px CCDs (0.2 with 1024 px) and the field three tracts, so faster
    movers leave it between nights and could never be linked across three; slower ones move
    less than a tracklet's 5" between rounds an hour apart."""
    rng = _rng(cfg.seed, 3)
    sky = cfg.skymap
    n = cfg.asteroids_per_tract * len(sky.tracts)
    mid_mjd = FIRST_NIGHT_MJD + (cfg.nights - 1) / 2 + 0.12
    rate = rng.uniform(0.04, 0.06, n)
    angle = rng.uniform(-0.35, 0.35, n) + np.where(rng.uniform(0, 1, n) < 0.5, 0, np.pi)
    travel = rate * (cfg.nights - 1) / 2            # deg from the mid-campaign position
    margin = 30 / 3600                              # keep off the outermost CCD edges
    half_w, half_h = (h - margin for h in field_half_size(cfg))
    dx = rng.uniform(-1, 1, n) * np.maximum(half_w - travel * np.abs(np.cos(angle)), 0)
    dy = rng.uniform(-1, 1, n) * np.maximum(half_h - travel * np.abs(np.sin(angle)), 0)
    return Table({
        "id": np.arange(n, dtype=np.int64),
        "ra0": cfg.ra + dx / np.cos(np.radians(cfg.dec)),
        "dec0": cfg.dec + dy,
        "mjd0": np.full(n, mid_mjd),
        "rate_ra": rate * np.cos(angle),            # deg/day on the sky
        "rate_dec": rate * np.sin(angle),
        "r_mag": rng.uniform(19.5, 22.0, n),
    })


def asteroid_positions(ast: Table, mjd: float) -> tuple[np.ndarray, np.ndarray]:
    dt = mjd - np.asarray(ast["mjd0"])
    dec = ast["dec0"] + ast["rate_dec"] * dt
    return np.asarray(ast["ra0"] + ast["rate_ra"] * dt / np.cos(np.radians(dec))), np.asarray(dec)


def asteroid_mags(ast: Table, band: str) -> np.ndarray:
    """Magnitudes of the (reddish, solar-coloured) asteroids: 0.4 mag fainter in u and g than r."""
    return np.asarray(ast["r_mag"]) + (0.4 if band in "ug" else 0.0)


def detector_wcs(cam: Camera, detector: int, ra: float, dec: float, rotation: float,
                 distortion: bool = True) -> WCS:
    """TAN(-SIP) WCS of one detector for a boresight; SIP terms give ~0.5 px at the CCD corners."""
    dx, dy = cam.detector_offset(detector)
    centre = (cam.ccd_size - 1) / 2
    boresight = tangent_wcs(ra, dec, (0.0, 0.0), PIXEL_SCALE, rotation)
    (cra,), (cdec,) = boresight.all_pix2world([dx], [dy], 0)
    w = tangent_wcs(float(cra), float(cdec), (centre, centre), PIXEL_SCALE, rotation)
    if not distortion:
        return w
    rng = _rng(cam.seed, 10, detector)
    scale = 0.5 / (cam.ccd_size / 2) ** 2
    coeffs = rng.uniform(-1, 1, (2, 3)) * scale / 3
    header = w.to_header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    header["A_ORDER"] = header["B_ORDER"] = 2
    for axis, name in enumerate("AB"):
        for (p, q), c in zip(((2, 0), (1, 1), (0, 2)), coeffs[axis], strict=True):
            header[f"{name}_{p}_{q}"] = float(c)
    return WCS(header)


def response(cam: Camera, detector: int) -> np.ndarray:
    """Relative throughput of each pixel: vignetting x per-CCD QE x pixel response (flats see it)."""
    n = cam.ccd_size
    yy, xx = np.mgrid[0:n, 0:n]
    rng = _rng(cam.seed, 11, detector)
    return (cam.vignetting(detector, xx, yy) * rng.uniform(0.97, 1.03)
            * (1 + 0.005 * rng.standard_normal((n, n))))


def bias_structure(cam: Camera, detector: int) -> np.ndarray:
    """A fixed 2-D bias pattern (ADU) that the overscan does not remove; the master bias does."""
    n = cam.ccd_size
    yy, xx = np.mgrid[0:n, 0:n] / n
    rng = _rng(cam.seed, 12, detector)
    return (rng.uniform(-2, 2) * xx + rng.uniform(-2, 2) * yy + 0.5 * np.sin(12 * xx)).astype(float)


def hot_pixels(cam: Camera, detector: int) -> np.ndarray:
    """Dark current per pixel (e-/s): the nominal rate plus a few hot pixels."""
    n = cam.ccd_size
    rng = _rng(cam.seed, 13, detector)
    dark = np.full((n, n), DARK_CURRENT)
    hot = rng.integers(0, n * n, max(1, n * n // 10000))
    dark.flat[hot] = rng.uniform(20, 100, hot.size)
    return dark


def read_out(cam: Camera, detector: int, electrons: np.ndarray, rng: np.random.Generator,
             bias_offset: float = 0.0) -> fits.HDUList:
    """Split an electron image into amps in readout order, add read noise, gain, bias, overscan."""
    gains, noise, bias = cam.gain(detector), cam.read_noise(detector), cam.bias_level(detector)
    structure = bias_structure(cam, detector)
    hdus = [fits.PrimaryHDU()]
    for amp in cam.amps:
        sl = amp.ccd_slice
        raw = np.zeros(amp.raw_shape)
        data = amp.to_readout(electrons[sl])
        raw[amp.data_slice] = data
        raw += rng.normal(0, noise[amp.index], raw.shape)
        raw /= gains[amp.index]
        raw += bias[amp.index] + bias_offset
        raw[amp.data_slice] += amp.to_readout(structure[sl])
        raw = np.clip(np.round(raw), 0, SATURATION_ADU).astype(np.int32)
        h = fits.ImageHDU(raw, name=f"SEGMENT{amp.index // 8}{amp.index % 8}")
        ds, os_ = amp.data_slice, amp.serial_overscan_slice
        h.header["DATASEC"] = f"[{ds[1].start + 1}:{ds[1].stop},{ds[0].start + 1}:{ds[0].stop}]"
        h.header["BIASSEC"] = f"[{os_[1].start + 1}:{os_[1].stop},{os_[0].start + 1}:{os_[0].stop}]"
        hdus.append(h)
    return fits.HDUList(hdus)


def _primary_header(cam: Camera, detector: int, obstype: str, band: str | None, mjd: float,
                    exptime: float, exposure: int) -> fits.Header:
    h = fits.Header()
    h["INSTRUME"] = INSTRUMENT
    h["TELESCOP"] = "Simonyi Survey Telescope (simulated)"
    h["DETECTOR"] = detector
    h["DETNAME"] = DETECTOR_NAMES[detector]
    h["CCDSIZE"] = cam.ccd_size
    h["EXPID"] = exposure
    h["IMGTYPE"] = obstype
    h["BAND"] = band or ""
    h["FILTER"] = PHYSICAL_FILTERS[band] if band else "none"
    h["MJD-OBS"] = mjd
    h["DATE-OBS"] = Time(mjd, format="mjd").isot
    h["EXPTIME"] = exptime
    h["DARKTIME"] = exptime
    return h


def simulate_science_ccd(cfg: SurveyConfig, visit: Visit, detector: int, stars: Table,
                         asteroids: Table, galaxy_table: Table | None = None
                         ) -> tuple[fits.HDUList, dict]:
    """One raw science CCD and its truth row (the galsim sky's: with its PSF field)."""
    cam = cfg.camera
    rng = _rng(cfg.seed, 100, visit.visit, detector)
    n = cam.ccd_size
    wcs = detector_wcs(cam, detector, visit.ra, visit.dec, visit.rotation)
    fwhm_px = visit.seeing / PIXEL_SCALE
    zp_offset = float(_rng(cfg.seed, 14, visit.visit, detector).normal(0, 0.003)
                      + _rng(cfg.seed, 15, detector).normal(0, 0.004))
    zp_e = ZEROPOINT[visit.band] + 2.5 * np.log10(EXPTIME) - visit.extinction - zp_offset

    sky_e = 10 ** (-0.4 * (SKY_MAG[visit.band] - ZEROPOINT[visit.band])) * PIXEL_SCALE ** 2 * EXPTIME
    image = np.full((n, n), sky_e)
    margin = 4 * fwhm_px
    ra = np.concatenate([np.asarray(stars["ra"]), asteroid_positions(asteroids, visit.mjd)[0]])
    dec = np.concatenate([np.asarray(stars["dec"]), asteroid_positions(asteroids, visit.mjd)[1]])
    x, y = _pixels(wcs, ra, dec, n)
    inside = (x > -margin) & (x < n - 1 + margin) & (y > -margin) & (y < n - 1 + margin)
    mags = np.concatenate([star_mags(stars, visit.band, visit.mjd),
                           asteroid_mags(asteroids, visit.band)])
    flux = 10 ** (-0.4 * (mags - zp_e))
    truth_psf = {}
    if cfg.sky == "galsim":
        field = psf_field(cfg, visit)
        drawer = SceneDrawer(field, cam, detector, image)
        drawer.add_stars(x[inside], y[inside], flux[inside])
        if galaxy_table is not None:
            gx, gy = _pixels(wcs, np.asarray(galaxy_table["ra"]), np.asarray(galaxy_table["dec"]), n)
            on = (gx > -margin) & (gx < n - 1 + margin) & (gy > -margin) & (gy < n - 1 + margin)
            gal = galaxy_table[on]
            drawer.add_galaxies(gal, gx[on], gy[on],
                                10 ** (-0.4 * (np.asarray(gal[f"{visit.band}_mag"]) - zp_e)),
                                local_jacobian(wcs, gx[on], gy[on]))
        truth_psf = {"psf_field": field.to_json()}
    else:
        add_point_sources(image, x[inside], y[inside], flux[inside], fwhm_px)

    resp = response(cam, detector)
    electrons = rng.poisson(image * resp + hot_pixels(cam, detector) * EXPTIME).astype(float)
    hdul = read_out(cam, detector, electrons, rng, bias_offset=rng.normal(0, 3))
    h = _primary_header(cam, detector, "science", visit.band, visit.mjd, EXPTIME, visit.visit)
    h["RA"], h["DEC"], h["ROTPA"] = visit.ra_reported, visit.dec_reported, visit.rotation
    h["SEEING"] = (visit.seeing, "simulated; calibrate measures its own")
    # the nominal (pre-astrometry) WCS from the reported boresight and the camera geometry
    h.update(detector_wcs(cam, detector, visit.ra_reported, visit.dec_reported, visit.rotation,
                          distortion=False).to_header())
    hdul[0].header.update(h)
    n_star = int(inside[: len(stars)].sum())
    truth = {"visit": visit.visit, "detector": detector, "band": visit.band,
             "zp_offset": zp_offset, "n_star": n_star, "wcs": wcs.to_header(relax=True).tostring(),
             **truth_psf}
    return hdul, truth


def _pixels(wcs: WCS, ra: np.ndarray, dec: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions on an n-pixel CCD of the objects near it (far off for the rest)."""
    near = (np.abs(dec - wcs.wcs.crval[1]) < n * 0.75 * PIXEL_SCALE / 3600)
    x, y = np.full(ra.size, -1e9), np.full(ra.size, -1e9)
    x[near], y[near] = wcs.all_world2pix(ra[near], dec[near], 0)
    return x, y


def simulate_calib_ccd(cfg: SurveyConfig, kind: str, index: int, detector: int,
                       band: str | None = None) -> fits.HDUList:
    """A bias (0 s), dark (300 s, shutter closed) or twilight flat (~15 ke-)."""
    cam = cfg.camera
    key = {"bias": 0, "dark": 1}.get(kind, 2 + BANDS.index(band or "u"))
    rng = _rng(cfg.seed, 200 + key, index, detector)
    n = cam.ccd_size
    exptime = {"bias": 0.0, "dark": 300.0}.get(kind, 5.0)
    e = hot_pixels(cam, detector) * exptime
    if kind == "flat":
        e = e + 15000.0 * response(cam, detector)
    electrons = rng.poisson(e).astype(float) if exptime else np.zeros((n, n))
    hdul = read_out(cam, detector, electrons, rng, bias_offset=rng.normal(0, 3))
    mjd = FIRST_NIGHT_MJD - 1 + 0.001 * index
    hdul[0].header.update(_primary_header(cam, detector, kind, band, mjd, exptime,
                                          900000 + key * 100 + index))
    return hdul


def truth_zeropoint(cfg: SurveyConfig, visits: list[Visit], truth_rows: list[dict]) -> None:
    """Add the true calibrated zeropoint (mag of 1 e- in the flat-fielded image) to truth rows.

    Flats are normalised by the raft median of the response, so a star keeps
    median(response) of its electrons after flat-fielding.
    """
    cam = cfg.camera
    med = float(np.median([np.median(response(cam, d)) for d in cam.detectors]))
    by_visit = {v.visit: v for v in visits}
    for row in truth_rows:
        v = by_visit[row["visit"]]
        row["zp_true"] = (ZEROPOINT[v.band] + 2.5 * np.log10(EXPTIME) - v.extinction
                          - row["zp_offset"] + 2.5 * np.log10(med))


def make_refcat(cfg: SurveyConfig, stars: Table) -> Table:
    """Reference catalog: truth plus realistic errors (0.1-1 mas, 5-20 mmag), to a depth limit."""
    rng = _rng(cfg.seed, 4)
    keep = stars["r_mag"] < cfg.refcat_mag_limit
    s = stars[keep]
    n = len(s)
    pos_err = rng.uniform(0.1, 1.0, n)  # mas
    ref = Table({"id": s["id"], "coord_ra": s["ra"] + rng.normal(0, pos_err) / 3.6e6
                 / np.cos(np.radians(s["dec"])),
                 "coord_dec": s["dec"] + rng.normal(0, pos_err) / 3.6e6,
                 "coord_err_mas": pos_err})
    for band in BANDS:
        err = 0.005 + 0.015 * np.clip((s[f"{band}_mag"] - cfg.mag_bright)
                                      / (cfg.refcat_mag_limit - cfg.mag_bright), 0, 1)
        ref[f"{band}_mag"] = s[f"{band}_mag"] + rng.normal(0, err)
        ref[f"{band}_magErr"] = err
    return ref


def _write_science(args) -> dict:
    cfg, visit, detector, stars, asteroids, galaxy_table, path = args
    hdul, truth = simulate_science_ccd(cfg, visit, detector, stars, asteroids, galaxy_table)
    hdul.writeto(path, overwrite=True)
    return truth


def _write_calib(args) -> None:
    cfg, kind, index, detector, band, path = args
    simulate_calib_ccd(cfg, kind, index, detector, band).writeto(path, overwrite=True)


def simulate_survey(cfg: SurveyConfig, out: Path, progress=None) -> Path:
    """Write raws, calibration frames, the reference catalog and the truth under `out`."""
    out = Path(out)
    for sub in ("raw", "calib_raw", "truth", "refcat"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    visits = plan_visits(cfg)
    stars, asteroids, galaxy_table = make_stars(cfg), make_asteroids(cfg), galaxies(cfg)
    cam = cfg.camera
    science = [(cfg, v, d, stars, asteroids, galaxy_table, out / "raw" / f"raw_{v.visit}_{d}.fits")
               for v in visits for d in cam.detectors]
    calib = [(cfg, "bias", i, d, None, out / "calib_raw" / f"bias_{i}_{d}.fits")
             for i in range(cfg.n_bias) for d in cam.detectors]
    calib += [(cfg, "dark", i, d, None, out / "calib_raw" / f"dark_{i}_{d}.fits")
              for i in range(cfg.n_dark) for d in cam.detectors]
    calib += [(cfg, "flat", i, d, b, out / "calib_raw" / f"flat_{b}_{i}_{d}.fits")
              for b in cfg.bands for i in range(cfg.n_flat) for d in cam.detectors]
    with ProcessPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        truth_rows = []
        for k, row in enumerate(pool.map(_write_science, science, chunksize=4)):
            truth_rows.append(row)
            if progress:
                progress(k + 1, len(science) + len(calib))
        for k, _ in enumerate(pool.map(_write_calib, calib, chunksize=4)):
            if progress:
                progress(len(science) + k + 1, len(science) + len(calib))
    truth_zeropoint(cfg, visits, truth_rows)

    _visits_table(visits).write(out / "truth" / "visits.parquet", overwrite=True)
    Table(rows=truth_rows).write(out / "truth" / "ccd_visits.parquet", overwrite=True)
    stars.write(out / "truth" / "stars.parquet", overwrite=True)
    asteroids.write(out / "truth" / "asteroids.parquet", overwrite=True)
    if galaxy_table is not None:
        galaxy_table.write(out / "truth" / "galaxies.parquet", overwrite=True)
    make_refcat(cfg, stars).write(out / "refcat" / "refcat.parquet", overwrite=True)
    (out / "survey.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return out


def _visits_table(visits: list[Visit]) -> Table:
    cols = ["visit", "band", "tract", "night", "mjd", "ra", "dec", "rotation", "seeing",
            "extinction", "ra_reported", "dec_reported"]
    t = Table({c: [getattr(v, c) for v in visits] for c in cols})
    t["day_obs"] = [v.day_obs for v in visits]
    return t


def load_survey(root: Path) -> tuple[SurveyConfig, Table]:
    """The config and visit table of a simulated survey directory."""
    root = Path(root)
    if not (root / "survey.json").exists():
        raise FileNotFoundError(f"{root}: not a simulated survey (no survey.json); run `drp simulate`")
    d = json.loads((root / "survey.json").read_text())
    d["bands"] = tuple(d["bands"])
    return SurveyConfig(**d), Table.read(root / "truth" / "visits.parquet")
