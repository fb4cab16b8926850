"""Instrument signature removal: inverts the simulator's readout chain amp by amp.

overscan (row median, first 2 columns skipped) -> gain -> assemble to CCD orientation ->
bias -> dark -> flat, with a variance plane (Poisson + read noise, in electrons) and mask
planes for saturated and bad (hot, dead) pixels. Memory-bound numpy: a few passes over the CCD.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from drp_flows.errors import DataError
from drp_flows.tasks.camera import SATURATION_ADU, Camera
from drp_flows.tasks.images import Exposure, bit
from drp_flows.tasks.skymap import header_wcs

OVERSCAN_SKIP = 2    # columns next to the data section carry deferred charge
HOT_DARK = 1.0       # e-/s above which a pixel is BAD
LOW_FLAT = 0.5


# what ISR and calibration read from a raw's primary header
EXPOSURE_KEYS = ("BAND", "EXPTIME", "MJD-OBS")
WCS_KEYS = ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2")


def check_science_header(header: fits.Header) -> None:
    """A science raw's primary header must have its exposure and WCS keywords: a lack named
    as such (not found later as 'too few reference matches')."""
    for kind, keys in (("exposure", EXPOSURE_KEYS), ("WCS", WCS_KEYS)):
        missing = [k for k in keys if k not in header]
        if missing:
            raise DataError(f"raw lacks its {kind} keywords {', '.join(missing)}")


def check_raw(raw: fits.HDUList, camera: Camera) -> None:
    """A raw must have one HDU per amplifier with the camera's amp geometry, and finite
    pixels (a raw of NaN was found later as '0 unblended stars')."""
    if len(raw) != len(camera.amps) + 1:
        raise DataError(f"{len(raw) - 1} amplifier HDUs, expected {len(camera.amps)}")
    for amp in camera.amps:
        data = raw[amp.index + 1].data
        if data is None or data.shape != amp.raw_shape:
            raise DataError(f"amplifier {amp.index}: shape "
                            f"{None if data is None else data.shape}, expected {amp.raw_shape}")
        if data.dtype.kind == "f":
            bad = data.size - np.count_nonzero(np.isfinite(data))
            if bad:
                raise DataError(f"amplifier {amp.index}: {bad} of {data.size} pixels are "
                                "not finite (NaN or inf)")


def assemble(raw: fits.HDUList, camera: Camera, detector: int) -> tuple[np.ndarray, np.ndarray]:
    """Overscan-subtracted, gain-corrected CCD image (e-) and its saturation map.

    Each amplifier is written straight into the assembled image through flipped views, so
    the only full-size passes are the subtraction, the gain and the saturation test.
    """
    n = camera.ccd_size
    image = np.empty((n, n), np.float32)
    saturated = np.empty((n, n), bool)
    gains = camera.gain(detector)
    check_raw(raw, camera)
    for amp in camera.amps:
        data = raw[amp.index + 1].data
        rows, cols = amp.serial_overscan_slice
        overscan = np.median(data[rows, cols.start + OVERSCAN_SKIP:cols.stop], axis=1)
        sci = amp.to_ccd(data[amp.data_slice])                  # a view in CCD orientation
        overscan = (overscan[::-1] if amp.flip_y else overscan).astype(np.float32)
        out = image[amp.ccd_slice]
        np.subtract(sci, overscan[:, None], out=out, casting="unsafe")
        out *= np.float32(gains[amp.index])
        np.greater_equal(sci, SATURATION_ADU, out=saturated[amp.ccd_slice])
    return image, saturated


def run_isr(raw: fits.HDUList, camera: Camera, detector: int, bias: np.ndarray,
            dark: np.ndarray, flat: np.ndarray) -> Exposure:
    """A post-ISR exposure in electrons from one raw CCD and its master calibrations."""
    image, saturated = assemble(raw, camera, detector)
    darktime = float(raw[0].header.get("DARKTIME", raw[0].header["EXPTIME"]))
    image -= bias
    image -= np.float32(darktime) * dark
    variance = np.maximum(image, 0)                            # Poisson, in e-
    for amp, rn in zip(camera.amps, camera.read_noise(detector), strict=True):
        variance[amp.ccd_slice] += np.float32(rn * rn)
    bad = (dark > HOT_DARK) | (flat <= LOW_FLAT)
    safe_flat = np.where(bad, np.float32(1), flat) if bad.any() else flat
    image /= safe_flat
    variance /= safe_flat
    variance /= safe_flat
    mask = saturated.astype(np.int32) * bit("SAT")
    mask[bad] |= bit("BAD")
    return Exposure(image=image, variance=variance, mask=mask, wcs=header_wcs(raw[0].header),
                    metadata=raw[0].header.copy())
