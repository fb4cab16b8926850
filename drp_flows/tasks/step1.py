"""Step 1 as quanta: calibrateImage per (visit, detector), consolidation per visit, and
isolated-star association per tract.

Planning runs in the flow process against the site Butler (URIs of inputs, planned URIs of
outputs, skip what is registered); the quantum functions run on Dask workers and see only URIs.
ISR runs inside the calibrateImage quantum (as BPS clusters isr with calibrateImage), so the
post-ISR image never goes through storage. The consolidation per visit also pools the
detectors' PSF sizes into the visit's (finalizeCharacterization's role), when they agree.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from lsst.daf.butler import Butler, MissingCollectionError

from drp_flows.datamodel import CALIB_COLLECTION, DATASET_TYPES, DEFAULTS, REFCAT, SKYMAP_RUN
from drp_flows.engine.quanta import OutputWriter, Quantum
from drp_flows.sites.storage import Storage
from drp_flows.tasks.calibrate import calibrate, visit_psf_fwhm
from drp_flows.tasks.camera import INSTRUMENT, PIXEL_SCALE, Camera
from drp_flows.tasks.catalogs import read_table, table_bytes
from drp_flows.tasks.images import read_fits
from drp_flows.tasks.isolated_stars import associate
from drp_flows.tasks.isr import check_raw, run_isr
from drp_flows.tasks.psf import psf_flux_scale
from drp_flows.tasks.skymap import SKYMAP_NAME, MiniSkymap

CALIBRATE = "calibrateImage"
CONSOLIDATE = "consolidateVisitSummary"
ASSOCIATE = "isolatedStarAssociation"
SUMMARY_KEYS = {"ZP": "zero_point", "ZP_ERR": "zero_point_err", "ZP_NSTAR": "zero_point_nstar",
                "PSF_FWHM": "psf_fwhm", "FWHM_ERR": "psf_fwhm_err", "SKYBG": "sky_bg",
                "SKYNOISE": "sky_noise", "M5": "m5",
                "NSOURCE": "n_source", "WCS_RMS": "astrom_rms_mas", "WCS_NREF": "astrom_nref",
                "APCORR": "ap_corr_qa"}


def output_uri(storage: Storage, run: str, dataset_type: str, data_id: dict) -> str:
    """Where a quantum writes an output: <datastore>/<run>/<type>/<visit>/<type>_<ids>.<ext>."""
    name = "_".join([dataset_type, INSTRUMENT] + [str(data_id[k]) for k in sorted(data_id)])
    folder = [str(data_id[k]) for k in ("visit", "tract") if k in data_id][:1]
    return storage.join("repo", run, dataset_type, *folder,
                        name + DATASET_TYPES[dataset_type].extension)


def dataset_uri(butler: Butler, storage: Storage, ref) -> str:
    return storage.from_butler_uri(butler.getURI(ref))


def camera_config(butler: Butler) -> dict:
    return dict(butler.get("camera", instrument=INSTRUMENT, collections=CALIB_COLLECTION))


def existing_collections(butler: Butler, collections: list[str]) -> list[str]:
    """Those of the collections that exist (a new campaign's chain does not yet)."""
    existing = []
    for c in collections:
        try:
            butler.registry.getCollectionType(c)
        except MissingCollectionError:
            continue
        existing.append(c)
    return existing


def done_quanta(butler: Butler, collections: list[str], outputs: tuple[str, ...]) -> set[tuple]:
    """Data IDs (without instrument) for which every output is registered in the collections:
    the quanta that skip-existing leaves out."""
    existing = existing_collections(butler, collections)
    done = None
    for dataset_type in outputs:
        ids = set()
        if existing:
            for ref in butler.registry.queryDatasets(dataset_type, collections=existing,
                                                     findFirst=True):
                ids.add(tuple(sorted((k, v) for k, v in ref.dataId.required.items()
                                     if k != "instrument")))
        done = ids if done is None else done & ids
    return done or set()


def visit_uris(butler: Butler, storage: Storage, dataset_type: str,
               collections: list[str]) -> dict[int, str]:
    """URIs of a per-visit dataset type, by visit (find-first in the collections)."""
    existing = existing_collections(butler, collections)
    if not existing:
        return {}
    refs = butler.registry.queryDatasets(dataset_type, collections=existing, findFirst=True)
    return {int(r.dataId["visit"]): dataset_uri(butler, storage, r) for r in refs}


def data_key(data_id: dict) -> tuple:
    return tuple(sorted(data_id.items()))


def plan_calibrate(butler: Butler, storage: Storage, run: str, visits: list[int],
                   done_collections: list[str]) -> tuple[list[Quantum], int, list[dict]]:
    """calibrateImage quanta for the visits' raws, minus those whose outputs are registered.
    Returns (quanta, skipped, blocked); nothing blocks a CCD at the head of the pipeline."""
    outputs = ("preliminary_visit_image", "single_visit_star_unstandardized")
    done = done_quanta(butler, done_collections, outputs)
    if not visits:
        return [], 0, []
    raws = butler.registry.queryDatasets(
        "raw", collections=DEFAULTS, instrument=INSTRUMENT,
        where=f"exposure IN ({', '.join(str(v) for v in visits)})")
    calib_cache: dict[tuple, str] = {}
    shard_cache: dict[int, list[str]] = {}
    quanta, skipped = [], 0
    for ref in sorted(raws, key=lambda r: (r.dataId["exposure"], r.dataId["detector"])):
        visit, detector = int(ref.dataId["exposure"]), int(ref.dataId["detector"])
        data_id = {"visit": visit, "detector": detector}
        if data_key(data_id) in done:
            skipped += 1
            continue
        exposure = butler.registry.expandDataId(ref.dataId)
        inputs = {"raw": dataset_uri(butler, storage, ref), "band": exposure["band"]}
        for calib in ("bias", "dark", "flat"):
            key = (calib, detector, exposure["physical_filter"] if calib == "flat" else "")
            if key not in calib_cache:
                cref = butler.find_dataset(calib, exposure, collections=CALIB_COLLECTION,
                                           timespan=exposure.timespan)
                if cref is None:
                    raise LookupError(f"no {calib} for {dict(exposure.required)} in {CALIB_COLLECTION}")
                calib_cache[key] = dataset_uri(butler, storage, cref)
            inputs[calib] = calib_cache[key]
        if visit not in shard_cache:
            shards = butler.registry.queryDataIds(["htm7"], instrument=INSTRUMENT, visit=visit)
            refs = [butler.find_dataset(REFCAT, d, collections=DEFAULTS) for d in shards]
            shard_cache[visit] = sorted(dataset_uri(butler, storage, r) for r in refs if r is not None)
        inputs["refcat"] = shard_cache[visit]
        quanta.append(Quantum(CALIBRATE, data_id, inputs,
                              {o: output_uri(storage, run, o, data_id) for o in outputs}))
    return quanta, skipped, []


def plan_consolidate(butler: Butler, storage: Storage, run: str, visits: list[int],
                     collections: list[str]) -> tuple[list[Quantum], int, list[dict]]:
    """Per-visit consolidation of whatever detectors calibrated; a visit with none is blocked."""
    outputs = ("single_visit_star", "preliminary_visit_summary")
    done = done_quanta(butler, collections, outputs)
    existing = existing_collections(butler, collections)
    per_visit: dict[int, dict[str, list[str]]] = {v: {} for v in visits}
    for name in ("preliminary_visit_image", "single_visit_star_unstandardized"):
        if not existing:
            break
        for ref in butler.registry.queryDatasets(name, collections=existing, findFirst=True,
                                                 instrument=INSTRUMENT):
            v = int(ref.dataId["visit"])
            if v in per_visit:
                per_visit[v].setdefault(name, []).append(dataset_uri(butler, storage, ref))
    quanta, skipped, blocked = [], 0, []
    for visit in visits:
        data_id = {"visit": visit}
        if data_key(data_id) in done:
            skipped += 1
            continue
        inputs = per_visit[visit]
        if not inputs.get("preliminary_visit_image"):
            blocked.append(data_id)
            continue
        quanta.append(Quantum(CONSOLIDATE, data_id, {k: sorted(v) for k, v in inputs.items()},
                              {o: output_uri(storage, run, o, data_id) for o in outputs}))
    return quanta, skipped, blocked


def skymap_config(butler: Butler) -> dict:
    return dict(butler.get("skyMap", skymap=SKYMAP_NAME, collections=SKYMAP_RUN))


def tract_inputs(butler: Butler, storage: Storage, dataset_type: str, tract: int,
                 existing: list[str]) -> list[str]:
    """URIs of a per-visit or per-(visit, detector) dataset type overlapping a tract."""
    refs = [] if not existing else butler.registry.queryDatasets(
        dataset_type, collections=existing, findFirst=True, instrument=INSTRUMENT,
        where="skymap = sm AND tract = t", bind={"sm": SKYMAP_NAME, "t": tract})
    return sorted({dataset_uri(butler, storage, r) for r in refs})


def plan_per_tract(label: str, outputs: tuple[str, ...], needs: tuple[str, ...]):
    """A planner of one quantum per tract over the given inputs overlapping it, blocked while
    the first of them has nothing on the tract."""
    def plan(butler: Butler, storage: Storage, run: str, tracts: list[int],
             collections: list[str]) -> tuple[list[Quantum], int, list[dict]]:
        done = done_quanta(butler, collections, outputs)
        existing = existing_collections(butler, collections)
        quanta, skipped, blocked = [], 0, []
        for tract in tracts:
            data_id = {"skymap": SKYMAP_NAME, "tract": tract}
            if data_key(data_id) in done:
                skipped += 1
                continue
            inputs = {n: tract_inputs(butler, storage, n, tract, existing) for n in needs}
            if not inputs[needs[0]]:
                blocked.append(data_id)
                continue
            quanta.append(Quantum(label, data_id, inputs,
                                  {o: output_uri(storage, run, o, data_id) for o in outputs}))
        return quanta, skipped, blocked
    return plan


plan_associate = plan_per_tract(ASSOCIATE, ("isolated_star", "isolated_star_source"),
                                ("single_visit_star",))


def associate_isolated_stars(quantum: Quantum, storage: Storage, out: OutputWriter,
                             config: dict) -> None:
    """Isolated stars of one tract from the visit star tables (runs on a worker)."""
    tables = [read_table(storage, u) for u in quantum.inputs["single_visit_star"]]
    stars, sources = associate(tables, quantum.data_id["tract"], MiniSkymap(**config["skymap"]))
    out.write("isolated_star", table_bytes(stars))
    out.write("isolated_star_source", table_bytes(sources))


@lru_cache(maxsize=16)
def _calib_image(storage: Storage, uri: str) -> np.ndarray:
    data = read_fits(storage, uri)["IMAGE"].data
    return np.ascontiguousarray(data, dtype=np.float32)


@lru_cache(maxsize=4)
def _refcat(storage: Storage, uris: tuple[str, ...]) -> Table:
    return vstack([read_table(storage, u) for u in uris])


def calibrate_image(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """ISR + single-frame calibration of one CCD (runs on a worker)."""
    camera = Camera(**config["camera"])
    detector = quantum.data_id["detector"]
    try:
        raw = read_fits(storage, quantum.inputs["raw"])
        raw.verify("exception")
        check_raw(raw, camera)
    except Exception as e:
        raise ValueError(f"corrupt raw {quantum.inputs['raw']}: {e}") from e
    post_isr = run_isr(raw, camera, detector, _calib_image(storage, quantum.inputs["bias"]),
                       _calib_image(storage, quantum.inputs["dark"]),
                       _calib_image(storage, quantum.inputs["flat"]))
    image, stars = calibrate(post_isr, _refcat(storage, tuple(quantum.inputs["refcat"])),
                             quantum.inputs["band"], sip_degree=config.get("sip_degree", 2))
    image.metadata["VISIT"] = quantum.data_id["visit"]
    out.write("preliminary_visit_image", image.to_bytes())
    stars.meta = {"visit": quantum.data_id["visit"], "detector": detector,
                  "band": quantum.inputs["band"]}
    out.write("single_visit_star_unstandardized", table_bytes(stars))


def apply_visit_psf(summary: Table) -> None:
    """Give every detector the visit's PSF size when the detectors agree on it: psf_fwhm
    becomes the visit's (the detector's own fit is kept as psf_fwhm_detector), and the
    zeropoint moves with the flux factor psf_flux_scale that the PSF fluxes take."""
    summary["psf_fwhm_detector"] = summary["psf_fwhm"]
    summary["psf_flux_scale"] = 1.0
    visit_fwhm = visit_psf_fwhm(np.asarray(summary["psf_fwhm"], float),
                                np.asarray(summary["psf_fwhm_err"], float))
    if visit_fwhm is None:
        return
    for row in summary:
        scale = psf_flux_scale(row["psf_fwhm"] / PIXEL_SCALE, visit_fwhm / PIXEL_SCALE)
        row["psf_fwhm"], row["psf_flux_scale"] = visit_fwhm, scale
        row["zero_point"] += 2.5 * np.log10(scale)


def consolidate_visit(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """Visit summary (one row per detector) and the visit's star table (runs on a worker)."""
    rows = []
    for uri in quantum.inputs["preliminary_visit_image"]:
        with storage.open(uri, "rb") as f:
            h = fits.getheader(f, 0)
        row = {"visit": quantum.data_id["visit"], "detector": int(h["DETECTOR"]),
               "band": h["BAND"], "mjd": h["MJD-OBS"]}
        row |= {name: h.get(key, np.nan) for key, name in SUMMARY_KEYS.items()}
        rows.append(row)
    summary = Table(rows=rows)
    summary.sort("detector")
    apply_visit_psf(summary)
    flux_scale = dict(zip(summary["detector"].tolist(), summary["psf_flux_scale"].tolist(), strict=True))
    out.write("preliminary_visit_summary", table_bytes(summary))
    tables = []
    for uri in quantum.inputs.get("single_visit_star_unstandardized", []):
        t = read_table(storage, uri)
        for column in ("psf_flux", "psf_flux_err"):
            t[column] *= flux_scale[t.meta["detector"]]
        t["visit"] = np.full(len(t), t.meta["visit"], dtype=np.int64)
        t["detector"] = np.full(len(t), t.meta["detector"], dtype=np.int32)
        t["band"] = t.meta["band"]
        tables.append(t)
    stars = vstack(tables, metadata_conflicts="silent") if tables else Table()
    stars.meta = {"visit": quantum.data_id["visit"]}
    out.write("single_visit_star", table_bytes(stars))
