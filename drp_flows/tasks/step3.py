"""Step 3 as quanta: a deep coadd per (tract, patch, band) from the calibrated visit images
of the site's visits, scaled by their final (global) zeropoints, the survey property maps
per (tract, band), and the objects measured on the coadds per patch and per tract."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from astropy.io import fits
from astropy.table import vstack
from astropy.wcs import WCS
from lsst.sphgeom import ConvexPolygon

from drp_flows import datamodel
from drp_flows.engine.quanta import OutputWriter, Quantum, reading
from drp_flows.errors import DataError
from drp_flows.sites.storage import Storage
from drp_flows.tasks.camera import PIXEL_SCALE
from drp_flows.tasks.catalogs import read_table, table_bytes
from drp_flows.tasks.coadd import CoaddAccumulator, njy_scale, warp
from drp_flows.tasks.images import Exposure, read_fits
from drp_flows.tasks.objects import measure_objects
from drp_flows.tasks.property_maps import CcdInput, map_bytes, property_maps
from drp_flows.tasks.skymap import MiniSkymap, header_wcs, inset_polygon, tangent_wcs

ASSEMBLE_COADD = "assembleCoadd"
PROPERTY_MAPS = "healSparsePropertyMaps"
WRITE_OBJECT_TABLE = "writeObjectTable"       # detect, merge, measure, forced photometry per patch
CONSOLIDATE_OBJECT_TABLE = "consolidateObjectTable"
SLIVER_PIXELS = 3        # a CCD overlapping a patch by less than this is not one of its inputs
MAP_TYPES = tuple(f"deep_coadd_{name}" for name in datamodel.PROPERTY_MAPS)


def warp_region(ccd: ConvexPolygon) -> ConvexPolygon:
    """The part of a CCD whose overlap with a patch makes it a coadd input: the registry's
    spatial join is coarse (it matches sky pixels, so a CCD a few pixels from a patch is
    joined to it), and a sliver narrower than SLIVER_PIXELS gives the warp no pixel centre
    to resample."""
    return inset_polygon(ccd, SLIVER_PIXELS * PIXEL_SCALE)


def footprint_region(ccd: ConvexPolygon) -> ConvexPolygon:
    """A CCD's whole footprint: the property maps take every CCD that reaches the tract."""
    return ccd


@lru_cache(maxsize=64)
def summary_rows(storage: Storage, uri: str) -> tuple[int, dict[int, dict]]:
    """(visit, {detector: its row of the final visit summary})."""
    summary = read_table(storage, uri)
    return int(summary["visit"][0]), {int(r["detector"]): dict(zip(r.colnames, r, strict=True))
                                      for r in summary}


def box_wcs(sky: MiniSkymap, tract: int, x0: int, y0: int) -> WCS:
    """The tract's projection with its origin moved to tract pixel (x0, y0)."""
    c = (sky.tract_pixels - 1) / 2
    return tangent_wcs(*sky.tract_center(tract), (c - x0, c - y0), sky.pixel_scale)


def patch_wcs(sky: MiniSkymap, tract: int, patch: int) -> tuple[WCS, tuple[int, int]]:
    """The WCS and shape of a patch: the tract's projection, origin at the patch corner."""
    x0, y0, x1, y1 = sky.patch_bbox(patch)
    return box_wcs(sky, tract, x0, y0), (y1 - y0, x1 - x0)


def template_visits(rows: dict[int, dict[int, dict]]) -> set[int]:
    """The best-seeing third of the visits (at least one), by median PSF FWHM over detectors:
    the template coadd, as DP1 built its templates."""
    seeing = sorted((float(np.median([r["psf_fwhm"] for r in dets.values()])), visit)
                    for visit, dets in rows.items())
    return {visit for _, visit in seeing[:max(1, int(np.ceil(len(seeing) / 3)))]}


def assemble_coadd(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """Warp every input CCD of one (tract, patch, band) once and coadd all of them (the deep
    coadd) and those of the best-seeing visits (the template) (runs on a worker)."""
    d = quantum.data_id
    sky = MiniSkymap(**config["skymap"])
    wcs, shape = patch_wcs(sky, d["tract"], d["patch"])
    rows = dict(summary_rows(storage, uri) for uri in quantum.inputs["visit_summary"])
    best = template_visits(rows)
    deep, template = CoaddAccumulator(shape), CoaddAccumulator(shape)
    for uri in quantum.inputs["preliminary_visit_image"]:
        exp = Exposure.from_hdulist(read_fits(storage, uri))
        visit, detector = int(exp.metadata["VISIT"]), int(exp.metadata["DETECTOR"])
        row = rows[visit][detector]
        w = warp(exp, njy_scale(row["zero_point"]), wcs, shape)
        if w is not None:
            info = {"visit": visit, "detector": detector, "psf_fwhm": row["psf_fwhm"] / PIXEL_SCALE}
            if exp.psf is not None:     # its model, and its flux on the aperture-scale coadd
                info |= {"psf": exp.psf, "psf_norm": 1.0 / float(exp.metadata["APCORR"])}
            deep.add(w, info)
            if visit in best:
                template.add(w, info)
    if not deep.inputs:
        raise DataError(f"{quantum}: no input pixel lands on the patch")
    meta = fits.Header({"TRACT": d["tract"], "PATCH": d["patch"], "BAND": d["band"]})
    out.write("deep_coadd", deep.coadd(wcs, meta).to_bytes())
    meta["VISITS"] = (" ".join(map(str, sorted(best))), "best-seeing third of the visits")
    out.write("template_coadd", template.coadd(wcs, meta).to_bytes())


def healsparse_property_maps(quantum: Quantum, storage: Storage, out: OutputWriter,
                             config: dict) -> None:
    """Property maps of one (tract, band) from its CCDs' footprints and summaries (a worker)."""
    sky = MiniSkymap(**config["skymap"])
    rows = dict(summary_rows(storage, uri) for uri in quantum.inputs["visit_summary"])
    ccds = []
    for uri in quantum.inputs["preliminary_visit_image"]:
        with reading(uri), storage.open(uri, "rb") as f:
            hdul = fits.open(f, lazy_load_hdus=True)
            primary, header = hdul[0].header.copy(), hdul["IMAGE"].header.copy()
        row = rows[int(primary["VISIT"])][int(primary["DETECTOR"])]
        ccds.append(CcdInput(header_wcs(header), (header["NAXIS2"], header["NAXIS1"]),
                             float(primary["EXPTIME"]), float(row["psf_fwhm"]),
                             float(row["zero_point"]), float(row["sky_noise"])))
    tract = quantum.data_id["tract"]
    maps = property_maps(ccds, lambda ra, dec: sky.tract_of(ra, dec) == tract)
    for name, m in maps.items():
        out.write(f"deep_coadd_{name}", map_bytes(m))


def write_object_table(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """The objects of one patch from its deep coadds in every band (runs on a worker)."""
    coadds = {}
    for uri in quantum.inputs["deep_coadd"]:
        exp = Exposure.from_hdulist(read_fits(storage, uri))
        coadds[exp.metadata["BAND"]] = exp
    try:
        objects = measure_objects(coadds, quantum.data_id["tract"], quantum.data_id["patch"])
    except DataError as e:
        raise DataError(f"{quantum}: {e}") from e
    out.write("object_patch", table_bytes(objects))


def consolidate_object_table(quantum: Quantum, storage: Storage, out: OutputWriter,
                             config: dict) -> None:
    """The object table of a tract: its patches' tables, with every band's columns."""
    tables = [read_table(storage, u) for u in quantum.inputs["object_patch"]]
    objects = vstack(tables, join_type="outer", metadata_conflicts="silent")
    objects.meta = {"tract": quantum.data_id["tract"]}
    out.write("object", table_bytes(objects))
