"""Setup ("rinse and repeat"): wipe and create every site's Butler with the same names.

Registers instrument, detectors, filters, the skymap's tracts and patches; ingests each site's
share of raws with exposure and visit records, the master calibrations (certified in the calib
collection), the camera description, the reference catalog and the skymap.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from astropy.io import fits
from astropy.table import Table
from lsst.daf.butler import Butler, CollectionType, DatasetRef, FileDataset, Timespan
from prefect import flow, get_run_logger, task

from drp_flows.datamodel import CALIB_COLLECTION, CALIB_RUN, RAW_RUN, REFCAT, REFCAT_RUN, SKYMAP_RUN
from drp_flows.sites.butler import (
    check_wipeable,
    create_repo,
    define_default_chain,
    formatter_for,
    ingest_copied,
    wipe_repo,
)
from drp_flows.sites.config import EmbargoConfig, SiteConfig, load_sites
from drp_flows.tasks import calibs
from drp_flows.tasks.camera import INSTRUMENT, PHYSICAL_FILTERS
from drp_flows.tasks.catalogs import table_bytes
from drp_flows.tasks.images import single_image_bytes
from drp_flows.tasks.ingest import (
    camera_records,
    exposure_records,
    merge_records,
    refcat_shards,
    site_exposures,
    skymap_records,
)
from drp_flows.validation.simulate import SurveyConfig, load_survey


@task(name="build master calibrations")
def build_masters(survey: str, out_dir: str) -> dict[tuple, str]:
    """Median-combine the calibration raws once; returns {(type, detector, filter): file}."""
    cfg, _ = load_survey(Path(survey))
    cam, raw_dir, out = cfg.camera, Path(survey) / "calib_raw", Path(out_dir)
    files = {}

    def frames(pattern):
        return [fits.open(p, memmap=False) for p in sorted(raw_dir.glob(pattern))]

    def save(key, data):
        path = out / ("_".join(str(k) for k in key if k) + ".fits")
        path.write_bytes(single_image_bytes(data))
        files[key] = str(path)

    for d in cam.detectors:
        bias = calibs.master_bias(frames(f"bias_*_{d}.fits"), cam, d)
        dark = calibs.master_dark(frames(f"dark_*_{d}.fits"), cam, d, bias)
        save(("bias", d, ""), bias)
        save(("dark", d, ""), dark)
        for band in cfg.bands:
            flat = calibs.master_flat(frames(f"flat_{band}_*_{d}.fits"), cam, d, bias, dark)
            files[("flat_raw", d, band)] = flat
    for band in cfg.bands:
        flats = calibs.normalize_flats({d: files.pop(("flat_raw", d, band)) for d in cam.detectors})
        for d, flat in flats.items():
            save(("flat", d, PHYSICAL_FILTERS[band]), flat)
    return files


def _ingest_calibs(butler: Butler, masters: dict[tuple, str], cfg: SurveyConfig) -> None:
    butler.registry.registerRun(CALIB_RUN)
    datasets = []
    for (kind, detector, physical_filter), path in masters.items():
        data_id = {"instrument": INSTRUMENT, "detector": detector}
        if physical_filter:
            data_id["physical_filter"] = physical_filter
        ref = DatasetRef(butler.get_dataset_type(kind), butler.registry.expandDataId(data_id),
                         run=CALIB_RUN)
        datasets.append(FileDataset(path=path, refs=[ref], formatter=formatter_for("FitsHDUList")))
    ingest_copied(butler, datasets)
    camera = {"ccd_size": cfg.ccd_size, "seed": cfg.camera.seed, "gap_pixels": cfg.camera.gap_pixels}
    camera_ref = butler.put(camera, "camera", instrument=INSTRUMENT, run=CALIB_RUN)
    butler.registry.registerCollection(CALIB_COLLECTION, CollectionType.CALIBRATION)
    refs = [d.refs[0] for d in datasets] + [camera_ref]
    butler.registry.certify(CALIB_COLLECTION, refs, Timespan(None, None))


def _ingest_refcat(butler: Butler, survey: Path, tmp: Path) -> None:
    butler.registry.registerRun(REFCAT_RUN)
    datasets = []
    for shard, table in refcat_shards(Table.read(survey / "refcat" / "refcat.parquet")).items():
        path = tmp / f"{REFCAT}_{shard}.parq"
        path.write_bytes(table_bytes(table))
        ref = DatasetRef(butler.get_dataset_type(REFCAT), {"htm7": shard}, run=REFCAT_RUN,
                         conform=True)
        datasets.append(FileDataset(path=str(path), refs=[ref], formatter=formatter_for("ArrowAstropy")))
    ingest_copied(butler, datasets)


def _ingest_raws(butler: Butler, exposures: dict[int, list]) -> int:
    butler.registry.registerRun(RAW_RUN)
    records = merge_records(*[exposure_records([fits.getheader(p, 0) for p in paths])
                              for paths in exposures.values()])
    for element, rows in records.items():
        butler.registry.insertDimensionData(element, *rows, skip_existing=True)
    datasets = []
    for exposure, paths in exposures.items():
        for path in paths:
            detector = int(path.stem.split("_")[2])
            ref = DatasetRef(butler.get_dataset_type("raw"),
                             butler.registry.expandDataId(instrument=INSTRUMENT, exposure=exposure,
                                                          detector=detector), run=RAW_RUN)
            datasets.append(FileDataset(path=str(path), refs=[ref],
                                        formatter=formatter_for("FitsHDUList")))
    ingest_copied(butler, datasets)
    return len(datasets)


@task(name="set up site")
def setup_site(site: SiteConfig, survey: str, masters: dict[tuple, str],
               embargo: EmbargoConfig | None = None, holds_embargoed: bool = False,
               force: bool = False) -> dict:
    """Wipe and recreate one site's repository and load its inputs (embargoed raws only at
    the site that holds them)."""
    logger = get_run_logger()
    cfg, _ = load_survey(Path(survey))
    wipe_repo(site, force)
    butler = create_repo(site)
    static = merge_records(camera_records(cfg.camera), skymap_records(cfg.skymap))
    for element, rows in static.items():
        butler.registry.insertDimensionData(element, *rows)
    _ingest_calibs(butler, masters, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        _ingest_refcat(butler, Path(survey), Path(tmp))
    butler.registry.registerRun(SKYMAP_RUN)
    butler.put(cfg.skymap.to_dict(), "skyMap", skymap=cfg.skymap.name, run=SKYMAP_RUN)
    exposures = site_exposures(Path(survey) / "raw", cfg.skymap, site.owns_tract, embargo,
                               holds_embargoed)
    n_raw = _ingest_raws(butler, exposures)
    define_default_chain(butler)
    logger.info("site %s: %d visits, %d raws at %s", site.name, len(exposures), n_raw, site.repo_dir)
    return {"site": site.name, "visits": len(exposures), "raws": n_raw, "repo": site.repo_dir}


@flow(name="drp-setup")
def setup_flow(site_file: str, survey: str, sites: list[str] | None = None,
               force: bool = False) -> list[dict]:
    """Wipe and create every site's Butler and load its share of the survey. Only what an
    earlier setup made for the same site is wiped (`force`: whatever is there), and every
    site is checked before any is touched."""
    campaign_sites = load_sites(site_file)
    names = sites or list(campaign_sites.sites)
    for n in names:
        check_wipeable(campaign_sites[n], force)
    with tempfile.TemporaryDirectory() as tmp:
        masters = build_masters(survey, tmp)
        return [setup_site(campaign_sites[n], survey, masters, campaign_sites.embargo,
                           n == campaign_sites.campaign_site, force) for n in names]
