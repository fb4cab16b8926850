"""Step 7's consolidation of per-tract property maps: a disjoint union, overlaps refused,
metrics and the whole-field plot from the survey maps."""

import healsparse as hsp
import hpgeom
import numpy as np
import pytest

from drp_flows.tasks.property_maps import NSIDE, NSIDE_COVERAGE
from drp_flows.tasks.step7 import consolidate, property_metrics, survey_plot


def tract_map(pixels, value):
    m = hsp.HealSparseMap.make_empty(NSIDE_COVERAGE, NSIDE, np.float64)
    m.update_values_pix(pixels, np.full(len(pixels), value, float))
    return m


def test_consolidate_is_the_union_of_disjoint_tract_maps():
    centre = hpgeom.angle_to_pixel(NSIDE, 53.0, -28.0)
    a, b = np.arange(centre, centre + 500), np.arange(centre + 500, centre + 800)
    survey = consolidate([tract_map(a, 3.0), tract_map(b, 5.0)])
    assert np.array_equal(np.sort(survey.valid_pixels), np.concatenate([a, b]))
    assert (survey.get_values_pix(a) == 3).all() and (survey.get_values_pix(b) == 5).all()

    with pytest.raises(ValueError, match="overlap"):
        consolidate([tract_map(a, 3.0), tract_map(a[-10:], 1.0)])

    maps = {"deep_coadd_n_exposure_consolidated_map_sum": survey,
            "deep_coadd_psf_maglim_consolidated_map_weighted_mean": tract_map(a, 24.5)}
    metrics = property_metrics(maps)
    assert list(metrics["property"]) == ["n_exposure", "psf_maglim"]
    assert metrics["area_deg2"][0] == pytest.approx(800 * hpgeom.nside_to_pixel_area(NSIDE))
    assert metrics["median"][1] == 24.5 and metrics["p05"][0] == 3 and metrics["p95"][0] == 5
    assert survey_plot(maps, "r").startswith(b"\x89PNG")
