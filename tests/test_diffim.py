"""Alard-Lupton subtraction and DIA detection on synthetic CCDs with known transients."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.stats import mad_std
from scipy.signal import fftconvolve

from drp_flows.tasks.diffim import (
    DiffimError,
    Template,
    alard_lupton_basis,
    alard_lupton_factors,
    convolve_basis,
    detect_dia_sources,
    forced_photometry,
    matched_filter,
    subtract_images,
)
from drp_flows.tasks.images import Exposure
from drp_flows.tasks.psf import add_point_sources

N = 400
SKY_VAR = 400.0          # nJy^2 per pixel, science; the template is a 2-visit coadd


def _scene(rng, fwhm, flux, x, y, var, offset=(0.0, 0.0)):
    image = np.zeros((N, N))
    add_point_sources(image, x + offset[0], y + offset[1], flux, fwhm)
    photon_var = var + np.maximum(image, 0) / 50
    return image + rng.normal(0, np.sqrt(photon_var)), photon_var


@pytest.fixture(scope="module")
def pair():
    """A science image at 1.1" seeing with transients, a template at 0.8" without."""
    rng = np.random.default_rng(5)
    n_star = 600
    x, y = rng.uniform(5, N - 5, (2, n_star))
    flux = 10 ** rng.uniform(2.8, 5.2, n_star)
    template, t_var = _scene(rng, 4.0, flux, x, y, SKY_VAR / 2)
    tx, ty = rng.uniform(40, N - 40, (2, 30))
    tflux = rng.choice([-1, 1], 30) * rng.uniform(300, 3000, 30)   # brightened / faded
    sci_x, sci_y = np.r_[x, tx], np.r_[y, ty]
    sci_flux = np.r_[flux, np.zeros(30)]
    science, s_var = _scene(rng, 5.5, sci_flux, sci_x, sci_y, SKY_VAR)
    add_point_sources(science, tx, ty, tflux, 5.5)
    sci = Exposure(science, s_var, np.zeros((N, N), np.int32))
    return sci, Template(template, t_var, np.ones((N, N), bool)), (tx, ty, tflux)


def test_basis_is_ip_diffims_27_kernels():
    basis = alard_lupton_basis()
    assert basis.shape == (27, 21, 21)
    np.testing.assert_allclose((basis ** 2).sum(axis=(1, 2)), 1.0)


def test_separable_basis_convolution_is_the_2d_one():
    """The fit convolves star stamps with the basis as two 1-D passes; it must be the 2-D
    convolution (scipy's FFT one) to rounding."""
    rows, columns = alard_lupton_factors()
    stamps = np.random.default_rng(3).normal(size=(4, 41, 41))
    want = fftconvolve(stamps[:, None], alard_lupton_basis()[None], mode="valid", axes=(2, 3))
    got = convolve_basis(stamps, rows, columns)
    assert got.shape == want.shape == (4, 27, 21, 21)
    np.testing.assert_allclose(got, want, atol=1e-12 * np.abs(want).max())


def test_subtraction_leaves_noise_at_the_stars(pair):
    sci, tmpl, (tx, ty, _) = pair
    d = subtract_images(sci, tmpl, fwhm_px=5.5)
    assert d.kernel.n_stars >= 50
    # the kernel carries the photometric scale: template and science share units here
    assert d.kernel.centre.sum() == pytest.approx(1.0, abs=0.01)
    far = np.ones((N, N), bool)
    for x, y in zip(tx, ty, strict=True):
        far[max(0, int(y) - 15):int(y) + 16, max(0, int(x) - 15):int(x) + 16] = False
    inner = (slice(20, N - 20), slice(20, N - 20))
    pulls = (d.exposure.image / np.sqrt(d.exposure.variance))[inner][far[inner]]
    assert mad_std(pulls) == pytest.approx(1.0, abs=0.1)


def test_dia_sources_find_every_transient_with_right_sign_and_flux(pair):
    sci, tmpl, (tx, ty, tflux) = pair
    d = subtract_images(sci, tmpl, fwhm_px=5.5)
    sources = detect_dia_sources(d)
    dist = np.hypot(sources["x"][:, None] - tx, sources["y"][:, None] - ty)
    matched = dist.min(axis=0) < 2
    sig, error_scale, excess = matched_filter(d)
    assert excess == pytest.approx(1.0, abs=0.1)      # white noise: the propagation holds
    flux, err = forced_photometry(d.exposure, tx, ty, 5.5, error_scale)
    snr = np.abs(tflux) / err
    assert matched[snr > 6].all()
    nearest = dist.argmin(axis=0)
    assert (sources["is_negative"][nearest][matched] == (tflux[matched] < 0)).all()
    pulls = (flux - tflux) / err
    assert mad_std(pulls) == pytest.approx(1.0, abs=0.25)
    # false detections away from the transients: noise peaks at 5 sigma are ~0.1 per image
    spurious = dist.min(axis=1) > 3
    assert spurious.sum() <= 3


def test_misregistered_star_is_one_dipole():
    rng = np.random.default_rng(8)
    x, y = rng.uniform(30, N - 30, (2, 400))
    flux = 10 ** rng.uniform(3, 4.5, 400)
    template, t_var = _scene(rng, 4.0, flux, x, y, SKY_VAR / 2)
    science, s_var = _scene(rng, 5.0, flux, x, y, SKY_VAR)
    # one bright star moved by 1.5 px in the science image (proper motion)
    add_point_sources(science, np.array([201.5]), np.array([200.0]), np.array([2e5]), 5.0)
    add_point_sources(template, np.array([200.0]), np.array([200.0]), np.array([2e5]), 4.0)
    d = subtract_images(Exposure(science, s_var, np.zeros((N, N), np.int32)),
                        Template(template, t_var, np.ones((N, N), bool)), fwhm_px=5.0)
    sources = detect_dia_sources(d)
    near = np.hypot(sources["x"] - 200.75, sources["y"] - 200) < 5
    assert near.sum() == 1 and sources["is_dipole"][near][0]
    assert sources["dipole_pos_flux"][near][0] > 0 > sources["dipole_neg_flux"][near][0]


def test_no_template_is_a_clear_error(pair):
    sci, tmpl, _ = pair
    with pytest.raises(DiffimError, match="template covers"):
        subtract_images(sci, Template(tmpl.image, tmpl.variance, np.zeros((N, N), bool)), 5.5)


def test_forced_photometry_uses_the_science_images_model_and_aperture_correction():
    """A difference image of a visit calibrated on a 3" aperture's scale, whose PSF (beta 2.5)
    holds 2% of its light beyond it: its empirical model and APCORR give total fluxes."""
    from astropy.io import fits

    from drp_flows.tasks.calibrate import APCORR_RADIUS
    from drp_flows.tasks.psf_model import PixelPsf, model_half

    rng = np.random.default_rng(3)
    fwhm, beta, big = 5.0, 2.5, 60
    alpha2 = (fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))) ** 2

    def moffat(dx, dy):
        return (beta - 1) / (np.pi * alpha2) * (1 + (dx ** 2 + dy ** 2) / alpha2) ** -beta

    in_aperture = 1 - (1 + APCORR_RADIUS ** 2 / alpha2) ** (1 - beta)
    g = np.arange(80.0, 330.0, 50.0)
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    total = np.full(x.size, 5e4)
    image = rng.normal(0, np.sqrt(SKY_VAR), (N, N))
    offs = np.arange(-big, big + 1)
    for xs, ys, t in zip(x, y, total, strict=True):
        ix, iy = int(round(xs)), int(round(ys))
        image[iy - big:iy + big + 1, ix - big:ix + big + 1] += t / in_aperture * moffat(
            offs[None, :] + ix - xs, offs[:, None] + iy - ys)
    h = model_half(fwhm)
    stamp = moffat(np.arange(-h, h + 1)[None, :], np.arange(-h, h + 1)[:, None])
    header = fits.Header({"APCORR": in_aperture / stamp.sum()})
    diff = Exposure(image, np.full((N, N), SKY_VAR), np.zeros((N, N), np.int32), None, header,
                    psf=PixelPsf(stamp[None] / stamp.sum(), 0, N, fwhm))
    flux, err = forced_photometry(diff, x, y, fwhm, 1.0)
    assert abs(np.median(flux / total) - 1) < 0.003
    assert 0.5 * np.std(flux) < np.median(err) < 2 * np.std(flux)
