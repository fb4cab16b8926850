"""Step 3 as quanta: a deep coadd per (tract, patch, band) from the calibrated visit images
of the site's visits, scaled by their final (global) zeropoints."""

from __future__ import annotations

from functools import lru_cache

from astropy.io import fits
from astropy.wcs import WCS
from lsst.daf.butler import Butler

from drp_flows.sites.storage import Storage
from drp_flows.tasks.catalogs import read_table
from drp_flows.tasks.coadd import CoaddAccumulator, njy_scale, warp
from drp_flows.tasks.images import Exposure, read_fits
from drp_flows.tasks.quanta import OutputWriter, Quantum
from drp_flows.tasks.skymap import SKYMAP_NAME, MiniSkymap, tangent_wcs
from drp_flows.tasks.step1 import data_key, dataset_uri, done_quanta, existing_collections, output_uri

ASSEMBLE_COADD = "assembleCoadd"


def plan_assemble_coadd(butler: Butler, storage: Storage, run: str, tracts: list[int],
                        collections: list[str]) -> tuple[list[Quantum], int, list[dict]]:
    """One coadd per (tract, patch, band) that the site's calibrated images overlap (the
    registry's spatial join of visit-detector regions and patches); blocked while an
    overlapping visit has no final visit summary."""
    done = done_quanta(butler, collections, ("deep_coadd",))
    existing = existing_collections(butler, collections)
    if not existing or not tracts:
        return [], 0, []
    images = {(int(r.dataId["visit"]), int(r.dataId["detector"])): dataset_uri(butler, storage, r)
              for r in butler.registry.queryDatasets("preliminary_visit_image", collections=existing,
                                                     findFirst=True)}
    summaries = {int(r.dataId["visit"]): dataset_uri(butler, storage, r)
                 for r in butler.registry.queryDatasets("visit_summary", collections=existing,
                                                        findFirst=True)}
    cells: dict[tuple, set] = {}
    for tract in tracts:
        for d in butler.registry.queryDataIds(
                ["tract", "patch", "visit", "detector", "band"], skymap=SKYMAP_NAME, tract=tract,
                datasets="preliminary_visit_image", collections=existing):
            key = (int(d["tract"]), int(d["patch"]), d["band"])
            cells.setdefault(key, set()).add((int(d["visit"]), int(d["detector"])))
    quanta, skipped, blocked = [], 0, []
    for (tract, patch, band), ccds in sorted(cells.items()):
        data_id = {"skymap": SKYMAP_NAME, "tract": tract, "patch": patch, "band": band}
        if data_key(data_id) in done:
            skipped += 1
            continue
        visits = sorted({v for v, _ in ccds})
        if any(v not in summaries for v in visits):
            blocked.append(data_id)
            continue
        inputs = {"preliminary_visit_image": [images[c] for c in sorted(ccds) if c in images],
                  "visit_summary": [summaries[v] for v in visits]}
        quanta.append(Quantum(ASSEMBLE_COADD, data_id, inputs,
                              {"deep_coadd": output_uri(storage, run, "deep_coadd", data_id)}))
    return quanta, skipped, blocked


@lru_cache(maxsize=64)
def _zero_points(storage: Storage, uri: str) -> tuple[int, dict[int, float]]:
    """(visit, {detector: final zero point}) of a visit summary."""
    summary = read_table(storage, uri)
    return int(summary["visit"][0]), {int(d): float(z) for d, z in
                                      zip(summary["detector"], summary["zero_point"], strict=True)}


def patch_wcs(sky: MiniSkymap, tract: int, patch: int) -> tuple[WCS, tuple[int, int]]:
    """The WCS and shape of a patch: the tract's projection, origin at the patch corner."""
    x0, y0, x1, y1 = sky.patch_bbox(patch)
    c = (sky.tract_pixels - 1) / 2
    return (tangent_wcs(*sky.tract_center(tract), (c - x0, c - y0), sky.pixel_scale),
            (y1 - y0, x1 - x0))


def assemble_coadd(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """Warp and coadd every input CCD of one (tract, patch, band) (runs on a worker)."""
    d = quantum.data_id
    sky = MiniSkymap(**config["skymap"])
    wcs, shape = patch_wcs(sky, d["tract"], d["patch"])
    zps = dict(_zero_points(storage, uri) for uri in quantum.inputs["visit_summary"])
    acc = CoaddAccumulator(shape)
    for uri in quantum.inputs["preliminary_visit_image"]:
        exp = Exposure.from_hdulist(read_fits(storage, uri))
        visit, detector = int(exp.metadata["VISIT"]), int(exp.metadata["DETECTOR"])
        w = warp(exp, njy_scale(zps[visit][detector]), wcs, shape)
        if w is not None:
            acc.add(w, {"visit": visit, "detector": detector})
    if not acc.inputs:
        raise ValueError(f"{quantum}: no input pixel lands on the patch")
    meta = fits.Header({"TRACT": d["tract"], "PATCH": d["patch"], "BAND": d["band"]})
    out.write("deep_coadd", acc.coadd(wcs, meta).to_bytes())
