"""Step 4: image differencing, DIA source detection and forced difference photometry.

Alard & Lupton with ip_diffim's defaults (convolveTemplate): the template, warped to the CCD,
is convolved with a matching kernel built from 27 Gaussian-times-polynomial basis functions
(sigmas 0.7/1.5/3.0 px, degrees 4/2/2, 21 px), varying linearly over the CCD, plus a
second-order background, fitted on up to 300 star stamps; then one FFT convolution per spatial
term. Why not ZOGY: it needs the PSF of the template, a coadd of warped visits of different
seeing that we do not model, and PSF errors leave residuals at every bright star; A&L fits the
kernel on the stars themselves.

No decorrelation afterwards (Rubin's doDecorrelation): the convolved template's correlated noise
is carried through the kernel into the detection significance and the forced-flux errors
instead, which is exact for detection and photometry and keeps the difference image simple.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.stats import mad_std, sigma_clip
from astropy.table import Table
from scipy.ndimage import binary_dilation, maximum_filter
from scipy.signal import fftconvolve, oaconvolve
from scipy.spatial import cKDTree

from drp_flows.errors import DataError
from drp_flows.tasks.calibrate import centroids, detect, psf_kernel
from drp_flows.tasks.images import Exposure, bit
from drp_flows.tasks.psf import psf_flux

ALARD_SIGMAS = (0.7, 1.5, 3.0)     # px (alardSigGauss)
ALARD_DEGREES = (4, 2, 2)          # alardDegGauss: 15 + 6 + 6 = 27 basis kernels
KERNEL_SIZE = 21                   # 6x the largest sigma (18) clipped to kernelSizeMin
SPATIAL_KERNEL_ORDER = 1
SPATIAL_BG_ORDER = 2
KERNEL_STAR_SIGNIFICANCE = (10.0, 500.0)
MAX_KERNEL_STARS = 300
MIN_KERNEL_STARS = 3
MIN_SPATIAL_STARS = 20             # fewer: a constant kernel, the spatial terms would be noise
DETECTION_SIGMA = 5.0
MIN_TEMPLATE_COVERAGE = 0.05       # of the CCD's usable pixels
DIPOLE_FWHM = 1.5                  # lobes closer than this many FWHM make one dipole
RESIDUAL_FRACTION = 0.05           # |difference| below this fraction of the science flux: residual
UNUSABLE = bit("BAD") | bit("SAT") | bit("NO_DATA") | bit("EDGE")


class DiffimError(DataError):
    """No difference image can be made (no template pixels, too few kernel stars)."""


def poly_terms(x: np.ndarray, y: np.ndarray, order: int) -> list[np.ndarray]:
    """1, x, y, x^2, xy, y^2, ... up to `order` (x, y normalised to [-1, 1])."""
    return [x ** (total - j) * y ** j for total in range(order + 1) for j in range(total + 1)]


def alard_lupton_factors(size: int = KERNEL_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The basis kernels as outer products of a row (y) and a column (x) profile, [n, size]
    each, so that a stamp is convolved with one as two 1-D passes."""
    h = size // 2
    u = np.arange(-h, h + 1, dtype=float)
    rows, columns = [], []
    for sigma, degree in zip(ALARD_SIGMAS, ALARD_DEGREES, strict=True):
        g = np.exp(-u ** 2 / (2 * sigma ** 2))
        for i in range(degree + 1):
            for j in range(degree + 1 - i):
                r, c = g * u ** j, g * u ** i      # y to the power j, x to the power i
                scale = ((r ** 2).sum() * (c ** 2).sum()) ** 0.25   # the outer product's norm
                rows.append(r / scale)
                columns.append(c / scale)
    return np.array(rows), np.array(columns)


def alard_lupton_basis(size: int = KERNEL_SIZE) -> np.ndarray:
    """The basis kernels [n, size, size], each of unit L2 norm for a well-conditioned fit."""
    rows, columns = alard_lupton_factors(size)
    return np.einsum("ny,nx->nyx", rows, columns)


def convolve_basis(stamps: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Stamps [s, m, m] convolved with every separable basis kernel, 'valid' part: [s, n, p, p]
    with p = m - size + 1. Two 1-D passes: a tenth of the 2-D FFTs' cost."""
    windows = np.lib.stride_tricks.sliding_window_view(stamps, rows.shape[1], axis=2)
    along_x = np.tensordot(windows, columns[:, ::-1], axes=([3], [1])).transpose(0, 3, 1, 2)
    windows = np.lib.stride_tricks.sliding_window_view(along_x, rows.shape[1], axis=2)
    return np.einsum("snyxa,na->snyx", windows, rows[:, ::-1])


@dataclass
class MatchingKernel:
    """K(x, y) = sum_p T_p(x, y) spatial[p], plus a background polynomial, on one CCD."""

    spatial: np.ndarray          # [n_spatial_terms, k, k]
    background: np.ndarray       # coefficients of poly_terms(..., bg_order)
    order: int
    bg_order: int
    shape: tuple[int, int]
    n_stars: int
    chi2_dof: float              # median over the kept stamps

    def at(self, x: float, y: float) -> np.ndarray:
        terms = poly_terms(*normalised(self.shape, x, y), self.order)
        return sum(t * k for t, k in zip(terms, self.spatial, strict=True))

    @property
    def centre(self) -> np.ndarray:
        """The kernel at the CCD centre (for noise propagation, where its variation is small)."""
        return self.at((self.shape[1] - 1) / 2, (self.shape[0] - 1) / 2)

    def convolve(self, template: np.ndarray, pad: int) -> np.ndarray:
        """The template (on the science grid padded by `pad`) matched to the science image,
        background included, on the science grid: the padding gives the kernel the template
        light from beyond the CCD edge."""
        yy, xx = np.mgrid[0:self.shape[0], 0:self.shape[1]]
        xn, yn = normalised(self.shape, xx, yy)
        inner = (slice(pad, pad + self.shape[0]), slice(pad, pad + self.shape[1]))
        out = sum(t * oaconvolve(template, k, mode="same")[inner]
                  for t, k in zip(poly_terms(xn, yn, self.order), self.spatial, strict=True))
        return out + sum(c * t for c, t in zip(self.background, poly_terms(xn, yn, self.bg_order),
                                               strict=True))


def normalised(shape: tuple[int, int], x, y) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates mapped to [-1, 1] over an image, for the spatial polynomials."""
    ny, nx = shape
    return 2 * np.asarray(x, float) / (nx - 1) - 1, 2 * np.asarray(y, float) / (ny - 1) - 1


def _cutouts(image: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    offs = np.arange(-half, half + 1)
    return image[(iy[:, None] + offs)[:, :, None], (ix[:, None] + offs)[:, None, :]]


def fit_matching_kernel(science: np.ndarray, template: np.ndarray, variance: np.ndarray,
                        science_ok: np.ndarray, template_ok: np.ndarray, x: np.ndarray,
                        y: np.ndarray, stamp_half: int, pad: int) -> MatchingKernel:
    """Least-squares A&L kernel from star stamps, with iterative rejection of stamps that do
    not subtract (variables, movers, blends): per-stamp normal equations are kept, so each
    iteration is a re-sum and a solve. All arrays are on the science grid padded by `pad`;
    (x, y) are science pixels."""
    profiles = alard_lupton_factors()
    basis = np.einsum("ny,nx->nyx", *profiles)
    hk = basis.shape[1] // 2
    outer = stamp_half + hk
    ny, nx = science.shape
    shape = (ny - 2 * pad, nx - 2 * pad)
    ix, iy = np.round(x).astype(int) + pad, np.round(y).astype(int) + pad
    inside = (ix >= outer) & (ix < nx - outer) & (iy >= outer) & (iy < ny - outer)
    ix, iy = ix[inside], iy[inside]
    clean = (~_cutouts(~science_ok, ix, iy, stamp_half).any(axis=(1, 2))
             & ~_cutouts(~template_ok, ix, iy, outer).any(axis=(1, 2)))
    ix, iy = ix[clean][:MAX_KERNEL_STARS], iy[clean][:MAX_KERNEL_STARS]
    if len(ix) < MIN_KERNEL_STARS:
        raise DiffimError(f"only {len(ix)} clean kernel stars (need {MIN_KERNEL_STARS})")
    # few stars: a constant kernel and background, spatial terms would fit noise and
    # extrapolate wildly between the stamps
    order, bg_order = (SPATIAL_KERNEL_ORDER, SPATIAL_BG_ORDER) if len(ix) >= MIN_SPATIAL_STARS else (0, 0)
    spatial = np.array(poly_terms(*normalised(shape, ix - pad, iy - pad), order))  # [n_sp, s]
    offs = np.arange(-stamp_half, stamp_half + 1)
    pix_x, pix_y = normalised(shape, ix[:, None, None] + offs[None, None, :] - pad,
                              iy[:, None, None] + offs[None, :, None] - pad)
    n_sp, nb = len(spatial), len(basis)
    normal, vector, data2, npix = [], [], [], []
    for start in range(0, len(ix), 50):
        sl = slice(start, start + 50)
        conv = convolve_basis(_cutouts(template, ix[sl], iy[sl], outer), *profiles)
        s = conv.shape[0]
        conv = conv.reshape(s, nb, -1)                                  # [s, nb, pixels]
        bg = np.array(poly_terms(pix_x[sl], pix_y[sl], bg_order)).reshape(-1, s, conv.shape[2])
        bg = np.broadcast_to(bg, (len(poly_terms(0, 0, bg_order)), s, conv.shape[2]))
        bg = bg.transpose(1, 0, 2)                                      # [s, n_bg, pixels]
        sci = _cutouts(science, ix[sl], iy[sl], stamp_half).reshape(s, -1)
        w = 1.0 / _cutouts(variance, ix[sl], iy[sl], stamp_half).reshape(s, -1)
        # the design of a stamp is (spatial terms at its centre) x (convolved basis), then the
        # background terms: its normal equations are the basis's small Gram matrix expanded
        # by the spatial terms (a tenth of the products of the whole design)
        sp = spatial[:, sl].T                                           # [s, n_sp]
        cw, bw = conv * w[:, None], bg * w[:, None]
        gram, cross = cw @ conv.transpose(0, 2, 1), cw @ bg.transpose(0, 2, 1)
        top = np.concatenate([np.einsum("sp,sq,snm->spnqm", sp, sp, gram).reshape(
            s, n_sp * nb, n_sp * nb), np.einsum("sp,snb->spnb", sp, cross).reshape(
            s, n_sp * nb, -1)], 2)
        bottom = np.concatenate([top[:, :, n_sp * nb:].transpose(0, 2, 1),
                                 bw @ bg.transpose(0, 2, 1)], 2)
        normal.append(np.concatenate([top, bottom], 1))
        vector.append(np.concatenate([np.einsum("sp,sn->spn", sp, (cw @ sci[:, :, None])[..., 0])
                                      .reshape(s, -1), (bw @ sci[:, :, None])[..., 0]], 1))
        data2.append((w * sci ** 2).sum(axis=1))
        npix.append(np.full(s, sci.shape[1]))
    normal, vector = np.concatenate(normal), np.concatenate(vector)
    data2, npix = np.concatenate(data2), np.concatenate(npix)
    keep = np.ones(len(ix), bool)
    for _ in range(4):
        coeffs = np.linalg.lstsq(normal[keep].sum(0), vector[keep].sum(0), rcond=1e-12)[0]
        chi2 = data2 - 2 * vector @ coeffs + np.einsum("p,spq,q->s", coeffs, normal, coeffs)
        chi2_dof = chi2 / npix
        clipped = sigma_clip(chi2_dof[keep], sigma_lower=np.inf, sigma_upper=5, stdfunc="mad_std",
                             maxiters=1).mask
        if not clipped.any() or keep.sum() - clipped.sum() < MIN_KERNEL_STARS:
            break
        keep[np.flatnonzero(keep)[clipped]] = False
    images = coeffs[:n_sp * nb].reshape(n_sp, nb) @ basis.reshape(nb, -1)
    return MatchingKernel(images.reshape(n_sp, *basis.shape[1:]), coeffs[n_sp * nb:], order,
                          bg_order, shape, int(keep.sum()), float(np.median(chi2_dof[keep])))


@dataclass
class Template:
    """A template resampled onto a CCD's grid padded by `pad` pixels: nJy where `valid`."""

    image: np.ndarray
    variance: np.ndarray
    valid: np.ndarray
    pad: int = 0

    @property
    def inner(self) -> tuple[slice, slice]:
        """The CCD's own pixels."""
        ny, nx = self.image.shape
        return slice(self.pad, ny - self.pad), slice(self.pad, nx - self.pad)


@dataclass
class Difference:
    exposure: Exposure               # science - K * template (nJy), its per-pixel variance
    kernel: MatchingKernel
    science_variance: np.ndarray
    template_variance: np.ndarray    # the template's own, before convolution (0 where none)
    fwhm_px: float


def kernel_stars(science: Exposure, fwhm_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Isolated unsaturated stars of the science image, brightest first, in the S/N range of
    ip_diffim's kernel sources."""
    bad = (science.mask & UNUSABLE) != 0
    peaks, _ = detect(science.image, science.variance, bad, fwhm_px, KERNEL_STAR_SIGNIFICANCE[0])
    lo, hi = KERNEL_STAR_SIGNIFICANCE
    peaks = peaks[~peaks["blended"] & (peaks["significance"] <= hi) & (peaks["significance"] >= lo)]
    peaks.sort("significance", reverse=True)
    return np.asarray(peaks["x"]), np.asarray(peaks["y"])


def subtract_images(science: Exposure, template: Template, fwhm_px: float) -> Difference:
    """science - K * template - background, with K fitted on the science image's stars."""
    inner, pad = template.inner, template.pad
    science_ok = (science.mask & UNUSABLE) == 0
    covered = (template.valid[inner] & science_ok).mean()
    if covered < MIN_TEMPLATE_COVERAGE:
        raise DiffimError(f"the template covers {100 * covered:.1f}% of the CCD")
    x, y = kernel_stars(science, fwhm_px)
    t_image = np.where(template.valid, template.image, 0.0)
    t_var = np.where(template.valid, template.variance, 0.0)
    kernel = fit_matching_kernel(np.pad(science.image.astype(float), pad), t_image,
                                 np.pad(science.variance, pad) + t_var, np.pad(science_ok, pad),
                                 template.valid, x, y, stamp_half=int(np.ceil(2 * fwhm_px)),
                                 pad=pad)
    k0 = kernel.centre
    no_template = binary_dilation(~template.valid, iterations=k0.shape[0] // 2)[inner]
    mask = science.mask | np.where(no_template, bit("NO_DATA"), 0).astype(np.int32)
    diff = np.where(no_template, 0.0, science.image - kernel.convolve(t_image, pad))
    variance = science.variance + oaconvolve(t_var, k0 ** 2, mode="same")[inner]
    meta = science.metadata.copy()
    meta["KSTARS"] = (kernel.n_stars, "stamps in the matching kernel fit")
    meta["KCHI2"] = (kernel.chi2_dof, "median chi2/dof of the kernel stamps")
    meta["KSUM"] = (float(k0.sum()), "matching kernel sum at the CCD centre")
    meta["BUNIT"] = "nJy"
    exposure = Exposure(diff, np.where(no_template, np.inf, variance), mask, science.wcs, meta,
                        psf=science.psf)
    return Difference(exposure, kernel, science.variance, np.where(no_template, 0.0, t_var[inner]),
                      fwhm_px)


def matched_filter(d: Difference) -> tuple[np.ndarray, float, float]:
    """The PSF-matched significance of the difference image, with the noise of the science
    image and of the kernel-convolved template both propagated, then rescaled by its robust
    standard deviation over the CCD (as Rubin's ScaleVarianceTask does for what the variance
    planes miss: master-calibration and row noise). Also returns the factor from variance-plane
    PSF-flux errors to true ones, and that empirical rescaling (1 when the noise model is right)."""
    p = psf_kernel(d.fwhm_px)
    pk = fftconvolve(p, d.kernel.centre)
    valid = np.isfinite(d.exposure.variance) & ((d.exposure.mask & UNUSABLE) == 0)
    var_true = (oaconvolve(d.science_variance, p ** 2, mode="same")
                + oaconvolve(d.template_variance, pk ** 2, mode="same"))
    var_white = oaconvolve(np.where(valid, d.exposure.variance, 0.0), p ** 2, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        sig = oaconvolve(np.where(valid, d.exposure.image, 0.0), p, mode="same") / np.sqrt(var_true)
        ratio = np.sqrt(var_true / var_white)
    excess = float(mad_std(sig[valid & np.isfinite(sig)]))
    return sig / excess, float(np.nanmedian(ratio[valid])) * excess, excess


def measurable(exp: Exposure, x: np.ndarray, y: np.ndarray, fwhm_px: float) -> np.ndarray:
    """Positions whose PSF footprint (the box of +-FWHM) is on usable difference pixels, at
    least 2 FWHM inside the image: where forced photometry means something."""
    ny, nx = exp.image.shape
    usable = ((exp.mask & UNUSABLE) == 0) & np.isfinite(exp.variance)
    margin = 2 * fwhm_px
    ok = (x > margin) & (x < nx - 1 - margin) & (y > margin) & (y < ny - 1 - margin)
    ix, iy = np.round(np.where(ok, x, 0)).astype(int), np.round(np.where(ok, y, 0)).astype(int)
    half = int(np.ceil(fwhm_px))
    for k in np.flatnonzero(ok):
        ok[k] = usable[iy[k] - half:iy[k] + half + 1, ix[k] - half:ix[k] + half + 1].all()
    return ok


def forced_photometry(exp: Exposure, x: np.ndarray, y: np.ndarray, fwhm_px: float,
                      error_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """PSF flux (nJy) and error at fixed positions of a difference image: PSF weights with a
    flat background weight (the variance plane holds the stars' own photons), errors from
    the variance plane times the correlated-noise factor. The PSF is the science image's
    empirical model times its aperture correction where it has one (its nJy are on that
    aperture's scale), else the Moffat of `fwhm_px`."""
    psf, apcorr = (exp.psf, float(exp.metadata["APCORR"])) if exp.psf is not None else (fwhm_px, 1.0)
    finite = np.isfinite(exp.variance)
    var = np.where(finite, exp.variance, 0.0)
    flat = np.full(exp.image.shape, float(np.median(var[finite])))
    flux, err = psf_flux(exp.image, np.where(finite, flat, 0.0), x, y, psf, variance=var)
    return flux * apcorr, err * error_scale * apcorr


DIA_SOURCE_COLUMNS = {"x": float, "y": float, "psf_flux": float, "psf_flux_err": float,
                      "snr": float, "significance": float, "is_negative": bool, "is_dipole": bool,
                      "dipole_pos_flux": float, "dipole_neg_flux": float, "science_flux": float,
                      "is_residual": bool}


def no_dia_sources() -> Table:
    """The DIA source table of an image with nothing to difference."""
    return Table({name: np.zeros(0, dtype) for name, dtype in DIA_SOURCE_COLUMNS.items()})


def detect_dia_sources(d: Difference, threshold: float = DETECTION_SIGMA) -> Table:
    """Positive and negative peaks of the significance image at `threshold`, with forced PSF
    fluxes; a positive and a negative peak closer than DIPOLE_FWHM FWHM are one dipole source
    at their midpoint, with the flux of each lobe kept."""
    sig, error_scale, excess = matched_filter(d)
    exp = d.exposure
    sig = np.where(((exp.mask & UNUSABLE) != 0) | ~np.isfinite(sig), 0.0, sig)
    size = max(3, int(round(d.fwhm_px)) | 1)
    lobes = []
    for sign in (1, -1):
        s = sign * sig
        yy, xx = np.nonzero((s == maximum_filter(s, size=size)) & (s > threshold))
        x, y = centroids(np.ascontiguousarray(sign * exp.image, np.float32),
                         Table({"x": xx.astype(float), "y": yy.astype(float)}), d.fwhm_px)
        lobes.append((x, y, sig[yy, xx]))
    (px, py, psig), (nx, ny, nsig) = lobes
    pos_of = {}                                    # negative lobe -> its positive partner
    if len(px) and len(nx):
        dist, idx = cKDTree(np.column_stack([px, py])).query(np.column_stack([nx, ny]))
        for j in np.argsort(dist):
            if dist[j] < DIPOLE_FWHM * d.fwhm_px and idx[j] not in pos_of.values():
                pos_of[int(j)] = int(idx[j])
    neg, pos = np.array(list(pos_of), int), np.array(list(pos_of.values()), int)
    lone_pos = np.setdiff1d(np.arange(len(px)), pos)
    lone_neg = np.setdiff1d(np.arange(len(nx)), neg)
    x = np.concatenate([px[lone_pos], nx[lone_neg], (px[pos] + nx[neg]) / 2])
    y = np.concatenate([py[lone_pos], ny[lone_neg], (py[pos] + ny[neg]) / 2])
    kind = np.repeat([0, 1, 2], [len(lone_pos), len(lone_neg), len(pos)])
    flux, err = forced_photometry(d.exposure, x, y, d.fwhm_px, error_scale)
    lobe_pos = np.zeros(len(x))
    lobe_neg = np.zeros(len(x))
    if len(pos):
        lobe_pos[kind == 2] = forced_photometry(d.exposure, px[pos], py[pos], d.fwhm_px, 1.0)[0]
        lobe_neg[kind == 2] = forced_photometry(d.exposure, nx[neg], ny[neg], d.fwhm_px, 1.0)[0]
    significance = np.concatenate([psig[lone_pos], nsig[lone_neg],
                                   np.maximum(psig[pos], -nsig[neg])])
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux / err
    return Table({"x": x, "y": y, "psf_flux": flux, "psf_flux_err": err, "snr": snr,
                  "significance": significance, "is_negative": kind == 1, "is_dipole": kind == 2,
                  "dipole_pos_flux": lobe_pos, "dipole_neg_flux": lobe_neg},
                 meta={"error_scale": error_scale, "noise_excess": excess})


def flag_star_residuals(sources: Table, science: Exposure, fwhm_px: float) -> Table:
    """The brightest science-image PSF flux within DIPOLE_FWHM FWHM of each DIA source, and
    whether the source is a subtraction residual of that star: a change below
    RESIDUAL_FRACTION of it. Relative astrometry good to ~10 mas and small PSF mismatches
    leave 1-3% lobes and rings on and around every bright star, tens of sigma above the noise
    (what Rubin's reliability classifier is trained to reject); a real variable changes by
    5-50%, a mover or a transient by all of its flux."""
    x, y = np.asarray(sources["x"], float), np.asarray(sources["y"], float)
    flux = np.zeros(len(sources))
    if len(sources):
        p = psf_kernel(fwhm_px)
        image = np.where(np.isfinite(science.image), science.image, 0.0)
        filtered = oaconvolve(image, p, mode="same") / np.sum(p ** 2)   # PSF flux at each pixel
        r = int(np.ceil(DIPOLE_FWHM * fwhm_px))
        ny, nx = image.shape
        for k, (ix, iy) in enumerate(zip(np.round(x).astype(int), np.round(y).astype(int),
                                         strict=True)):
            flux[k] = filtered[max(0, iy - r):min(ny, iy + r + 1), max(0, ix - r):min(nx, ix + r + 1)].max()
    sources["science_flux"] = flux
    sources["is_residual"] = np.abs(np.asarray(sources["psf_flux"])) < RESIDUAL_FRACTION * flux
    return sources
