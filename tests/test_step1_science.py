"""Step 1 science on simulated CCDs, checked against the truth (SCIENCE.md targets)."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from drp_flows.tasks import calibs
from drp_flows.tasks.calibrate import (
    CalibrationError,
    background_crowding,
    calibrate,
    visit_psf_fwhm,
)
from drp_flows.tasks.camera import PHYSICAL_FILTERS, PIXEL_SCALE
from drp_flows.tasks.isr import run_isr
from drp_flows.tasks.psf import add_point_sources, fit_fwhm, psf_flux, psf_flux_scale
from drp_flows.tasks.skymap import header_wcs
from drp_flows.validation.simulate import load_survey, response


@pytest.fixture(scope="module")
def masters(survey):
    cfg, _ = load_survey(survey)
    cam, raw = cfg.camera, survey / "calib_raw"

    def frames(pattern):
        return [fits.open(p) for p in sorted(raw.glob(pattern))]

    out = {}
    for d in cam.detectors:
        bias = calibs.master_bias(frames(f"bias_*_{d}.fits"), cam, d)
        dark = calibs.master_dark(frames(f"dark_*_{d}.fits"), cam, d, bias)
        out[d] = {"bias": bias, "dark": dark}
    for band in cfg.bands:
        flats = calibs.normalize_flats({d: calibs.master_flat(frames(f"flat_{band}_*_{d}.fits"), cam,
                                                              d, out[d]["bias"], out[d]["dark"])
                                        for d in cam.detectors})
        for d, f in flats.items():
            out[d][band] = f
    return out


@pytest.fixture(scope="module")
def calibrated(survey, masters):
    """Every CCD of the test survey's first night through ISR and calibrate, with its truth row."""
    cfg, _ = load_survey(survey)
    truth = Table.read(survey / "truth" / "ccd_visits.parquet")
    truth = truth[np.isin(truth["visit"], np.unique(truth["visit"])[:12])]
    refcat = Table.read(survey / "refcat" / "refcat.parquet")
    out = []
    for row in truth:
        d, band = int(row["detector"]), row["band"]
        raw = fits.open(survey / "raw" / f"raw_{row['visit']}_{d}.fits")
        post = run_isr(raw, cfg.camera, d, masters[d]["bias"], masters[d]["dark"], masters[d][band])
        out.append((row, post, *calibrate(post, refcat, band)))
    return out


def test_master_flat_follows_the_response(survey, masters):
    cfg, _ = load_survey(survey)
    resp = response(cfg.camera, 0)
    ratio = masters[0]["r"] / resp
    assert np.std(ratio) / np.mean(ratio) < 0.01                # flat sees vignetting + QE


def test_isr_removes_bias_and_gain(calibrated):
    # on the brightest sky (y band, ~3 ke-) amp-to-amp steps from bias (1000-25000 ADU) or
    # gain (1.17-1.45 e-/ADU, a 10% error would be 300 e-) must be gone
    row, post, image, _ = max(calibrated, key=lambda c: np.median(c[1].image))
    amp_w = post.image.shape[1] // 8
    medians = [np.median(post.image[:, i * amp_w:(i + 1) * amp_w]) for i in range(8)]
    assert np.ptp(medians) / np.median(medians) < 0.01
    assert post.metadata["BAND"] == row["band"]


def test_zeropoint_against_truth(calibrated, survey):
    """On the scale of the fluxes: PSF-model fluxes times the aperture correction."""
    from drp_flows.validation.qa import ccd_flux_fraction, true_zeropoint

    cfg, visits = load_survey(survey)
    seeing = dict(zip(visits["visit"], visits["seeing"], strict=True))
    err = np.array([(im.metadata["ZP"] - true_zeropoint(row, ccd_flux_fraction(
        im.psf, im.metadata, cfg.camera, int(row["detector"]), "", seeing[row["visit"]])))
        * 1000 for row, _, im, _ in calibrated])
    assert np.sqrt(np.mean(err ** 2)) <= 10.0, err


def test_wcs_against_truth(calibrated, survey):
    stars_truth = Table.read(survey / "truth" / "stars.parquet")
    stars_truth.add_index("id")
    sq = []
    for row, _, image, stars in calibrated:
        bright = stars[(stars["snr"] >= 50) & (stars["ref_id"] >= 0)]
        true = stars_truth.loc[bright["ref_id"]]
        true_wcs = header_wcs(fits.Header.fromstring(row["wcs"]))
        tx, ty = true_wcs.all_world2pix(true["ra"], true["dec"], 0)
        ra, dec = image.wcs.all_pix2world(tx, ty, 0)
        sq.append(((ra - true["ra"]) * np.cos(np.radians(true["dec"])) * 3.6e6) ** 2
                  + ((dec - true["dec"]) * 3.6e6) ** 2)
    rms = np.sqrt(np.mean(np.concatenate(sq)))
    assert rms <= 10.0, rms


def test_psf_measured(calibrated, survey):
    _, visits = load_survey(survey)
    seeing = dict(zip(visits["visit"], visits["seeing"], strict=True))
    errors = np.array([image.metadata["PSF_FWHM"] / seeing[row["visit"]] - 1
                       for row, _, image, _ in calibrated])
    assert np.sqrt(np.mean(errors ** 2)) < 0.01 and np.abs(errors).max() < 0.04


def test_outputs_have_rubin_planes(calibrated):
    _, _, image, stars = calibrated[0]
    hdul = image.to_hdulist()
    assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
    assert hdul["IMAGE"].header["CTYPE1"].startswith("RA---TAN")
    assert (hdul["MASK"].data & (1 << 5)).any()                 # DETECTED plane set
    assert {"ra", "dec", "psf_flux", "psf_flux_err", "mag"} <= set(stars.colnames)


def test_psf_flux_unbiased_at_low_snr():
    """Weights from the background variance: no faint-flux bias (it was 2% at S/N 30)."""
    rng = np.random.default_rng(3)
    img = np.full((500, 500), 30.0)
    g = np.meshgrid(np.arange(10) * 50 + 25, np.arange(10) * 50 + 25)
    x, y = g[0].ravel() + rng.uniform(-.5, .5, 100), g[1].ravel() + rng.uniform(-.5, .5, 100)
    add_point_sources(img, x, y, np.full(100, 3000.0), 4.0)
    noisy = rng.poisson(img) + rng.normal(0, 7.9, img.shape)
    flux, err = psf_flux(noisy - 30.0, np.full(img.shape, 30.0 + 62.4), x, y, 4.0,
                         variance=np.maximum(noisy, 0) + 62.4)
    assert abs(np.mean(flux) / 3000 - 1) < 3 * np.std(flux) / 3000 / 10
    assert abs(np.median(fit_fwhm(noisy - 30.0, np.full(img.shape, 92.4), x, y, 5.0)) / 4 - 1) < 0.02


def test_the_background_error_of_a_crowded_field_is_measured_on_blank_sky():
    """A background 3 e-/px too high (a crowded field's: the wings of the stars and the light
    of the undetected ones raise the level measured over every pixel) takes 3 x NEA from
    every PSF flux, 4% of a star at S/N 15 in the demo's r band; calibrate measures the level
    on the blank sky and keeps the stars it moves by more than 0.5% out of the zeropoint."""
    rng = np.random.default_rng(5)
    image = rng.normal(0, 30, (400, 400)).astype(np.float32) - 3.0
    footprints = np.zeros(image.shape, bool)
    footprints[::40, ::40] = True                       # detections, and the sky between them
    image[footprints] += 500
    bad = np.zeros(image.shape, bool)
    assert background_crowding(image, bad, footprints, 4.0) == pytest.approx(3.0, abs=0.2)
    assert background_crowding(image, bad, np.ones(image.shape, bool), 4.0) == 0.0


def test_psf_flux_of_a_mis_sized_model_is_rescaled_to_the_total():
    """A model 4% too wide gives ~4% too much flux; psf_flux_scale takes it back to the total."""
    img = np.zeros((200, 200))
    x, y = np.array([50.3, 120.0, 150.7]), np.array([60.2, 100.5, 150.1])
    add_point_sources(img, x, y, np.full(3, 1e5), 4.0)
    flux, _ = psf_flux(img, np.ones_like(img), x, y, 4.16)
    assert np.all(np.abs(flux / 1e5 - 1.04) < 0.01)
    assert np.all(np.abs(flux * psf_flux_scale(4.16, 4.0) / 1e5 - 1) < 5e-4)


def test_the_true_zeropoint_of_moffat_fluxes_follows_the_fwhm_they_were_measured_with(survey):
    """The QA's truth on the scale of a CCD's fluxes, for the Moffat PSF: a visit's FWHM 0.3%
    too wide measures 0.3% more than a star's total, and the zeropoint that calibrates such
    fluxes right is 3 mmag above the total-flux one (the report had counted it as an error)."""
    from drp_flows.validation.qa import ccd_flux_fraction

    img = np.zeros((300, 300))
    x, y = np.array([60.3, 150.0, 240.7]), np.array([70.2, 160.5, 230.1])
    add_point_sources(img, x, y, np.full(3, 1e5), 4.0)      # 0.8" seeing, as the sky draws it
    flux, _ = psf_flux(img, np.ones_like(img), x, y, 4.0 * 1.003)
    fraction = ccd_flux_fraction(None, {"PSF_FWHM": 4.0 * 1.003 * PIXEL_SCALE},
                                 load_survey(survey)[0].camera, 0, "", 4.0 * PIXEL_SCALE)
    assert fraction == pytest.approx(1.003, abs=0.001)
    assert np.all(np.abs(flux / 1e5 / fraction - 1) < 5e-4)


def test_visit_psf_pools_detectors_that_agree():
    fwhm, err = np.array([4.00, 4.02, 3.99, 4.01]), np.array([0.02, 0.01, 0.02, 0.04])
    assert abs(visit_psf_fwhm(fwhm, err) - 4.0116) < 0.0005
    # a PSF that changes across the focal plane (10% at 0.5% errors): each detector keeps its own
    assert visit_psf_fwhm(np.array([4.0, 4.2, 4.4, 4.1]), np.full(4, 0.02)) is None
    assert visit_psf_fwhm(np.array([4.0]), np.array([0.02])) is None


def test_blank_ccd_is_a_clear_error(calibrated):
    _, post, _, _ = calibrated[0]
    blank = type(post)(image=np.zeros_like(post.image) + 1.0, variance=post.variance,
                       mask=post.mask, wcs=post.wcs, metadata=post.metadata)
    with pytest.raises(CalibrationError, match="stars to measure the PSF"):
        calibrate(blank, Table({"coord_ra": [0.0], "coord_dec": [0.0]}), "r")


def test_physical_filters_complete():
    assert set(PHYSICAL_FILTERS) == set("ugrizy")


def test_linear_tan_sip_fit_matches_astropys_non_linear_one():
    """The linear TAN-SIP fit (as meas_astrom's FitTanSipWcsTask) recovers a distorted WCS as
    well as astropy's non-linear fit_wcs_from_points does, from the same noisy matches."""
    from astropy.coordinates import SkyCoord
    from astropy.wcs import WCS, Sip
    from astropy.wcs.utils import fit_wcs_from_points

    from drp_flows.tasks.calibrate import fit_tan_sip

    rng = np.random.default_rng(1)
    true = WCS(naxis=2)
    true.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    true.wcs.crval, true.wcs.crpix = [150.3, -30.2], [200.5, 190.2]
    scale, angle = 0.2 / 3600, np.radians(17)
    true.wcs.cd = scale * np.array([[-np.cos(angle), np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    a, b = np.zeros((3, 3)), np.zeros((3, 3))
    a[2, 0], a[1, 1], b[0, 2], b[1, 1] = 2e-6, -1e-6, 3e-6, 1.5e-6        # ~0.3 px at the corners
    true.sip = Sip(a, b, None, None, true.wcs.crpix)
    x, y = rng.uniform(0, 383, 60), rng.uniform(0, 383, 60)
    ra, dec = true.all_pix2world(x, y, 0)
    x, y = x + rng.normal(0, 0.03, 60), y + rng.normal(0, 0.03, 60)
    gx, gy = (g.ravel() for g in np.meshgrid(np.linspace(0, 383, 20), np.linspace(0, 383, 20)))

    def error_mas(wcs) -> float:
        """The rms distance on the sky from the true WCS, over the CCD."""
        fitted = SkyCoord(*wcs.all_pix2world(gx, gy, 0), unit="deg")
        truth = SkyCoord(*true.all_pix2world(gx, gy, 0), unit="deg")
        return float(np.sqrt(np.mean(fitted.separation(truth).mas ** 2)))

    linear = fit_tan_sip(x, y, ra, dec, 2)
    reference = fit_wcs_from_points((x, y), SkyCoord(ra, dec, unit="deg"), sip_degree=2)
    assert error_mas(linear) < 1.05 * error_mas(reference) < 10       # 6 mas = 0.03 px noise
    # written and read back as a FITS header (the preliminary visit image's), it is the same
    again = header_wcs(linear.to_header(relax=True))
    assert np.allclose(again.all_pix2world(x, y, 0), linear.all_pix2world(x, y, 0), atol=1e-10)
    # without SIP terms (too few matches), a plain TAN
    assert fit_tan_sip(x, y, ra, dec, None).sip is None


def test_completeness_50_percent_point_from_every_star():
    """The 50% point of a detection curve, fitted to every star: within 0.025 mag of the
    truth for 10,000 stars (its scatter is ~0.006 there; 0.1-mag bins' crossing, ~0.015)."""
    from drp_flows.validation.qa import completeness50

    rng = np.random.default_rng(3)
    for m50 in (-0.06, 0.0, 0.08):
        dm = rng.uniform(-1.5, 1.5, 10000)
        p = 0.98 / (1 + np.exp((dm - m50) / 0.15))
        found = rng.uniform(0, 1, dm.size) < p
        # the truth's 50% point: 0.98 / (1 + e^t) = 0.5
        truth = m50 + 0.15 * np.log(2 * 0.98 - 1)
        assert abs(completeness50(dm, found) - truth) < 0.025
    assert np.isnan(completeness50(np.zeros(5), np.ones(5, bool)))


def test_visit_psf_size_field_corrects_each_ccds_model_size_error():
    """Nine CCDs whose PSF models are each off in size by a plane of their own (+-0.4% at the
    corners, as a 1k CCD's ~150 stars leave them) under a smooth true size field: the visit's
    stars (noisy sizes, S/N 50-500) give every source the flux factor of its model's error,
    to < 0.1% on every CCD and a third of the error it corrects over the visit; a CCD with
    too few PSF stars is left alone."""
    from drp_flows.tasks.camera import Camera, focal_plane
    from drp_flows.tasks.visit_psf import size_factors

    rng = np.random.default_rng(2)
    cam = Camera(ccd_size=512)
    tables, expected = {}, {}
    for d in cam.detectors:
        n = 200 if d != 8 else 4
        x, y = rng.uniform(10, 500, n), rng.uniform(10, 500, n)
        fx, fy = focal_plane(cam, d, x, y)
        true = 2.0 * (1 + 0.03 * fx - 0.02 * fy + 0.02 * fx ** 2 - 0.01 * fx * fy)
        u, v = x / 511 * 2 - 1, y / 511 * 2 - 1
        error = rng.normal(0, 0.002) + rng.normal(0, 0.002) * u + rng.normal(0, 0.002) * v
        snr = rng.uniform(50, 500, n)
        used = np.arange(n) % 2 == 0              # the others: sources that are not PSF stars
        tables[d] = Table({"x": x, "y": y, "snr": snr, "psf_used": used,
                           "psf_size": np.where(used, true * (1 + rng.normal(0, 1, n) / snr), np.nan),
                           "psf_model_size": np.where(used, true * (1 + error), np.nan)})
        expected[d] = np.mean(1 + error[used]) / (1 + error)
    got = size_factors(tables, cam, {d: 1.0 for d in cam.detectors})
    assert (got[8] == 1).all()
    left = np.array([np.std(got[d] / expected[d]) for d in range(8)])
    was = np.array([np.std(expected[d]) for d in range(8)])
    assert (left < 1e-3).all(), left
    assert np.sqrt(np.mean(left ** 2)) < np.sqrt(np.mean(was ** 2)) / 3, (left, was)


def test_a_flat_psf_keeps_its_fluxes():
    """A visit whose PSF is the same everywhere (the default sky's) and whose CCD models are
    constant: the stars' noisy sizes do not ask for a size field, and no flux moves (a field
    fitted to them moved fluxes by 1-2 mmag across each CCD: the demo's i band had a 3.1 mmag
    gradient from it, 2.3 without)."""
    from drp_flows.tasks.camera import Camera
    from drp_flows.tasks.visit_psf import size_factors

    rng = np.random.default_rng(8)
    cam = Camera(ccd_size=1024)
    tables = {}
    for d in cam.detectors:
        n = 300
        snr = rng.uniform(50, 500, n)
        used = np.arange(n) % 2 == 0
        tables[d] = Table({"x": rng.uniform(10, 1010, n), "y": rng.uniform(10, 1010, n), "snr": snr,
                           "psf_used": used,
                           "psf_size": np.where(used, 2.0 * (1 + rng.normal(0, 1, n) / snr), np.nan),
                           "psf_model_size": np.where(used, 2.0 * (1 + rng.normal(0, 0.001)), np.nan)})
    got = size_factors(tables, cam, {d: 1.3 for d in cam.detectors})
    assert max(np.ptp(f) for f in got.values()) < 1e-6


@pytest.mark.parametrize("true_change", [0.0, 6.0])
def test_the_gradient_qa_sees_a_change_and_not_the_noise_of_sparse_ccds(true_change):
    """validation/qa_psf's corner-to-corner change of the magnitude residual over 60 CCDs of
    a band, a third with 10-12 bright stars at 15 mmag (u-like) and the rest with 150 at 5:
    within 1.5 mmag of the true change (none, or 6 mmag along x), where equal weights gave
    up to 15 mmag of noise."""
    from drp_flows.validation.qa_psf import corner_to_corner, residual_plane

    rng = np.random.default_rng(11)
    slope2, noise2, n = [], [], []
    for k in range(60):
        count, sigma = (int(rng.integers(10, 13)), 15.0) if k % 3 == 0 else (150, 5.0)
        x, y = rng.uniform(0, 1023, count), rng.uniform(0, 1023, count)
        # a change of true_change from corner to corner, along x
        resid = true_change / np.sqrt(2) * x / 1023 + rng.normal(0, sigma, count)
        s, v = residual_plane(x, y, resid, 1024)
        slope2.append(s), noise2.append(v), n.append(count)
    measured = corner_to_corner(np.array(slope2), np.array(noise2), np.array(n))
    assert measured == pytest.approx(true_change, abs=1.5)
