"""Step 3's warp and coadd on CCDs with known stars: fluxes in nJy, variance, coverage, and the
coadd's PSF from its inputs."""

import numpy as np
import sep
from astropy.io import fits

from drp_flows.tasks.camera import Camera
from drp_flows.tasks.coadd import CoaddAccumulator, coadd_psf, njy_scale, warp
from drp_flows.tasks.images import Exposure
from drp_flows.tasks.psf import add_point_sources
from drp_flows.tasks.skymap import tangent_wcs
from drp_flows.validation.simulate import detector_wcs

RA, DEC, FWHM, SKY_SIGMA = 53.1, -28.1, 4.5, 20.0


def ccd(rng, cam, stars, zero_point, dither_arcsec, rotation):
    """A calibrated (sky-subtracted) CCD of a field of stars given in AB mag, with distortion."""
    wcs = detector_wcs(cam, 4, RA + dither_arcsec / 3600, DEC, rotation)
    n = cam.ccd_size
    x, y = wcs.all_world2pix(stars["ra"], stars["dec"], 0)
    image = np.zeros((n, n))
    add_point_sources(image, x, y, 10 ** (-0.4 * (stars["mag"] - zero_point)), FWHM)
    image += rng.normal(0, SKY_SIGMA, image.shape)
    return Exposure(image=image, variance=np.full((n, n), SKY_SIGMA ** 2),
                    mask=np.zeros((n, n), np.int32), wcs=wcs, metadata=fits.Header())


def test_coadd_fluxes_variance_and_coverage():
    rng = np.random.default_rng(5)
    cam = Camera(ccd_size=256)
    k = 6
    grid = (np.arange(k) + 0.5) / k * 48 - 24       # arcsec, a sparse grid of stars on the CCD
    gx, gy = np.meshgrid(grid, grid)
    stars = {"ra": RA + gx.ravel() / 3600 / np.cos(np.radians(DEC)), "dec": DEC + gy.ravel() / 3600,
             "mag": np.full(k * k, 19.0)}
    out_wcs = tangent_wcs(RA, DEC, (159.5, 159.5), 0.2)
    shape = (320, 320)      # larger than the CCD (256 px): the edges have no data
    acc = CoaddAccumulator(shape)
    zero_points = [31.0, 31.3, 30.8]
    for k, (zp, dither, rot) in enumerate(zip(zero_points, [-4.0, 0.0, 5.0], [0.0, 1.0, -1.5],
                                              strict=True)):
        w = warp(ccd(rng, cam, stars, zp, dither, rot), njy_scale(zp), out_wcs, shape)
        acc.add(w, {"zp": zp, "psf_fwhm": FWHM + k})     # FWHMs that tell the inputs apart
    coadd = acc.coadd(out_wcs, fits.Header())
    assert coadd.metadata["NINPUTS"] == 3

    # every star has its AB flux in nJy (19 mag = 10^(0.4 (31.4 - 19)) nJy) whatever the CCD's zp
    x, y = out_wcs.all_world2pix(stars["ra"], stars["dec"], 0)
    full = acc.n_input[np.round(y).astype(int).clip(0, 319), np.round(x).astype(int).clip(0, 319)] == 3
    inner = full & (x > 20) & (x < 300) & (y > 20) & (y < 300)
    flux, _, _ = sep.sum_circle(np.ascontiguousarray(coadd.image, dtype=float), x[inner], y[inner],
                                4 * FWHM)
    expected = 10 ** (0.4 * (31.4 - 19.0))
    assert inner.sum() > 15
    assert abs(np.median(flux) / expected - 1) < 0.01

    # coadd variance = sum(w^2 V) / sum(w)^2 in nJy^2; the pixel noise is at most that
    # (resampling correlates neighbouring pixels and lowers the per-pixel rms)
    weights = [1 / (SKY_SIGMA * njy_scale(zp)) ** 2 for zp in zero_points]
    predicted = sum(w ** 2 * (SKY_SIGMA * njy_scale(zp)) ** 2 for w, zp in
                    zip(weights, zero_points, strict=True)) / sum(weights) ** 2
    everywhere = acc.n_input == 3
    assert abs(np.median(coadd.variance[everywhere]) / predicted - 1) < 0.02
    blank = everywhere.copy()
    for xs, ys in zip(x, y, strict=True):
        blank[max(0, int(ys) - 15):int(ys) + 15, max(0, int(xs) - 15):int(xs) + 15] = False
    ratio = np.std(coadd.image[blank]) / np.sqrt(predicted)
    assert 0.5 < ratio < 1.05

    # no input: NO_DATA, infinite variance
    assert acc.n_input[0, 0] == 0 and coadd.mask[0, 0] and np.isinf(coadd.variance[0, 0])

    # the coadd's PSF (CoaddPsf), from the inputs the coadd file keeps: at every pixel the inputs
    # covering it, with their coadd weights
    back = Exposure.from_hdulist(fits.HDUList.fromstring(coadd.to_bytes()))
    assert list(back.coadd_inputs["psf_fwhm"]) == [FWHM, FWHM + 1, FWHM + 2]
    py, px = (a.ravel() for a in np.mgrid[0:320:3, 0:320:3])
    psf = coadd_psf(back.coadd_inputs, px.astype(float), py.astype(float))
    n = acc.n_input[py, px]
    assert np.allclose(psf.weights.sum(axis=1), 1)
    assert ((psf.weights > 0).sum(axis=1) == n)[n > 0].mean() > 0.99
    everywhere = n == 3
    assert np.allclose(psf.weights[everywhere], np.array(weights) / sum(weights))
