"""The mini-ComCam camera model shared by the simulator and ISR.

One raft of 3x3 ITL-like CCDs, each read out through 16 amplifiers (2 rows x 8 columns), with
ComCam's amplifier structure (prescan, serial and parallel overscan) scaled to the CCD size,
except the serial overscan, which keeps its 64 columns: ISR takes a median per row, and fewer
columns leave row-correlated noise that the variance plane cannot describe (with 6 columns
it raised the PSF-scale noise of u-band difference images 2-4x).
Per-amplifier gains and read noise are fixed by the camera seed, as a photon-transfer-curve
calibration would provide them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

INSTRUMENT = "ComCamSim"
BANDS = ("u", "g", "r", "i", "z", "y")
PHYSICAL_FILTERS = {"u": "u_02", "g": "g_01", "r": "r_03", "i": "i_06", "z": "z_03", "y": "y_04"}
PIXEL_SCALE = 0.2  # arcsec / pixel
N_AMP_X, N_AMP_Y = 8, 2
PRESCAN = 3
SERIAL_OVERSCAN = 64
SATURATION_ADU = 2**18 - 1
DETECTOR_NAMES = tuple(f"R22_S{i}{j}" for i in range(3) for j in range(3))


@dataclass(frozen=True)
class AmpGeometry:
    """Where one amplifier's pixels sit in the raw amp frame and in the assembled CCD."""

    index: int
    data_width: int
    data_height: int
    serial_overscan: int
    parallel_overscan: int
    x0: int  # assembled-CCD origin of this amp's data section
    y0: int
    flip_x: bool
    flip_y: bool

    @property
    def raw_shape(self) -> tuple[int, int]:
        return (self.data_height + self.parallel_overscan,
                PRESCAN + self.data_width + self.serial_overscan)

    @property
    def data_slice(self) -> tuple[slice, slice]:
        return slice(0, self.data_height), slice(PRESCAN, PRESCAN + self.data_width)

    @property
    def serial_overscan_slice(self) -> tuple[slice, slice]:
        start = PRESCAN + self.data_width
        return slice(0, self.data_height), slice(start, start + self.serial_overscan)

    @property
    def ccd_slice(self) -> tuple[slice, slice]:
        return (slice(self.y0, self.y0 + self.data_height),
                slice(self.x0, self.x0 + self.data_width))

    def to_readout(self, ccd_block: np.ndarray) -> np.ndarray:
        """Orient an assembled-CCD block as the amplifier reads it out."""
        block = ccd_block[:, ::-1] if self.flip_x else ccd_block
        return block[::-1, :] if self.flip_y else block

    def to_ccd(self, readout_block: np.ndarray) -> np.ndarray:
        """Inverse of to_readout (the flips are involutions)."""
        return self.to_readout(readout_block)


@dataclass(frozen=True)
class Camera:
    """A 3x3 raft of square CCDs of `ccd_size` pixels (ComCam is 4072x4000; square here)."""

    ccd_size: int = 512
    seed: int = 2026
    gap_pixels: int = 10

    def __post_init__(self):
        if self.ccd_size % 16 or not 64 <= self.ccd_size <= 8192:
            raise ValueError(f"ccd_size={self.ccd_size}: must be a multiple of 16 in [64, 8192]")

    @property
    def detectors(self) -> range:
        return range(len(DETECTOR_NAMES))

    @cached_property
    def amps(self) -> tuple[AmpGeometry, ...]:
        w, h = self.ccd_size // N_AMP_X, self.ccd_size // N_AMP_Y
        serial = SERIAL_OVERSCAN
        parallel = max(4, round(48 * h / 2000))
        amps = []
        for iy in range(N_AMP_Y):
            for ix in range(N_AMP_X):
                amps.append(AmpGeometry(
                    index=iy * N_AMP_X + ix, data_width=w, data_height=h,
                    serial_overscan=serial, parallel_overscan=parallel,
                    x0=ix * w, y0=iy * h, flip_x=bool(ix % 2), flip_y=bool(iy)))
        return tuple(amps)

    @cached_property
    def _amp_params(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        shape = (len(DETECTOR_NAMES), N_AMP_X * N_AMP_Y)
        return {
            "gain": np.clip(rng.normal(1.38, 0.06, shape), 1.17, 1.45),       # e-/ADU
            "read_noise": np.clip(rng.normal(7.9, 1.2, shape), 5.0, 11.0),     # e-
            "bias": rng.uniform(1000.0, 25000.0, shape),                        # ADU
        }

    def gain(self, detector: int) -> np.ndarray:
        return self._amp_params["gain"][detector]

    def read_noise(self, detector: int) -> np.ndarray:
        return self._amp_params["read_noise"][detector]

    def bias_level(self, detector: int) -> np.ndarray:
        return self._amp_params["bias"][detector]

    def detector_offset(self, detector: int) -> tuple[float, float]:
        """Detector centre in focal-plane pixels from the raft centre (x, y)."""
        i, j = divmod(detector, 3)
        pitch = self.ccd_size + self.gap_pixels
        return ((j - 1) * pitch, (i - 1) * pitch)

    @property
    def field_radius_pixels(self) -> float:
        """Distance from the raft centre to its corner: where vignetting is largest."""
        return np.hypot(1.5 * self.ccd_size + self.gap_pixels, 1.5 * self.ccd_size + self.gap_pixels)

    def vignetting(self, detector: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Relative throughput: < 0.2% loss in the centre, 7.6% at the raft corner (SCIENCE.md)."""
        dx, dy = self.detector_offset(detector)
        r = np.hypot(x - (self.ccd_size - 1) / 2 + dx, y - (self.ccd_size - 1) / 2 + dy)
        return 1.0 - 0.076 * (r / self.field_radius_pixels) ** 4


def focal_plane(camera: Camera, detector: int, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Focal-plane position of CCD pixels in units of the raft's half-width (-1..1)."""
    dx, dy = camera.detector_offset(detector)
    half = 1.5 * camera.ccd_size + camera.gap_pixels
    centre = (camera.ccd_size - 1) / 2
    return (np.asarray(x) - centre + dx) / half, (np.asarray(y) - centre + dy) / half
