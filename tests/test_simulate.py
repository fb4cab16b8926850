"""The simulator: deterministic, ComCam-shaped raws, and a truth the science can be checked on."""

import numpy as np
from astropy.io import fits
from astropy.table import Table

from drp_flows.tasks.camera import Camera
from drp_flows.validation.simulate import (
    EXPTIME,
    ZEROPOINT,
    SurveyConfig,
    load_survey,
    make_stars,
    plan_visits,
    simulate_science_ccd,
)


def test_same_seed_same_ccd():
    cfg = SurveyConfig(ccd_size=128, nights=1, rounds_per_night=1)
    visit = plan_visits(cfg)[0]
    stars = make_stars(cfg)
    from drp_flows.validation.simulate import make_asteroids
    ast = make_asteroids(cfg)
    a, _ = simulate_science_ccd(cfg, visit, 4, stars, ast)
    b, _ = simulate_science_ccd(cfg, visit, 4, stars, ast)
    for ha, hb in zip(a[1:], b[1:], strict=True):
        assert np.array_equal(ha.data, hb.data)
    c, _ = simulate_science_ccd(SurveyConfig(ccd_size=128, nights=1, rounds_per_night=1, seed=7),
                                visit, 4, stars, ast)
    assert not np.array_equal(a[1].data, c[1].data)


def test_raw_has_comcam_amp_structure(survey):
    cfg, visits = load_survey(survey)
    raw = fits.open(survey / "raw" / f"raw_{visits['visit'][0]}_0.fits")
    cam = cfg.camera
    assert len(raw) == 17                                   # primary + 16 amplifiers
    amp = cam.amps[0]
    assert raw[1].data.shape == amp.raw_shape
    assert raw[1].header["BIASSEC"].startswith(f"[{3 + amp.data_width + 1}:")
    # the serial overscan carries the bias level (1000-25000 ADU) and read noise, no sky
    over = raw[1].data[amp.serial_overscan_slice]
    assert 1000 < np.median(over) < 25000
    assert 3 < np.std(over) < 10                            # ~7.9 e- / ~1.4 e-/ADU
    assert raw[0].header["IMGTYPE"] == "science" and raw[0].header["EXPTIME"] == EXPTIME


def test_camera_parameters_in_spec():
    cam = Camera(ccd_size=512)
    for d in cam.detectors:
        assert np.all((cam.gain(d) >= 1.17) & (cam.gain(d) <= 1.45))
        assert np.all((cam.read_noise(d) >= 5) & (cam.read_noise(d) <= 11))
    corner = cam.vignetting(0, np.array([0.0]), np.array([0.0]))[0]
    centre = cam.vignetting(4, np.array([255.5]), np.array([255.5]))[0]
    assert abs(1 - corner - 0.076) < 0.01 and 1 - centre < 0.002


def test_survey_covers_six_tracts_all_bands(survey):
    cfg, visits = load_survey(survey)
    assert sorted(set(visits["tract"])) == list(range(6))
    assert sorted(set(visits["band"])) == sorted(cfg.bands)
    truth = Table.read(survey / "truth" / "ccd_visits.parquet")
    assert len(truth) == 9 * len(visits)
    # truth zeropoints: band zeropoint + exposure - extinction (0-0.3) - CCD offsets (mmag)
    for row in truth[:9]:
        band = row["band"]
        nominal = ZEROPOINT[band] + 2.5 * np.log10(EXPTIME)
        assert -0.35 < row["zp_true"] - nominal < 0.05


def test_refcat_errors_realistic(survey):
    stars = Table.read(survey / "truth" / "stars.parquet")
    ref = Table.read(survey / "refcat" / "refcat.parquet")
    stars.add_index("id")
    truth = stars.loc[ref["id"]]
    dmag = ref["r_mag"] - truth["r_mag"]
    assert 0.005 < np.std(dmag) < 0.02
    dpos = (ref["coord_dec"] - truth["dec"]) * 3.6e6
    assert np.std(dpos) < 1.0                                 # mas
    assert ref["r_mag"].max() < SurveyConfig().refcat_mag_limit + 0.1
