"""A site repository at survey scale, for planning benchmarks and tests: a small simulated
survey is set up as one site with our own setup flow, then its visits are copied N times
(new exposure and visit IDs, the same regions, timespans moved on) with a raw dataset per
copied CCD that points at the original raw's file (one file, many datasets, as `direct`
ingest allows). Planning sees a registry of N visits; nothing is read from the raws.
`widen` first gives the camera more detectors (the full camera's 189: copies of the nine,
with their regions, raws and certified calibrations), and `calibrate_all` registers a
calibrated image per CCD and a summary per visit (again pointing at one file), so that
step 3 can be planned at survey scale.
"""

from __future__ import annotations

import time
from pathlib import Path

from astropy.time import TimeDelta
from lsst.daf.butler import DataCoordinate, DatasetRef, FileDataset, Timespan

from drp_flows.datamodel import CALIB_COLLECTION, CALIB_RUN, RAW_RUN
from drp_flows.sites.butler import formatter_for, open_butler
from drp_flows.tasks.camera import INSTRUMENT

SMALL = {"ccd_size": 64, "nights": 1, "rounds_per_night": 1, "n_bias": 1, "n_dark": 1,
         "n_flat": 1, "asteroids_per_tract": 0, "star_density": 5.0}
COPIED = ("exposure", "visit", "visit_definition", "visit_system_membership",
          "visit_detector_region")


def small_site(root: Path, config: dict = SMALL) -> str:
    """A one-site file over every tract of a tiny simulated survey, set up; its path."""
    from drp_flows.flows.setup import setup_flow
    from drp_flows.validation.simulate import SurveyConfig, simulate_survey

    survey = simulate_survey(SurveyConfig(**config), root / "survey")
    site_file = root / "sites.yaml"
    site_file.write_text("campaign_site: big\nsites:\n  big:\n"
                         "    cluster: {kind: local, jobs: 1}\n"
                         f"    storage: file://{root}/big\n")
    setup_flow(str(site_file), str(survey))
    return str(site_file)


# what each copied record's fields become, given the copy's exposure and visit id
RENAME = {"exposure": {"id": "{new}", "obs_id": "SIM_O_{new}"},
          "visit": {"id": "{new}", "name": "{new}"},
          "visit_definition": {"exposure": "{new}", "visit": "{new}"},
          "visit_system_membership": {"visit": "{new}"},
          "visit_detector_region": {"visit": "{new}"}}
FIRST_COPY = 10**11          # copies' ids start here (the instrument allows up to 2**40)


def grow(site_file: str, visits: int, chunk: int = 1000) -> float:
    """Copy the site's visits until it holds `visits`; returns the seconds it took."""
    from drp_flows.sites.config import load_sites

    start = time.perf_counter()
    butler = open_butler(load_sites(site_file)["big"], writeable=True)
    registry = butler.registry
    originals = sorted(int(r.id) for r in registry.queryDimensionRecords("visit",
                                                                         instrument=INSTRUMENT))
    records: dict[str, dict[int, list[dict]]] = {e: {} for e in COPIED}
    for element in COPIED:
        for r in registry.queryDimensionRecords(element, instrument=INSTRUMENT):
            row = r.toDict()
            key = row.get("visit", row.get("id"))
            records[element].setdefault(int(key), []).append(row)
    raws: dict[int, list] = {}
    for ref in registry.queryDatasets("raw", collections=RAW_RUN):
        raws.setdefault(int(ref.dataId["exposure"]), []).append(
            (int(ref.dataId["detector"]), str(butler.getURI(ref))))
    raw_type = butler.get_dataset_type("raw")
    have = copy = registry.queryDimensionRecords("visit", instrument=INSTRUMENT).count()
    while have < visits:
        rows: dict[str, list[dict]] = {e: [] for e in COPIED}
        files: dict[str, list[DatasetRef]] = {}
        for _ in range(min(chunk, visits - have)):
            source, new = originals[copy % len(originals)], FIRST_COPY + copy
            shift = TimeDelta(60.0 * copy, format="sec")
            for element in COPIED:
                for row in records[element][source]:
                    row = row | {k: type(row[k])(v.format(new=new))
                                 for k, v in RENAME[element].items()}
                    if row.get("timespan") is not None:
                        row["timespan"] = Timespan(row["timespan"].begin + shift,
                                                   row["timespan"].end + shift)
                    rows[element].append(row)
            for detector, uri in raws[source]:
                files.setdefault(uri, []).append(DatasetRef(raw_type, DataCoordinate.standardize(
                    instrument=INSTRUMENT, exposure=new, detector=detector,
                    dimensions=raw_type.dimensions), run=RAW_RUN))
            copy += 1
            have += 1
        for element in COPIED:
            registry.insertDimensionData(element, *rows[element])
        butler.ingest(*[FileDataset(path=uri, refs=refs, formatter=formatter_for("FitsHDUList"))
                        for uri, refs in files.items()], transfer="direct")
    return time.perf_counter() - start


def widen(site_file: str, detectors: int) -> None:
    """Give the site's camera `detectors` detectors: detector d > 8 is a copy of d % 9 (the
    same region in every visit, its raws pointing at that one's files, its calibrations
    certified like that one's)."""
    from drp_flows.sites.config import load_sites

    butler = open_butler(load_sites(site_file)["big"], writeable=True)
    registry = butler.registry
    base = {int(r.id): r.toDict() for r in registry.queryDimensionRecords("detector",
                                                                           instrument=INSTRUMENT)}
    new = range(len(base), detectors)
    registry.insertDimensionData("detector", *[base[d % len(base)] | {
        "id": d, "full_name": f"C{d:03d}", "name_in_raft": f"C{d:03d}"} for d in new])
    regions = [r.toDict() for r in registry.queryDimensionRecords("visit_detector_region",
                                                                  instrument=INSTRUMENT)]
    registry.insertDimensionData("visit_detector_region", *[
        r | {"detector": d} for r in regions for d in new if d % len(base) == r["detector"]])
    for dataset_type, run in (("raw", RAW_RUN), ("bias", CALIB_RUN), ("dark", CALIB_RUN),
                              ("flat", CALIB_RUN)):
        kind = butler.get_dataset_type(dataset_type)
        files: dict[str, list[DatasetRef]] = {}
        for ref in registry.queryDatasets(dataset_type, collections=run):
            ids = dict(ref.dataId.required)
            uri = str(butler.getURI(ref))
            for d in new:
                if d % len(base) == ids["detector"]:
                    files.setdefault(uri, []).append(DatasetRef(kind, DataCoordinate.standardize(
                        ids | {"detector": d}, dimensions=kind.dimensions), run=run))
        butler.ingest(*[FileDataset(path=uri, refs=refs, formatter=formatter_for("FitsHDUList"))
                        for uri, refs in files.items()], transfer="direct")
        if run == CALIB_RUN:
            registry.certify(CALIB_COLLECTION, [r for refs in files.values() for r in refs],
                             Timespan(None, None))


def calibrate_all(site_file: str, run: str) -> float:
    """A preliminary_visit_image per CCD with a raw and a visit_summary per visit, registered
    in `run` (all pointing at one raw's file: planning reads none of them); the seconds."""
    from drp_flows.sites.config import load_sites

    start = time.perf_counter()
    butler = open_butler(load_sites(site_file)["big"], writeable=True)
    registry = butler.registry
    registry.registerRun(run)
    raws = list(registry.queryDatasets("raw", collections=RAW_RUN))
    path = str(butler.getURI(raws[0]))
    image, summary = butler.get_dataset_type("preliminary_visit_image"), \
        butler.get_dataset_type("visit_summary")
    visits = {int(r.dataId["exposure"]) for r in raws}
    images = [DatasetRef(image, DataCoordinate.standardize(
        instrument=INSTRUMENT, visit=int(r.dataId["exposure"]), detector=int(r.dataId["detector"]),
        dimensions=image.dimensions), run=run) for r in raws]
    summaries = [DatasetRef(summary, DataCoordinate.standardize(
        instrument=INSTRUMENT, visit=v, dimensions=summary.dimensions), run=run) for v in visits]
    butler.ingest(FileDataset(path=path, refs=images, formatter=formatter_for("FitsHDUList")),
                  FileDataset(path=path, refs=summaries, formatter=formatter_for("ArrowAstropy")),
                  transfer="direct")
    return time.perf_counter() - start
