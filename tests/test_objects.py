"""Step 3 objects on coadds with known stars: detection, band merge, reference band, forced
PSF fluxes against the truth, on a coadd whose PSF is a mix of two seeings (0.8" and 1.2")."""

import numpy as np
from astropy.io import fits
from astropy.table import Table

from drp_flows.tasks.images import Exposure, bit
from drp_flows.tasks.objects import OBJECT_ID_STRIDE, measure_objects
from drp_flows.tasks.psf import add_point_sources, psf_flux
from drp_flows.tasks.skymap import tangent_wcs

N, SIGMA = 600, 2.0          # nJy per pixel


def coadd(rng, x, y, flux, fwhms=(4.0, 6.0)) -> Exposure:
    """A coadd of two visits of different seeing (equal weights) that cover it all, NO_DATA on
    a 20-px border."""
    image = np.zeros((N, N))
    for fwhm in fwhms:
        add_point_sources(image, x, y, flux / len(fwhms), fwhm)
    image += rng.normal(0, SIGMA, image.shape)
    mask = np.zeros((N, N), np.int32)
    mask[:, :20] = bit("NO_DATA")
    image[mask != 0] = 0
    variance = np.where(mask != 0, np.inf, SIGMA ** 2)
    outline = np.array([-0.5, N - 0.5, N - 0.5, -0.5])
    inputs = Table({"visit": np.arange(len(fwhms)), "psf_fwhm": np.array(fwhms, float),
                    "weight": np.ones(len(fwhms)), "corner_x": np.tile(outline, (len(fwhms), 1)),
                    "corner_y": np.tile(np.roll(outline, 1), (len(fwhms), 1))})
    return Exposure(image=image, variance=variance, mask=mask,
                    wcs=tangent_wcs(53.0, -28.0, (N / 2, N / 2), 0.2), metadata=fits.Header(),
                    coadd_inputs=inputs)


def test_objects_detect_merge_and_forced_photometry():
    rng = np.random.default_rng(11)
    k = 9
    g = (np.arange(k) + 0.5) / k * (N - 80) + 50
    gx, gy = np.meshgrid(g, g)
    x, y = gx.ravel() + rng.uniform(-3, 3, k * k), gy.ravel() + rng.uniform(-3, 3, k * k)
    # every other star faint (S/N ~ 10-50 in 5 px seeing), the others bright (up to 1500)
    flux = np.where(np.arange(k * k) % 2, 10 ** rng.uniform(2.2, 2.9, k * k),
                    10 ** rng.uniform(3.0, 4.3, k * k))
    blue = 5                                            # one star only in g
    i_flux = flux.copy()
    i_flux[blue] = 0.0
    coadds = {"g": coadd(rng, x, y, flux), "i": coadd(rng, x, y, i_flux)}
    objects = measure_objects(coadds, tract=3, patch=1)

    assert len(set(objects["object_id"])) == len(objects)
    assert (objects["object_id"] // OBJECT_ID_STRIDE == 301).all()
    d = np.hypot(objects["x"][:, None] - x[None, :], objects["y"][:, None] - y[None, :])
    match = d.argmin(axis=0)
    found = d.min(axis=0) < 1.0             # pixels
    assert found[flux > 300].all() and found.mean() > 0.97, f"missed stars of flux {flux[~found]}"
    assert len(objects) - k * k <= 3, "more than a few noise peaks at 5 sigma"
    m = objects[match]
    assert m["ref_band"][blue] == "g" and m["detect_bands"][blue] == "g"
    others = np.arange(k * k) != blue
    assert (m["ref_band"][others] == "i").all()
    assert not m["blended"].any()
    assert np.median(d.min(axis=0)) < 0.1            # centroids within 0.02" typically

    for band, true in (("g", flux), ("i", i_flux)):
        got, err = np.asarray(m[f"{band}_psf_flux"]), np.asarray(m[f"{band}_psf_flux_err"])
        bright = true / err > 100
        # the coadd's PSF is the inputs' mix: one Moffat fitted to it gets fluxes 3.7% low
        assert abs(np.median(got[bright] / true[bright]) - 1) < 0.003, band
        faint = found & (true > 0) & (true / err < 50)   # error well above the PSF-model mismatch
        pulls = (got[faint] - true[faint]) / err[faint]
        assert faint.sum() >= 10
        assert 0.7 < np.std(pulls) < 1.35, (band, pulls)   # a little extra: centroid noise
        assert abs(np.mean(pulls)) < 0.15 + 3 / np.sqrt(faint.sum()), (band, pulls)
    assert 0.9 < objects.meta["g_noise_scale"] < 1.1


def test_simultaneous_psf_fluxes_do_not_count_a_neighbours_light():
    """Pairs of stars 1.5 FWHM apart (one 4x the other): measured alone the faint one takes
    some of its neighbour's light; fitted together both fluxes are right, with true errors."""
    rng = np.random.default_rng(4)
    fwhm, k = 5.0, 12
    g = np.arange(k) * 45.0 + 30
    gx, gy = (a.ravel() for a in np.meshgrid(g, g))
    x = np.r_[gx, gx + 1.5 * fwhm] + rng.uniform(-0.5, 0.5, 2 * k * k)
    y = np.r_[gy, gy] + rng.uniform(-0.5, 0.5, 2 * k * k)
    flux = np.r_[np.full(k * k, 2000.0), np.full(k * k, 500.0)]
    image = np.zeros((N, N))
    add_point_sources(image, x, y, flux, fwhm)
    sky = np.full((N, N), SIGMA ** 2)
    image += rng.normal(0, SIGMA, image.shape)
    faint = flux == 500.0
    alone, _ = psf_flux(image, sky, x, y, fwhm, variance=sky)
    together, err = psf_flux(image, sky, x, y, fwhm, variance=sky, simultaneous=True)
    assert np.median(alone[faint] / 500.0) > 1.05            # the neighbour's light
    assert abs(np.median(together[faint] / 500.0) - 1) < 0.01
    assert abs(np.median(together[~faint] / 2000.0) - 1) < 0.01
    pulls = (together - flux) / err
    assert 0.85 < np.std(pulls) < 1.15 and abs(np.mean(pulls)) < 0.2
