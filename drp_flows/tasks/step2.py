"""Step 2 as quanta: the global photometric fit at the campaign site (fgcmFitCycle), its split
into one calibration per visit (fgcmOutputProducts), and, at the sites that hold the visits,
the final visit summary and recalibrated star table (updateVisitSummary).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from astropy.table import Table, vstack

from drp_flows.engine.quanta import OutputWriter, Quantum
from drp_flows.errors import DataError
from drp_flows.sites.storage import Storage
from drp_flows.tasks.catalogs import read_table, table_bytes
from drp_flows.tasks.global_calib import calibrated_mag_err, fit_cycle

FIT_CYCLE = "fgcmFitCycle"
OUTPUT_PRODUCTS = "fgcmOutputProducts"
UPDATE_VISIT_SUMMARY = "updateVisitSummary"


def run_fit_cycle(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """The global fit over the whole campaign (runs on a worker of the long pool)."""
    sources = [read_table(storage, u) for u in quantum.inputs["isolated_star_source"]]
    summaries = [read_table(storage, u) for u in quantum.inputs["preliminary_visit_summary"]]
    ref = vstack([read_table(storage, u) for u in quantum.inputs["refcat"]])
    zeropoints, stars = fit_cycle(sources, ref, summaries)
    out.write("fgcm_zeropoints", table_bytes(zeropoints))
    out.write("fgcm_standard_star", table_bytes(stars))


@lru_cache(maxsize=2)
def _zeropoints(storage: Storage, uri: str) -> Table:
    return read_table(storage, uri)


def run_output_products(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """The calibration of one visit: a row per detector (zero point, error, how it was fit)."""
    zps = _zeropoints(storage, quantum.inputs["fgcm_zeropoints"])
    calib = zps[zps["visit"] == quantum.data_id["visit"]]
    calib.meta = {"visit": quantum.data_id["visit"]}
    out.write("fgcm_photo_calib", table_bytes(calib))


def run_update_visit_summary(quantum: Quantum, storage: Storage, out: OutputWriter,
                             config: dict) -> None:
    """Apply a visit's global calibration: the final visit summary (global zero point, its
    change from single-frame calibration, depth with it) and the star table in calibrated mags,
    their errors with the calibration's."""
    summary = read_table(storage, quantum.inputs["preliminary_visit_summary"])
    calib = read_table(storage, quantum.inputs["fgcm_photo_calib"])
    by_detector = {int(d): k for k, d in enumerate(calib["detector"])}
    missing = [int(d) for d in summary["detector"] if int(d) not in by_detector]
    if missing:
        raise DataError(f"visit {quantum.data_id['visit']}: no global calibration for detectors "
                        f"{missing}")
    rows = [by_detector[int(d)] for d in summary["detector"]]
    zp = np.asarray(calib["zero_point"])[rows]
    summary["delta_zero_point"] = zp - summary["zero_point"]
    summary["m5"] = summary["m5"] + summary["delta_zero_point"]
    summary["zero_point"] = zp
    summary["zero_point_err"] = np.asarray(calib["zero_point_err"])[rows]
    summary["calib_status"] = np.asarray(calib["status"])[rows]
    out.write("visit_summary", table_bytes(summary))

    stars = read_table(storage, quantum.inputs["single_visit_star"])
    if len(stars):
        k = np.array([by_detector[int(d)] for d in stars["detector"]])
        with np.errstate(invalid="ignore", divide="ignore"):
            stars["mag"] = np.asarray(calib["zero_point"])[k] - 2.5 * np.log10(stars["psf_flux"])
            stars["mag_err"] = calibrated_mag_err(stars["snr"], np.asarray(calib["zero_point_err"])[k])
    out.write("recalibrated_star", table_bytes(stars))
