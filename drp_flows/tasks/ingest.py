"""Dimension records from the camera, the skymap and raw headers (ingest-raws + define-visits).

Plain dictionaries keyed by dimension element, so a site's setup inserts them in order and a
transfer can carry them to another site. Visit regions come from the nominal WCS in the raw
header, as Rubin's define-visits computes them from the boresight and camera geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time, TimeDelta
from lsst.daf.butler import Timespan
from lsst.sphgeom import ConvexPolygon, HtmPixelization, LonLat, UnitVector3d

from drp_flows.tasks.camera import (
    BANDS,
    DETECTOR_NAMES,
    INSTRUMENT,
    PHYSICAL_FILTERS,
    Camera,
)
from drp_flows.tasks.skymap import MiniSkymap, header_wcs, sky_polygon

REFCAT_LEVEL = 7
# the order in which records must be inserted
ELEMENT_ORDER = ("instrument", "physical_filter", "detector", "skymap", "tract", "patch",
                 "day_obs", "group", "exposure", "visit_system", "visit", "visit_definition",
                 "visit_system_membership", "visit_detector_region")


def camera_records(camera: Camera) -> dict[str, list[dict]]:
    return {
        "instrument": [{"name": INSTRUMENT, "visit_max": 2**40, "exposure_max": 2**40,
                        "detector_max": len(DETECTOR_NAMES), "visit_system": 0,
                        "class_name": "drp_flows.tasks.camera.Camera"}],
        "physical_filter": [{"instrument": INSTRUMENT, "name": PHYSICAL_FILTERS[b], "band": b}
                            for b in BANDS],
        "detector": [{"instrument": INSTRUMENT, "id": d, "full_name": name,
                      "name_in_raft": name.split("_")[1], "raft": name.split("_")[0],
                      "purpose": "SCIENCE"} for d, name in enumerate(DETECTOR_NAMES)],
        "visit_system": [{"instrument": INSTRUMENT, "id": 0, "name": "one-to-one"}],
    }


def skymap_records(sky: MiniSkymap) -> dict[str, list[dict]]:
    n = sky.patches_per_side
    return {
        "skymap": [{"name": sky.name, "hash": sky.name.encode(), "tract_max": len(sky.tracts),
                    "patch_nx_max": n, "patch_ny_max": n}],
        "tract": [{"skymap": sky.name, "id": t, "region": sky.tract_region(t)} for t in sky.tracts],
        "patch": [{"skymap": sky.name, "tract": t, "id": p, "cell_x": p % n, "cell_y": p // n,
                   "region": sky.patch_region(t, p)} for t in sky.tracts for p in range(n * n)],
    }


def _ccd_polygon(header: fits.Header, size: int) -> ConvexPolygon:
    return sky_polygon(header_wcs(header), np.array([-0.5, size - 0.5, size - 0.5, -0.5]),
                       np.array([-0.5, -0.5, size - 0.5, size - 0.5]))


def exposure_records(headers: list[fits.Header]) -> dict[str, list[dict]]:
    """Records for one exposure (one visit, one snap) from the primary headers of its CCDs."""
    h = headers[0]
    exposure = int(h["EXPID"])
    begin = Time(h["MJD-OBS"], format="mjd", scale="tai")
    span = Timespan(begin, begin + TimeDelta(max(h["EXPTIME"], 1e-3), format="sec"))
    day_obs = exposure // 100000
    group = str(exposure)
    obs_type = h["IMGTYPE"]
    common = {"instrument": INSTRUMENT, "physical_filter": h["FILTER"], "day_obs": day_obs,
              "exposure_time": h["EXPTIME"], "target_name": "ECDFS", "science_program": "sim",
              "observation_reason": obs_type, "azimuth": None, "zenith_angle": None,
              "timespan": span}
    records = {
        "day_obs": [{"instrument": INSTRUMENT, "id": day_obs}],
        "group": [{"instrument": INSTRUMENT, "name": group}],
        "exposure": [{**common, "id": exposure, "obs_id": f"SIM_O_{exposure}", "group": group,
                      "dark_time": h["DARKTIME"], "observation_type": obs_type,
                      "seq_num": exposure % 100000, "seq_start": exposure % 100000,
                      "seq_end": exposure % 100000, "tracking_ra": h.get("RA"),
                      "tracking_dec": h.get("DEC"), "sky_angle": h.get("ROTPA"),
                      "has_simulated": True, "can_see_sky": obs_type == "science"}],
    }
    if obs_type != "science":
        return records
    polys = {int(x["DETECTOR"]): _ccd_polygon(x, int(x["CCDSIZE"])) for x in headers}
    hull = ConvexPolygon.convexHull([v for p in polys.values() for v in p.getVertices()])
    records |= {
        "visit": [{**common, "id": exposure, "name": str(exposure), "seq_num": exposure % 100000,
                   "region": hull}],
        "visit_definition": [{"instrument": INSTRUMENT, "exposure": exposure, "visit": exposure}],
        "visit_system_membership": [{"instrument": INSTRUMENT, "visit_system": 0,
                                     "visit": exposure}],
        "visit_detector_region": [{"instrument": INSTRUMENT, "visit": exposure, "detector": d,
                                   "region": p} for d, p in sorted(polys.items())],
    }
    return records


def merge_records(*parts: dict[str, list[dict]]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for part in parts:
        for element, rows in part.items():
            out.setdefault(element, []).extend(rows)
    return {e: out[e] for e in ELEMENT_ORDER if e in out}


def htm_shards(ra: np.ndarray, dec: np.ndarray, level: int = REFCAT_LEVEL) -> np.ndarray:
    """HTM pixel index of each position (how Rubin shards reference catalogs)."""
    pix = HtmPixelization(level)
    return np.array([pix.index(UnitVector3d(LonLat.fromDegrees(float(r), float(d))))
                     for r, d in zip(ra, dec, strict=True)], dtype=np.int64)


def site_exposures(raw_dir, skymap: MiniSkymap, owns_tract, embargo=None,
                   holds_embargoed: bool = False) -> dict[int, list]:
    """Raw files of the exposures a site owns, by exposure: the tract under the boresight
    decides (as Rubin splits a campaign's raws between sites by sky region), except for
    exposures under `embargo` (an EmbargoConfig), which only the site that `holds_embargoed`
    gets, wherever they point."""
    by_exposure: dict[int, list] = {}
    for path in sorted(Path(raw_dir).glob("raw_*.fits")):
        by_exposure.setdefault(int(path.stem.split("_")[1]), []).append(path)
    owned = {}
    for exposure, paths in by_exposure.items():
        h = fits.getheader(paths[0], 0)
        if embargo is not None and embargo.covers(Time(h["MJD-OBS"], format="mjd", scale="tai")):
            if holds_embargoed:
                owned[exposure] = paths
            continue
        tract = int(skymap.tract_of(h["RA"], h["DEC"])[0])
        if tract >= 0 and owns_tract(tract, skymap.tract_center(tract)[1]):
            owned[exposure] = paths
    return owned


def refcat_shards(refcat) -> dict[int, object]:
    """Reference catalog split into HTM level-7 shards."""
    shard = htm_shards(np.asarray(refcat["coord_ra"]), np.asarray(refcat["coord_dec"]))
    return {int(s): refcat[shard == s] for s in np.unique(shard)}
