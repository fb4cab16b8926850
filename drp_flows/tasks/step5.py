"""Steps 5-6 as quanta: per visit, the DIA sources of its detectors in one table
(consolidateDiaSourceTable); per tract, DIA source association (drpAssociation) and the DIA objects'
forced photometry and light-curve statistics (Rubin's forcedPhotDiaObjectDetector and
drpDiaCalculation, one quantum here since the statistics come from the forced photometry); at
the campaign site, moving-object linking over every site's DIA sources.

A tract is processed at the site that owns it, from that site's difference images; a DIA
source belongs to the tract whose inner box holds it, so no object is made twice.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from drp_flows.engine.quanta import OutputWriter, Quantum
from drp_flows.sites.storage import Storage
from drp_flows.tasks.association import (
    associate_dia_sources,
    concatenate,
    dia_objects,
    light_curve_stats,
)
from drp_flows.tasks.camera import PIXEL_SCALE
from drp_flows.tasks.catalogs import read_table, table_bytes
from drp_flows.tasks.diffim import forced_photometry, measurable
from drp_flows.tasks.images import Exposure, read_fits
from drp_flows.tasks.moving_objects import link, mover_candidates
from drp_flows.tasks.skymap import MiniSkymap

CONSOLIDATE = "consolidateDiaSourceTable"
ASSOCIATE = "drpAssociation"
DIA_CALCULATION = "drpDiaCalculation"
LINK = "linkSolarSystemObjects"
DIA_CATALOGS = ("dia_source", "dia_object", "dia_object_forced_source")   # archived at home
OBJECT_ID_STRIDE = 10 ** 12          # dia_object_id = (tract + 1) * stride + n


def consolidate_dia_sources(quantum: Quantum, storage: Storage, out: OutputWriter,
                            config: dict) -> None:
    """The DIA sources of every detector of a visit in one table (runs on a worker)."""
    table = concatenate([read_table(storage, u) for u in quantum.inputs["dia_source_detector"]])
    table.meta = {"visit": quantum.data_id["visit"]}
    out.write("dia_source_visit", table_bytes(table))


def associate_tract(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """The tract's DIA sources with their DIA object (runs on a worker)."""
    tract = quantum.data_id["tract"]
    sources = concatenate([read_table(storage, u) for u in quantum.inputs["dia_source_visit"]])
    if len(sources):
        sources = sources[MiniSkymap(**config["skymap"]).tract_of(
            np.asarray(sources["ra"]), np.asarray(sources["dec"])) == tract]
    dia_sources = associate_dia_sources(sources, (tract + 1) * OBJECT_ID_STRIDE)
    dia_sources.add_column(np.full(len(dia_sources), tract), name="tract", index=2)
    out.write("dia_source", table_bytes(dia_sources))


def forced_sources(diff: Exposure, objects: Table) -> Table:
    """Forced PSF photometry of one difference image at the DIA objects that it measures."""
    meta = diff.metadata
    x, y = diff.wcs.all_world2pix(np.asarray(objects["ra"]), np.asarray(objects["dec"]), 0)
    fwhm = float(meta["PSF_FWHM"]) / PIXEL_SCALE
    on = measurable(diff, x, y, fwhm) if "NOTEMPL" not in meta else np.zeros(len(x), bool)
    flux, err = forced_photometry(diff, x[on], y[on], fwhm, float(meta.get("ERRSCALE", 1.0)))
    n = int(on.sum())
    return Table({"dia_object_id": np.asarray(objects["dia_object_id"])[on],
                  "visit": np.full(n, int(meta["VISIT"]), np.int64),
                  "detector": np.full(n, int(meta["DETECTOR"]), np.int32),
                  "band": np.full(n, str(meta["BAND"])), "mjd": np.full(n, float(meta["MJD-OBS"])),
                  "psf_flux": flux, "psf_flux_err": err})


def dia_calculation(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """Forced photometry of every difference image on the tract at its DIA objects, and the
    objects with their light-curve statistics (runs on a worker, one image in memory); the
    tract's coadd objects tell stars from movers caught in a template."""
    dia_sources = read_table(storage, quantum.inputs["dia_source"])
    objects = dia_objects(dia_sources)
    forced = [forced_sources(Exposure.from_hdulist(read_fits(storage, u)), objects)
              for u in quantum.inputs["difference_image"]] if len(objects) else []
    forced = concatenate(forced) if forced else forced_sources_empty()
    coadd_objects = read_table(storage, quantum.inputs["object"]) if "object" in quantum.inputs \
        else None
    objects = light_curve_stats(objects, forced, coadd_objects)
    objects.add_column(np.full(len(objects), quantum.data_id["tract"]), name="tract", index=1)
    out.write("dia_object", table_bytes(objects))
    out.write("dia_object_forced_source", table_bytes(forced))


def forced_sources_empty() -> Table:
    return Table({"dia_object_id": np.zeros(0, np.int64), "visit": np.zeros(0, np.int64),
                  "detector": np.zeros(0, np.int32), "band": np.zeros(0, str), "mjd": np.zeros(0),
                  "psf_flux": np.zeros(0), "psf_flux_err": np.zeros(0)})


def link_solar_system_objects(quantum: Quantum, storage: Storage, out: OutputWriter,
                              config: dict) -> None:
    """Tracklets and their links across nights from the DIA sources that can be movers."""
    sources = concatenate([read_table(storage, u) for u in quantum.inputs["dia_source"]])
    ss_object, ss_source = link(mover_candidates(sources))
    out.write("ss_object", table_bytes(ss_object))
    out.write("ss_source", table_bytes(ss_source))

