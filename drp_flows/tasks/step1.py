"""Step 1 as quanta: calibrateImage per (visit, detector), consolidation per visit, and
isolated-star association per tract.

The pipeline table (tasks/pipeline.py) says what each reads; the quantum functions run on
Dask workers and see only URIs.
ISR runs inside the calibrateImage quantum (as BPS clusters isr with calibrateImage), so the
post-ISR image never goes through storage. The consolidation per visit plays
finalizeCharacterization's role: with the empirical PSF it fits the visit's PSF size over the
focal plane and moves every source's flux by its CCD model's size error (visit_psf.py); with
the Moffat it pools the detectors' sizes into the visit's, when they agree.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from lsst.daf.butler import Butler

from drp_flows.datamodel import CALIB_COLLECTION, SKYMAP_RUN
from drp_flows.engine.quanta import OutputWriter, Quantum, reading
from drp_flows.errors import DataError
from drp_flows.sites.storage import Storage
from drp_flows.tasks.calibrate import calibrate, visit_psf_fwhm
from drp_flows.tasks.camera import INSTRUMENT, PIXEL_SCALE, Camera
from drp_flows.tasks.catalogs import read_table, table_bytes
from drp_flows.tasks.images import read_fits
from drp_flows.tasks.isolated_stars import associate
from drp_flows.tasks.isr import check_raw, check_science_header, run_isr
from drp_flows.tasks.psf import psf_flux_scale
from drp_flows.tasks.skymap import SKYMAP_NAME, MiniSkymap
from drp_flows.tasks.visit_psf import correct_fluxes

CALIBRATE = "calibrateImage"
CONSOLIDATE = "consolidateVisitSummary"
ASSOCIATE = "isolatedStarAssociation"
SUMMARY_KEYS = {"ZP": "zero_point", "ZP_ERR": "zero_point_err", "ZP_NSTAR": "zero_point_nstar",
                "PSF_FWHM": "psf_fwhm", "FWHM_ERR": "psf_fwhm_err", "SKYBG": "sky_bg",
                "SKYNOISE": "sky_noise", "BKG_ERR": "background_err", "NEA": "nea", "M5": "m5",
                "NSOURCE": "n_source", "WCS_RMS": "astrom_rms_mas", "WCS_NREF": "astrom_nref",
                "APCORR": "ap_corr", "APRADIUS": "ap_radius", "PSF_KSIZ": "psf_size_response"}


def camera_config(butler: Butler) -> dict:
    return dict(butler.get("camera", instrument=INSTRUMENT, collections=CALIB_COLLECTION))


def skymap_config(butler: Butler) -> dict:
    return dict(butler.get("skyMap", skymap=SKYMAP_NAME, collections=SKYMAP_RUN))


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
    with reading(quantum.inputs["raw"]):
        raw = read_fits(storage, quantum.inputs["raw"])
        raw.verify("exception")
    try:
        check_science_header(raw[0].header)
        check_raw(raw, camera)
    except DataError as e:
        raise DataError(f"raw {quantum.inputs['raw']}: {e}") from None
    band = raw[0].header["BAND"]
    post_isr = run_isr(raw, camera, detector, _calib_image(storage, quantum.inputs["bias"]),
                       _calib_image(storage, quantum.inputs["dark"]),
                       _calib_image(storage, quantum.inputs["flat"]))
    image, stars = calibrate(post_isr, _refcat(storage, tuple(quantum.inputs["refcat"])),
                             band, sip_degree=config.get("sip_degree", 2),
                             # the site file's pipeline.psf_model (sites/config.py)
                             psf_model=config["psf_model"])
    image.metadata["VISIT"] = quantum.data_id["visit"]
    out.write("preliminary_visit_image", image.to_bytes())
    stars.meta = {"visit": quantum.data_id["visit"], "detector": detector,
                  "band": band}
    out.write("single_visit_star_unstandardized", table_bytes(stars))


def apply_visit_psf(summary: Table) -> None:
    """Give every detector the visit's PSF size when the detectors agree on it: psf_fwhm
    becomes the visit's (the detector's own fit is kept as psf_fwhm_detector), and, where the
    PSF fluxes came from the detector's Moffat, the zeropoint moves with the flux factor
    psf_flux_scale that they take (an empirical model's aperture-corrected fluxes, `ap_radius`
    set, stay)."""
    summary["psf_fwhm_detector"] = summary["psf_fwhm"]
    summary["psf_flux_scale"] = 1.0
    visit_fwhm = visit_psf_fwhm(np.asarray(summary["psf_fwhm"], float),
                                np.asarray(summary["psf_fwhm_err"], float))
    if visit_fwhm is None:
        return
    for row in summary:
        scale = psf_flux_scale(row["psf_fwhm"] / PIXEL_SCALE, visit_fwhm / PIXEL_SCALE) \
            if not np.isfinite(row["ap_radius"]) else 1.0
        row["psf_fwhm"], row["psf_flux_scale"] = visit_fwhm, scale
        row["zero_point"] += 2.5 * np.log10(scale)


def consolidate_visit(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """Visit summary (one row per detector) and the visit's star table, its fluxes moved by the
    visit's PSF (runs on a worker)."""
    rows = []
    for uri in quantum.inputs["preliminary_visit_image"]:
        with reading(uri), storage.open(uri, "rb") as f:
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
    tables = {}
    for uri in quantum.inputs.get("single_visit_star_unstandardized", []):
        t = read_table(storage, uri)
        tables[t.meta["detector"]] = t
    if tables and all("psf_size" in t.colnames for t in tables.values()):
        correct_fluxes(tables, Camera(**config["camera"]),
                       dict(zip(summary["detector"].tolist(), summary["psf_size_response"].tolist(),
                                strict=True)))
    for d, t in tables.items():
        for column in ("psf_flux", "psf_flux_err"):
            t[column] *= flux_scale[d]
        t["visit"] = np.full(len(t), t.meta["visit"], dtype=np.int64)
        t["detector"] = np.full(len(t), t.meta["detector"], dtype=np.int32)
        t["band"] = t.meta["band"]
    stars = vstack(list(tables.values()), metadata_conflicts="silent") if tables else Table()
    stars.meta = {"visit": quantum.data_id["visit"]}
    out.write("single_visit_star", table_bytes(stars))
