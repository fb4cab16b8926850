"""Calibrated images as FITS: IMAGE, MASK and VARIANCE HDUs with a WCS, like afw's Exposure."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from drp_flows.engine.quanta import read_input, reading
from drp_flows.tasks.psf_model import PixelPsf

# Rubin's standard mask planes (afw), as bit numbers
MASK_PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5,
               "DETECTED_NEGATIVE": 6, "SUSPECT": 7, "NO_DATA": 8}


def bit(name: str) -> int:
    return 1 << MASK_PLANES[name]


@dataclass
class Exposure:
    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: WCS | None = None
    metadata: fits.Header = field(default_factory=fits.Header)
    coadd_inputs: Table | None = None   # a coadd's input CCDs (afw's CoaddInputs): its PSF
    psf: PixelPsf | None = None         # a visit image's empirical PSF model

    def to_hdulist(self) -> fits.HDUList:
        primary = fits.PrimaryHDU(header=self.metadata.copy())
        wcs_header = self.wcs.to_header(relax=True) if self.wcs is not None else fits.Header()
        mask_header = fits.Header()
        for name, b in MASK_PLANES.items():
            mask_header[f"HIERARCH MP_{name}"] = b   # afw's mask-plane keywords
        hdus = fits.HDUList([
            primary,
            fits.ImageHDU(self.image.astype(np.float32), header=wcs_header, name="IMAGE"),
            fits.ImageHDU(self.mask.astype(np.int32), header=mask_header, name="MASK"),
            fits.ImageHDU(self.variance.astype(np.float32), header=wcs_header, name="VARIANCE"),
        ])
        if self.coadd_inputs is not None:
            hdus.append(fits.table_to_hdu(self.coadd_inputs))
            hdus[-1].name = "COADD_INPUTS"
        if self.psf is not None:
            hdus.append(self.psf.to_hdu())
        return hdus

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.to_hdulist().writeto(buf)
        return buf.getvalue()

    @classmethod
    def from_hdulist(cls, hdul: fits.HDUList) -> Exposure:
        from drp_flows.tasks.skymap import header_wcs

        def native(a):  # FITS is big-endian; sep and numpy kernels want native order
            return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
        inputs = Table.read(hdul["COADD_INPUTS"]) if "COADD_INPUTS" in hdul else None
        psf = PixelPsf.from_hdu(hdul["PSF"]) if "PSF" in hdul else None
        return cls(image=native(hdul["IMAGE"].data), variance=native(hdul["VARIANCE"].data),
                   mask=native(hdul["MASK"].data), wcs=header_wcs(hdul["IMAGE"].header),
                   metadata=hdul[0].header.copy(), coadd_inputs=inputs, psf=psf)


def single_image_bytes(data: np.ndarray, header: fits.Header | None = None) -> bytes:
    """A one-image FITS file (master calibs)."""
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(data.astype(np.float32), name="IMAGE")]
                 ).writeto(buf)
    return buf.getvalue()


def read_fits(storage, uri: str) -> fits.HDUList:
    """Read a whole FITS file from site storage into memory, every HDU's data parsed here (a
    truncated file fails as a corrupt input, not later in the science)."""
    data = read_input(storage, uri)
    with reading(uri):
        hdul = fits.HDUList.fromstring(data)
        for hdu in hdul:
            hdu.data  # noqa: B018 (astropy parses an HDU's data when it is first asked for)
        return hdul
