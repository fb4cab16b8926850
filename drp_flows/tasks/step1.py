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
from lsst.daf.butler import Butler

from drp_flows.datamodel import CALIB_COLLECTION, DEFAULTS, REFCAT, SKYMAP_RUN
from drp_flows.engine.planning import (
    data_key,
    dataset_uris,
    done_quanta,
    existing_collections,
    output_uri,
    within,
)
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


def camera_config(butler: Butler) -> dict:
    return dict(butler.get("camera", instrument=INSTRUMENT, collections=CALIB_COLLECTION))


class CalibrationLookup:
    """The master calibrations of a group's exposures, from one query per kind of what the
    calibration collection certifies (with validity ranges), instead of a find_dataset per
    detector and filter. Exposure times are read only when a detector has calibrations of
    more than one validity range."""

    def __init__(self, butler: Butler, storage: Storage, exposures: list[int]):
        self.butler, self.storage, self.exposures = butler, storage, exposures
        self.certified: dict[tuple, list] = {}
        for kind in ("bias", "dark", "flat"):
            for a in butler.registry.queryDatasetAssociations(kind, collections=CALIB_COLLECTION):
                key = (kind, int(a.ref.dataId["detector"]),
                       a.ref.dataId["physical_filter"] if kind == "flat" else "")
                self.certified.setdefault(key, []).append(a)
        refs = [a.ref for found in self.certified.values() for a in found]
        self.uris = dict(zip([r.id for r in refs], dataset_uris(butler, storage, refs),
                             strict=True))
        self._timespans: dict[int, object] | None = None

    def timespan(self, exposure: int):
        if self._timespans is None:
            self._timespans = {int(r.id): r.timespan for r in self.butler.registry
                               .queryDimensionRecords("exposure", **within("exposure",
                                                                           self.exposures))}
        return self._timespans[exposure]

    def find(self, kind: str, exposure: int, detector: int, physical_filter: str) -> str:
        key = (kind, detector, physical_filter if kind == "flat" else "")
        found = self.certified.get(key, [])
        if len(found) > 1:
            when = self.timespan(exposure)
            found = [a for a in found if a.timespan.overlaps(when)]
        if len(found) != 1:
            raise LookupError(f"{len(found) or 'no'} {kind} for detector {detector}"
                              + (f", filter {physical_filter}" if kind == "flat" else "")
                              + f" valid at exposure {exposure} in {CALIB_COLLECTION}")
        return self.uris[found[0].ref.id]


def plan_calibrate(butler: Butler, storage: Storage, run: str, visits: list[int],
                   done_collections: list[str]) -> tuple[list[Quantum], int, list[dict]]:
    """calibrateImage quanta for the visits' raws, minus those whose outputs are registered.
    Returns (quanta, skipped, blocked); nothing blocks a CCD at the head of the pipeline.
    A handful of bulk queries for the whole group, whatever its size: what is done, its raws
    and their files, the refcat shards its visits overlap, the certified calibrations."""
    outputs = ("preliminary_visit_image", "single_visit_star_unstandardized")
    if not visits:
        return [], 0, []
    done = done_quanta(butler, done_collections, outputs, "visit", visits)
    exposures = within("exposure", visits)
    raws = sorted((r for r in butler.registry.queryDatasets(
        "raw", collections=DEFAULTS, instrument=INSTRUMENT, **exposures)
        if data_key({"visit": r.dataId["exposure"], "detector": r.dataId["detector"]}) not in done),
        key=lambda r: (r.dataId["exposure"], r.dataId["detector"]))
    skipped = len(done)
    if not raws:
        return [], skipped, []
    raw_uris = dataset_uris(butler, storage, raws)
    shards: dict[int, set[int]] = {}
    for d in butler.registry.queryDataIds(["visit", "htm7"], instrument=INSTRUMENT,
                                          **within("visit", visits)):
        shards.setdefault(int(d["visit"]), set()).add(int(d["htm7"]))
    wanted = set().union(*shards.values())
    refcat = {int(r.dataId["htm7"]): r for r in butler.registry.queryDatasets(
        REFCAT, collections=DEFAULTS, **within("htm7", wanted))} if wanted else {}
    refcat_uris = dict(zip(refcat, dataset_uris(butler, storage, list(refcat.values())),
                           strict=True))
    shard_uris = {v: sorted(refcat_uris[s] for s in found if s in refcat_uris)
                  for v, found in shards.items()}
    calibs = CalibrationLookup(butler, storage, visits)
    quanta = []
    for ref, raw_uri in zip(raws, raw_uris, strict=True):
        visit, detector = int(ref.dataId["exposure"]), int(ref.dataId["detector"])
        data_id = {"visit": visit, "detector": detector}
        inputs = {"raw": raw_uri, "band": ref.dataId["band"],
                  **{kind: calibs.find(kind, visit, detector, ref.dataId["physical_filter"])
                     for kind in ("bias", "dark", "flat")},
                  "refcat": shard_uris.get(visit, [])}
        quanta.append(Quantum(CALIBRATE, data_id, inputs,
                              {o: output_uri(storage, run, o, data_id) for o in outputs}))
    return quanta, skipped, []


def plan_consolidate(butler: Butler, storage: Storage, run: str, visits: list[int],
                     collections: list[str]) -> tuple[list[Quantum], int, list[dict]]:
    """Per-visit consolidation of whatever detectors calibrated; a visit with none is blocked."""
    outputs = ("single_visit_star", "preliminary_visit_summary")
    if not visits:
        return [], 0, []
    done = done_quanta(butler, collections, outputs, "visit", visits)
    existing = existing_collections(butler, collections)
    per_visit: dict[int, dict[str, list[str]]] = {v: {} for v in visits}
    for name in ("preliminary_visit_image", "single_visit_star_unstandardized"):
        if not existing:
            break
        refs = list(butler.registry.queryDatasets(name, collections=existing, findFirst=True,
                                                  instrument=INSTRUMENT, **within("visit", visits)))
        for ref, uri in zip(refs, dataset_uris(butler, storage, refs), strict=True):
            per_visit[int(ref.dataId["visit"])].setdefault(name, []).append(uri)
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
    refs = [] if not existing else list(butler.registry.queryDatasets(
        dataset_type, collections=existing, findFirst=True, instrument=INSTRUMENT,
        where="skymap = sm AND tract = t", bind={"sm": SKYMAP_NAME, "t": tract}))
    return sorted(set(dataset_uris(butler, storage, refs)))


def plan_per_tract(label: str, outputs: tuple[str, ...], needs: tuple[str, ...]):
    """A planner of one quantum per tract over the given inputs overlapping it, blocked while
    the first of them has nothing on the tract."""
    def plan(butler: Butler, storage: Storage, run: str, tracts: list[int],
             collections: list[str]) -> tuple[list[Quantum], int, list[dict]]:
        done = done_quanta(butler, collections, outputs, "tract", tracts)
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
