"""Step 3: warp calibrated visit images onto a patch and coadd them (makeWarp + assembleCoadd).

Each CCD is put on the patch's pixel grid through a coarse mapping grid (afw's interpLength
trick: the WCS pair is evaluated every 32 pixels and interpolated by splines) and a cubic
spline resampling of its pixels (`scipy.ndimage.map_coordinates`), in nJy using its final
zeropoint. The coadd is the inverse-variance weighted mean, one weight per CCD (1 / median
variance, as Rubin does), and its variance is sum(w^2 V) / sum(w)^2, so the coadd variance
and the property maps share the same weights. The coadd keeps its input CCDs (afw's
CoaddInputs: weight, PSF FWHM, the CCD's outline on the patch and, for visit images with an
empirical PSF, that model and its aperture correction), from which `coadd_psf` gives the PSF
at any position as Rubin's CoaddPsf does: the weighted mix of the PSFs of the inputs that
cover it.
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
from drp_flows.tasks.psf import moffat_stamps
from drp_flows.tasks.psf_model import PixelPsf, fit_to_half, shift_stamps

NJY_MAG0 = 31.4             # AB magnitude of 1 nJy
MAPPING_GRID = 32           # pixels between exact WCS evaluations
PSF_TERMS = 6               # polynomial terms of a degree-2 PixelPsf: input models are kept padded to it
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
                        coadd_inputs=input_table(self.inputs) if self.inputs else None)


def input_table(inputs: list[dict]) -> Table:
    """The CoaddInputs table. An input's empirical PSF (`psf`, a PixelPsf) becomes columns:
    its coefficient images padded to PSF_TERMS terms and the largest stamp of the coadd,
    degree and CCD size; every input has one or none does."""
    models = [info.pop("psf", None) for info in inputs]
    table = Table(rows=inputs)
    if all(m is None for m in models):
        return table
    if any(m is None for m in models):
        raise ValueError("a coadd mixes inputs with and without an empirical PSF model")
    half = max(m.half for m in models)
    coeffs = np.zeros((len(models), PSF_TERMS, 2 * half + 1, 2 * half + 1), np.float32)
    for k, m in enumerate(models):
        pad = half - m.half
        coeffs[k, :len(m.coeffs), pad:pad + 2 * m.half + 1, pad:pad + 2 * m.half + 1] = m.coeffs
    table["psf_coeffs"] = coeffs
    table["psf_degree"] = [m.degree for m in models]
    table["psf_ccd_size"] = [m.ccd_size for m in models]
    return table


@dataclass
class CoaddPsf:
    """The coadd's PSF at given positions (Rubin's CoaddPsf): per position, the coadd weights
    of the input CCDs whose outline holds it, over those inputs' PSFs, each with the flux it
    has on the calibrated coadd. An input's PSF is its Moffat (`fwhm_px`; total flux 1, as
    its total-flux zeropoint makes it) or its empirical model evaluated where the position
    falls on the CCD (`models`; flux 1/APCORR: its zeropoint is on the aperture's scale, so
    on the coadd a star's 3" aperture, not its model stamp, holds its total flux). The
    models are taken on the coadd's grid unrotated: the visits' +-2 deg rotations change a
    PSF's ellipticity by ~0.002, a flux by far less."""

    weights: np.ndarray                     # [position, input], rows summing to 1
    fwhm_px: np.ndarray                     # [input]
    models: list[PixelPsf] | None = None    # [input] empirical models, or None: the Moffats
    norms: np.ndarray | None = None         # [input] each model's flux on the coadd
    ccd_x: np.ndarray | None = None         # [position, input] the position on the input CCD
    ccd_y: np.ndarray | None = None

    @property
    def size_px(self) -> float:
        """The mean FWHM over positions, for stamp sizes."""
        return float(np.mean(self.weights @ self.fwhm_px))

    def stamps(self, x: np.ndarray, y: np.ndarray, half: int):
        """As psf.moffat_stamps (unit_sum=False) for the positions the weights were made for."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        if self.models is None:
            fwhms, which = np.unique(self.fwhm_px, return_inverse=True)
            weights = np.zeros((len(x), len(fwhms)))
            np.add.at(weights.T, which, self.weights.T)
            prof = 0.0
            for k, fwhm in enumerate(fwhms):
                ix, iy, offs, p = moffat_stamps(x, y, fwhm, half, unit_sum=False)
                prof = prof + weights[:, k, None, None] * p
            return ix, iy, offs, prof
        side = max(m.coeffs.shape[1] for m in self.models)
        mix = np.zeros((len(x), side, side))
        for i in np.flatnonzero(self.weights.any(axis=0)):
            on = self.weights[:, i] > 0
            model = self.models[i]
            centred = fit_to_half(model.centred(self.ccd_x[on, i], self.ccd_y[on, i]), side // 2)
            mix[on] += (self.weights[on, i] * self.norms[i])[:, None, None] * centred
        ix, iy = np.round(x).astype(int), np.round(y).astype(int)
        prof = fit_to_half(shift_stamps(mix, x - ix, y - iy), half)
        return ix, iy, np.arange(-half, half + 1), prof


def n_terms(degree: int) -> int:
    """Polynomial terms of a PixelPsf of `degree` (1, 3, 6)."""
    return (degree + 1) * (degree + 2) // 2


def to_ccd(corner_x: np.ndarray, corner_y: np.ndarray, ccd_size: int, x: np.ndarray,
           y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions on the coadd grid mapped onto an input CCD by the affine transform its four
    corners give (the distortion over a CCD moves a PSF model's position by a few pixels)."""
    edge = np.array([-0.5, ccd_size - 0.5, ccd_size - 0.5, -0.5])
    a = np.column_stack([corner_x, corner_y, np.ones(4)])
    coef, *_ = np.linalg.lstsq(a, np.column_stack([edge, np.roll(edge, 1)]), rcond=None)
    xy = np.column_stack([x, y, np.ones(len(x))]) @ coef
    return xy[:, 0], xy[:, 1]


def coadd_psf(inputs: Table, x: np.ndarray, y: np.ndarray) -> CoaddPsf:
    """The coadd's PSF at positions (x, y) from its CoaddInputs table (`CoaddPsf`). A position
    no outline holds (the coadd's outermost half pixel) gets the mean of all inputs."""
    cx, cy = np.asarray(inputs["corner_x"], float), np.asarray(inputs["corner_y"], float)
    ex, ey = np.roll(cx, -1, axis=1) - cx, np.roll(cy, -1, axis=1) - cy     # edges [input, 4]
    cross = (ex[None] * (np.asarray(y)[:, None, None] - cy[None])
             - ey[None] * (np.asarray(x)[:, None, None] - cx[None]))        # [position, input, 4]
    inside = (cross >= 0).all(axis=2) | (cross <= 0).all(axis=2)
    weights = inside * np.asarray(inputs["weight"], float)[None, :]
    weights[weights.sum(axis=1) == 0] = np.asarray(inputs["weight"], float)
    psf = CoaddPsf(weights / weights.sum(axis=1, keepdims=True), np.asarray(inputs["psf_fwhm"], float))
    if "psf_coeffs" in inputs.colnames:
        psf.models = [PixelPsf(np.asarray(r["psf_coeffs"][:n_terms(int(r["psf_degree"]))], float),
                               int(r["psf_degree"]), int(r["psf_ccd_size"]), float(r["psf_fwhm"]))
                      for r in inputs]
        psf.norms = np.asarray(inputs["psf_norm"], float)
        mapped = [to_ccd(r["corner_x"], r["corner_y"], m.ccd_size, x, y)
                  for r, m in zip(inputs, psf.models, strict=True)]
        psf.ccd_x = np.column_stack([m[0] for m in mapped])
        psf.ccd_y = np.column_stack([m[1] for m in mapped])
    return psf
