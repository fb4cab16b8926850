"""Instrument signature removal: inverts the simulator's readout chain amp by amp.

overscan (row median, first 2 columns skipped) -> gain -> assemble to CCD orientation ->
bias -> dark -> flat, with a variance plane (Poisson + read noise, in electrons) and mask
planes for saturated and bad (hot, dead) pixels. Memory-bound numpy: a few passes over the CCD.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from drp_flows.tasks.camera import SATURATION_ADU, Camera
from drp_flows.tasks.images import Exposure, bit
from drp_flows.tasks.skymap import header_wcs

OVERSCAN_SKIP = 2    # columns next to the data section carry deferred charge
HOT_DARK = 1.0       # e-/s above which a pixel is BAD
LOW_FLAT = 0.5


def assemble(raw: fits.HDUList, camera: Camera, detector: int) -> tuple[np.ndarray, np.ndarray]:
    """Overscan-subtracted, gain-corrected CCD image (e-) and its saturation map."""
    n = camera.ccd_size
    image = np.empty((n, n), np.float32)
    saturated = np.zeros((n, n), bool)
    gains = camera.gain(detector)
    if len(raw) != len(camera.amps) + 1:
        raise ValueError(f"raw has {len(raw) - 1} amplifier HDUs, expected {len(camera.amps)}")
    for amp in camera.amps:
        data = raw[amp.index + 1].data
        if data is None or data.shape != amp.raw_shape:
            raise ValueError(f"amplifier {amp.index}: shape "
                             f"{None if data is None else data.shape}, expected {amp.raw_shape}")
        rows, cols = amp.serial_overscan_slice
        overscan = np.median(data[rows, cols.start + OVERSCAN_SKIP:cols.stop], axis=1)
        sci = data[amp.data_slice]
        block = (sci.astype(np.float32) - overscan[:, None].astype(np.float32)) * gains[amp.index]
        image[amp.ccd_slice] = amp.to_ccd(block)
        saturated[amp.ccd_slice] = amp.to_ccd(sci >= SATURATION_ADU)
    return image, saturated


def read_noise_map(camera: Camera, detector: int) -> np.ndarray:
    out = np.empty((camera.ccd_size,) * 2, np.float32)
    for amp, rn in zip(camera.amps, camera.read_noise(detector), strict=True):
        out[amp.ccd_slice] = rn
    return out


def run_isr(raw: fits.HDUList, camera: Camera, detector: int, bias: np.ndarray,
            dark: np.ndarray, flat: np.ndarray) -> Exposure:
    """A post-ISR exposure in electrons from one raw CCD and its master calibrations."""
    image, saturated = assemble(raw, camera, detector)
    darktime = float(raw[0].header.get("DARKTIME", raw[0].header["EXPTIME"]))
    image -= bias
    image -= dark * darktime
    variance = np.maximum(image, 0) + read_noise_map(camera, detector) ** 2
    good_flat = flat > LOW_FLAT
    safe_flat = np.where(good_flat, flat, 1.0)
    image /= safe_flat
    variance /= safe_flat ** 2
    mask = np.where(saturated, bit("SAT"), 0) | np.where(
        (dark > HOT_DARK) | ~good_flat, bit("BAD"), 0)
    return Exposure(image=image, variance=variance.astype(np.float32),
                    mask=mask.astype(np.int32), wcs=header_wcs(raw[0].header),
                    metadata=raw[0].header.copy())
