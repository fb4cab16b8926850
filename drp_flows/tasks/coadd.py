"""Step 3: warp calibrated visit images onto a patch and coadd them (makeWarp + assembleCoadd).

Each CCD is put on the patch's pixel grid through a coarse mapping grid (afw's interpLength
trick: the WCS pair is evaluated every 32 pixels and interpolated by splines) and a cubic
spline resampling of its pixels (`scipy.ndimage.map_coordinates`), in nJy using its final
zeropoint. The coadd is the inverse-variance weighted mean, one weight per CCD (1 / median
variance, as Rubin does), and its variance is sum(w^2 V) / sum(w)^2, so the coadd variance
and the property maps share the same weights. The coadd keeps its input CCDs (afw's
CoaddInputs: weight, PSF FWHM and the CCD's outline on the patch), from which `coadd_psf` gives
the PSF at any position as Rubin's CoaddPsf does: the weighted mix of the PSFs of the inputs
that cover it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.interpolate import RectBivariateSpline
from scipy.ndimage import map_coordinates

from drp_flows.tasks.images import Exposure, bit
from drp_flows.tasks.psf import PsfMixture

NJY_MAG0 = 31.4             # AB magnitude of 1 nJy
MAPPING_GRID = 32           # pixels between exact WCS evaluations
REJECT = bit("BAD") | bit("SAT") | bit("NO_DATA") | bit("EDGE")


def njy_scale(zero_point: float) -> float:
    """Factor from e- (zero_point = AB mag of 1 e-) to nJy."""
    return 10 ** (0.4 * (NJY_MAG0 - zero_point))


@dataclass
class Warp:
    """A CCD on the output grid: the box it covers and its values there."""

    y: slice
    x: slice
    image: np.ndarray
    variance: np.ndarray
    valid: np.ndarray
    corners: np.ndarray     # (x, y) of the CCD's four corners on the output grid, in order


def _axis_points(lo: int, hi: int) -> np.ndarray:
    return np.unique(np.r_[np.arange(lo, hi, MAPPING_GRID), hi - 1])


def warp(exp: Exposure, scale: float, out_wcs: WCS, shape: tuple[int, int]) -> Warp | None:
    """Resample one calibrated CCD (scaled by `scale`) onto the output grid; None if it misses."""
    ny, nx = exp.image.shape
    cx, cy = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5]), np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    ox, oy = out_wcs.all_world2pix(*exp.wcs.all_pix2world(cx, cy, 0), 0)
    x0, x1 = max(0, int(np.floor(ox.min()))), min(shape[1], int(np.ceil(ox.max())) + 1)
    y0, y1 = max(0, int(np.floor(oy.min()))), min(shape[0], int(np.ceil(oy.max())) + 1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    gx, gy = _axis_points(x0, x1), _axis_points(y0, y1)
    grid_x, grid_y = np.meshgrid(gx, gy)
    ix, iy = exp.wcs.all_world2pix(*out_wcs.all_pix2world(grid_x, grid_y, 0), 0)
    degrees = {"kx": min(3, len(gy) - 1), "ky": min(3, len(gx) - 1)}   # (rows, columns)
    xs, ys = np.arange(x0, x1), np.arange(y0, y1)
    px = RectBivariateSpline(gy, gx, ix, **degrees)(ys, xs)
    py = RectBivariateSpline(gy, gx, iy, **degrees)(ys, xs)
    inside = (px >= 0) & (px <= nx - 1) & (py >= 0) & (py <= ny - 1)
    nearest = exp.mask[np.clip(np.round(py).astype(int), 0, ny - 1),
                       np.clip(np.round(px).astype(int), 0, nx - 1)]
    valid = inside & ((nearest & REJECT) == 0)
    if not valid.any():
        return None
    image = map_coordinates(exp.image.astype(float), [py, px], order=3, mode="nearest") * scale
    variance = map_coordinates(exp.variance.astype(float), [py, px], order=1, mode="nearest") * scale ** 2
    return Warp(slice(y0, y1), slice(x0, x1), image, variance, valid, np.column_stack([ox, oy]))


class CoaddAccumulator:
    """Running sums of an inverse-variance weighted coadd on one patch grid."""

    def __init__(self, shape: tuple[int, int]):
        self.sum_wi = np.zeros(shape)
        self.sum_w = np.zeros(shape)
        self.sum_w2v = np.zeros(shape)
        self.n_input = np.zeros(shape, np.int32)
        self.inputs: list[dict] = []

    def add(self, w: Warp, info: dict) -> None:
        weight = 1.0 / float(np.median(w.variance[w.valid]))
        v = w.valid
        box = (w.y, w.x)
        self.sum_wi[box][v] += weight * w.image[v]
        self.sum_w[box][v] += weight
        self.sum_w2v[box][v] += weight ** 2 * w.variance[v]
        self.n_input[box][v] += 1
        self.inputs.append(info | {"weight": weight, "corner_x": w.corners[:, 0],
                                   "corner_y": w.corners[:, 1]})

    def coadd(self, wcs: WCS, metadata: fits.Header) -> Exposure:
        covered = self.sum_w > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            image = np.where(covered, self.sum_wi / self.sum_w, 0.0)
            variance = np.where(covered, self.sum_w2v / self.sum_w ** 2, np.inf)
        mask = np.where(covered, 0, bit("NO_DATA")).astype(np.int32)
        meta = metadata.copy()
        meta["NINPUTS"] = (len(self.inputs), "visit-detector images in the coadd")
        meta["BUNIT"] = "nJy"
        return Exposure(image=image, variance=variance, mask=mask, wcs=wcs, metadata=meta,
                        coadd_inputs=Table(rows=self.inputs) if self.inputs else None)


def coadd_psf(inputs: Table, x: np.ndarray, y: np.ndarray) -> PsfMixture:
    """The coadd's PSF at positions (x, y): per position, the coadd weights of the input CCDs
    whose outline holds it, over those inputs' Moffat FWHMs (`psf_fwhm`, pixels). A position
    no outline holds (the coadd's outermost half pixel) gets the mean of all inputs."""
    cx, cy = np.asarray(inputs["corner_x"], float), np.asarray(inputs["corner_y"], float)
    ex, ey = np.roll(cx, -1, axis=1) - cx, np.roll(cy, -1, axis=1) - cy     # edges [input, 4]
    cross = (ex[None] * (np.asarray(y)[:, None, None] - cy[None])
             - ey[None] * (np.asarray(x)[:, None, None] - cx[None]))        # [position, input, 4]
    inside = (cross >= 0).all(axis=2) | (cross <= 0).all(axis=2)
    weights = inside * np.asarray(inputs["weight"], float)[None, :]
    weights[weights.sum(axis=1) == 0] = np.asarray(inputs["weight"], float)
    return PsfMixture(np.asarray(inputs["psf_fwhm"], float), weights / weights.sum(axis=1, keepdims=True))
