"""Per-tract survey property maps (Rubin's healSparsePropertyMaps), as HealSparse maps.

Each input visit-detector contributes its footprint (the polygon of its corners through its
fitted WCS) to HEALPix pixels (nside 32768, 6.4", nest) whose centres lie inside the tract:
the number of exposures and the exposure time (sums), and the PSF size and 5-sigma point-source
depth of the coadd (weighted with the coadd's weights, 1 / sky variance in nJy^2):
maglim = 31.4 - 2.5 log10(5 sqrt(<A_psf>_w / sum w)).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import healsparse as hsp
import hpgeom
import numpy as np
from astropy.wcs import WCS

from drp_flows.datamodel import PROPERTY_MAPS
from drp_flows.engine.quanta import read_input, reading
from drp_flows.tasks.coadd import NJY_MAG0, njy_scale
from drp_flows.tasks.psf import moffat_stamps

NSIDE = 32768
NSIDE_COVERAGE = 32

@dataclass
class CcdInput:
    """What a property map needs of one visit-detector."""

    wcs: WCS
    shape: tuple[int, int]
    exposure_time: float
    psf_fwhm: float          # arcsec
    zero_point: float        # final, mag of 1 e-
    sky_noise: float         # e- per pixel


def ccd_pixels(ccd: CcdInput) -> np.ndarray:
    """HEALPix pixels (nest) whose centres fall in a CCD's footprint."""
    ny, nx = ccd.shape
    ra, dec = ccd.wcs.all_pix2world([-0.5, nx - 0.5, nx - 0.5, -0.5], [-0.5, -0.5, ny - 0.5, ny - 0.5], 0)
    return hsp.Polygon(ra=ra, dec=dec, value=1).get_pixels(nside=NSIDE)


def psf_area(fwhm_arcsec: float, pixel_scale: float = 0.2) -> float:
    """Noise-equivalent area (pixels) of the Moffat PSF: 1 / sum(P^2)."""
    fwhm_px = fwhm_arcsec / pixel_scale
    p = moffat_stamps(np.zeros(1), np.zeros(1), fwhm_px, int(np.ceil(4 * fwhm_px)))[3][0]
    return float(1.0 / (p ** 2).sum())


def property_maps(ccds: list[CcdInput], in_tract) -> dict[str, hsp.HealSparseMap]:
    """The maps of one (tract, band); `in_tract(ra, dec)` says which pixel centres to keep."""
    pix, count, exptime, w, w_fwhm, w_area = [], [], [], [], [], []
    for ccd in ccds:
        p = ccd_pixels(ccd)
        weight = 1.0 / (ccd.sky_noise * njy_scale(ccd.zero_point)) ** 2
        pix.append(p)
        for column, value in ((count, 1.0), (exptime, ccd.exposure_time), (w, weight),
                              (w_fwhm, weight * ccd.psf_fwhm), (w_area, weight * psf_area(ccd.psf_fwhm))):
            column.append(np.full(p.size, value))
    maps = {name: hsp.HealSparseMap.make_empty(NSIDE_COVERAGE, NSIDE, np.float64) for name in PROPERTY_MAPS}
    if not pix:
        return maps
    pixels, index = np.unique(np.concatenate(pix), return_inverse=True)
    sums = {name: np.bincount(index, np.concatenate(col)) for name, col in
            (("count", count), ("exptime", exptime), ("w", w), ("w_fwhm", w_fwhm), ("w_area", w_area))}
    ra, dec = hpgeom.pixel_to_angle(NSIDE, pixels, nest=True)
    keep = in_tract(ra, dec)
    values = {"n_exposure_map_sum": sums["count"], "exposure_time_map_sum": sums["exptime"],
              "psf_size_map_weighted_mean": sums["w_fwhm"] / sums["w"],
              "psf_maglim_map_weighted_mean":
                  NJY_MAG0 - 2.5 * np.log10(5 * np.sqrt(sums["w_area"] / sums["w"] / sums["w"]))}
    for name, v in values.items():
        maps[name].update_values_pix(pixels[keep], v[keep])
    return maps


def map_bytes(m: hsp.HealSparseMap) -> bytes:
    """A map as the bytes of its FITS file (what the Butler's HealSparse formatter reads)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "map.hsp"
        m.write(str(path), format="fits")
        return path.read_bytes()


def read_map(storage, uri: str) -> hsp.HealSparseMap:
    """A map from site storage (HealSparse reads from a local path only)."""
    data = read_input(storage, uri)
    with reading(uri), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "map.hsp"
        path.write_bytes(data)
        return hsp.HealSparseMap.read(str(path))
