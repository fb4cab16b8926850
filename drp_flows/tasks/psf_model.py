"""An empirical PSF that varies over the CCD: the PSF stars' mean image at native sampling (a
PSF of FWHM >= 3.5 px is sampled finely enough), plus how that image changes as it grows and
shears, each change a polynomial of the position of degree <= 2 (the fewest terms the stars
ask for), fitted to bright stars selected by size and shape, checked on reserved ones. Stars
are registered with a Fourier (sinc) shift. A free polynomial per pixel (PSFEx's basis,
Piff's PixelGrid) fitted the stars' noise: 1% flux errors at the corners of a CCD whose PSF
was constant. Piff itself (Rubin's) is not used: its fits iterate in Python over the stars
(not measured here); this is a few vectorised least squares, ~0.3 s a 1k CCD.

- Star selection (Rubin's objectSizeStarSelector, by size and shape): unblended, unsaturated
  sources at S/N >= 50 whose adaptive-moment size (galsim.hsm, the HSM moments Rubin uses for
  PSF shapes) lies on the stellar locus (within 3 robust sigma of its trend over the CCD, and
  at most SIZE_TOLERANCE above it) with a shape near the trend's: galaxies, larger or more
  elongated, and blends are left out. One star in RESERVE_EVERY is reserved (never fitted) to check the
  model: size and shape residuals (data minus model) at reserved stars are the PSF QA.
- PSF fluxes are normalised to the model's stamp (`half` pixels); the aperture correction
  (calibrate.py) then puts them on a fixed aperture's scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import galsim
import numpy as np
from astropy.io import fits
from scipy.spatial import cKDTree

from drp_flows.tasks.psf import moffat_stamps

SNR_MIN = 50.0
SNR_SPARSE = 20.0         # ... or this, when too few stars are brighter
SIZE_TOLERANCE = 0.05     # a PSF star is at most 5% larger than the locus's median
RESERVE_EVERY = 5         # every fifth candidate (by brightness) is reserved for the QA
MIN_STARS = {2: 30, 1: 12, 0: 3}   # polynomial degree -> stars needed to fit it
MIN_FIT_STARS = 15        # fewer, and the CCD keeps its Moffat: a mean image of a few noisy
                          # stars fits their noise (u CCDs of 384 px: zeropoints 10-80 mmag off)
LANCZOS = 3
FOURIER_PAD = 4           # pixels of zeros about a stamp before it is shifted
SHAPE_BASIS = ("size", "g1", "g2")   # what varies over a CCD (shape_basis)
NEIGHBOUR_FWHM = 1.5      # a PSF star's pixels this close (FWHMs) to another detection are left out


def lanczos_weights(shift: np.ndarray) -> np.ndarray:
    """Per shift, the 2*LANCZOS+1 taps m = -3..3 of out[i] = sum_m w[m] in[i + m] that move
    the content by `shift` pixels (|shift| <= 0.5), normalised to keep the flux."""
    m = np.arange(-LANCZOS, LANCZOS + 1)
    u = -np.asarray(shift, float)[:, None] - m[None, :]
    w = np.sinc(u) * np.sinc(u / LANCZOS) * (np.abs(u) < LANCZOS)
    return w / w.sum(axis=1, keepdims=True)


def shift_stamps(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Stamps [n, s, s] of light (stars, models) with their content moved by (dx, dy)
    pixels: a phase ramp on the Fourier transform (sinc interpolation, exact for a PSF
    sampled as ours are; the stamps zero-padded by FOURIER_PAD against wrap-around). A
    Lanczos-3 shift made a PSF of sigma 2 px 0.35% smaller at half a pixel: the models,
    registered one way and evaluated the other, were 0.3-0.45% small against the truth in
    0.8" seeing (z, u), 0.1% in 1.2"."""
    n, s, _ = stamps.shape
    pad = np.pad(stamps, ((0, 0), (FOURIER_PAD, FOURIER_PAD), (FOURIER_PAD, FOURIER_PAD)))
    k = np.fft.fftfreq(s + 2 * FOURIER_PAD)
    ramp = np.exp(-2j * np.pi * (np.asarray(dx, float)[:, None, None] * k[None, None, :]
                                 + np.asarray(dy, float)[:, None, None] * k[None, :, None]))
    moved = np.fft.ifft2(np.fft.fft2(pad) * ramp).real
    return moved[:, FOURIER_PAD:FOURIER_PAD + s, FOURIER_PAD:FOURIER_PAD + s]


def shift_weights(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Stamps [n, s, s] of weights (variances, masks) moved by (dx, dy) pixels, Lanczos-3,
    zero beyond: its three taps keep a mask's edge where it was, without the sinc's ringing."""
    n, s, _ = stamps.shape
    pad = np.pad(stamps, ((0, 0), (LANCZOS, LANCZOS), (LANCZOS, LANCZOS)))
    wx, wy = lanczos_weights(dx), lanczos_weights(dy)
    across = sum(wx[:, k, None, None] * pad[:, :, k:k + s] for k in range(2 * LANCZOS + 1))
    return sum(wy[:, k, None, None] * across[:, k:k + s, :] for k in range(2 * LANCZOS + 1))


def fit_to_half(stamps: np.ndarray, half: int) -> np.ndarray:
    """Stamps [n, s, s] cut or zero-padded about their middle pixel to 2 half + 1 a side."""
    h = stamps.shape[1] // 2
    if half < h:
        return stamps[:, h - half:h + half + 1, h - half:h + half + 1]
    return np.pad(stamps, ((0, 0), (half - h, half - h), (half - h, half - h)))


def cutouts(image: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    """Stamps [n, 2 half + 1, 2 half + 1] centred on integer pixels, zero outside the image."""
    pad = np.pad(image, half)
    offs = np.arange(2 * half + 1)
    return pad[(iy[:, None, None] + offs[None, :, None]), (ix[:, None, None] + offs[None, None, :])]


def terms(x: np.ndarray, y: np.ndarray, degree: int, size: int) -> np.ndarray:
    """Polynomial terms [n, K] of positions scaled to -1..1 over the CCD."""
    u, v = 2 * np.asarray(x, float) / (size - 1) - 1, 2 * np.asarray(y, float) / (size - 1) - 1
    cols = [np.ones_like(u)]
    for d in range(1, degree + 1):
        cols += [u ** (d - k) * v ** k for k in range(d + 1)]
    return np.column_stack(cols)


def moments(stamps: np.ndarray, guess_sigma: float) -> np.ndarray:
    """Adaptive moments [n, 3]: sigma (pixels), e1, e2 (distortions); NaN where HSM fails."""
    out = np.full((len(stamps), 3), np.nan)
    for k, stamp in enumerate(stamps):
        m = galsim.ImageD(np.ascontiguousarray(stamp)).FindAdaptiveMom(
            strict=False, guess_sig=guess_sigma)
        if m.moments_status == 0:
            out[k] = m.moments_sigma, m.observed_shape.e1, m.observed_shape.e2
    return out


@dataclass
class PixelPsf:
    """The model: coefficient images [K, side, side] of the polynomial terms in (x, y)."""

    coeffs: np.ndarray
    degree: int
    ccd_size: int
    fwhm_px: float           # the Moffat-fitted FWHM (calibrate.measure_fwhm): stamp sizes
    empirical: bool = True   # False: too few stars, the Moffat of that FWHM (moffat_model)

    @property
    def half(self) -> int:
        return self.coeffs.shape[1] // 2

    @property
    def size_px(self) -> float:
        return self.fwhm_px

    def centred(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The PSF at positions, centred on its stamp's middle pixel, each summing to 1."""
        t = terms(x, y, self.degree, self.ccd_size)
        images = np.einsum("nk,kij->nij", t, self.coeffs)
        return images / images.sum(axis=(1, 2), keepdims=True)

    def stamps(self, x: np.ndarray, y: np.ndarray, half: int):
        """As psf.moffat_stamps (unit_sum=False): the nearest pixel of each centre, the
        offsets, and the PSF there [n, 2 half + 1, 2 half + 1], of unit flux over the model's
        own stamp (so a stamp cut smaller measures the model's flux all the same)."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        ix, iy = np.round(x).astype(int), np.round(y).astype(int)
        model = fit_to_half(shift_stamps(self.centred(x, y), x - ix, y - iy), half)
        return ix, iy, np.arange(-half, half + 1), model

    def to_hdu(self) -> fits.ImageHDU:
        hdu = fits.ImageHDU(self.coeffs.astype(np.float32), name="PSF")
        hdu.header["DEGREE"] = (self.degree, "polynomial degree in x, y over the CCD")
        hdu.header["CCDSIZE"] = self.ccd_size
        hdu.header["FWHM"] = (self.fwhm_px, "pixels, the CCD's Moffat-fitted FWHM")
        hdu.header["EMPIRIC"] = (self.empirical, "fitted to the CCD's stars (else its Moffat)")
        return hdu

    @classmethod
    def from_hdu(cls, hdu) -> PixelPsf:
        h = hdu.header
        return cls(np.asarray(hdu.data, float), int(h["DEGREE"]), int(h["CCDSIZE"]),
                   float(h["FWHM"]), bool(h["EMPIRIC"]))


@dataclass
class PsfStars:
    """The stars a model was fitted to and the reserved ones, with the QA residuals."""

    used: np.ndarray          # indices into the source list
    reserved: np.ndarray
    size_resid: np.ndarray    # at reserved stars: (data - model) / model of the HSM sigma
    e1_resid: np.ndarray
    e2_resid: np.ndarray
    data_size: np.ndarray = field(default_factory=lambda: np.zeros(0))    # at used stars: HSM
    model_size: np.ndarray = field(default_factory=lambda: np.zeros(0))   # sigma, pixels


def model_half(fwhm_px: float) -> int:
    """The model's stamp half-width (pixels): 3 FWHM, where the core's flux has all but
    ~2% (the wings beyond are the aperture correction's)."""
    return max(8, int(np.ceil(3 * fwhm_px)))


def select_candidates(image: np.ndarray, x: np.ndarray, y: np.ndarray, snr: np.ndarray,
                      clean: np.ndarray, fwhm_px: float) -> tuple[np.ndarray, np.ndarray]:
    """PSF star candidates by size and shape, brightest first: (indices, moments [n, 3])."""
    half = model_half(fwhm_px)
    n = image.shape[0]
    inside = (x >= half + 1) & (x <= n - 2 - half) & (y >= half + 1) & (y <= n - 2 - half)
    idx = np.flatnonzero(clean & inside & (snr >= SNR_MIN))
    if len(idx) < MIN_STARS[1]:      # a sparse field (u band, a small CCD): go fainter
        idx = np.flatnonzero(clean & inside & (snr >= SNR_SPARSE))
    idx = idx[np.argsort(-snr[idx])]
    if len(idx) == 0:
        return idx, np.zeros((0, 3))
    ix, iy = np.round(x[idx]).astype(int), np.round(y[idx]).astype(int)
    m = moments(cutouts(image, ix, iy, half), fwhm_px / 2.3548)
    ok = np.isfinite(m).all(axis=1)
    if ok.sum() < 3:
        return idx[ok], m[ok]
    # the locus follows the PSF over the CCD: a cut about one median size would drop the
    # stars where a size gradient makes the PSF largest or smallest
    degree = next(d for d in (2, 1, 0) if ok.sum() >= MIN_STARS[d])
    size = trend(x[idx], y[idx], m[:, 0], ok, degree, n)
    e = np.column_stack([trend(x[idx], y[idx], m[:, k], ok, degree, n) for k in (1, 2)])
    spread = 1.4826 * np.median(np.abs(m[ok, 0] - size[ok]))
    e_dist = np.hypot(*(m[:, 1:] - e).T)
    e_spread = 1.4826 * np.median(e_dist[ok]) + 0.01
    on_locus = ok & (np.abs(m[:, 0] - size) < 3 * spread + 1e-3) \
        & (m[:, 0] < size * (1 + SIZE_TOLERANCE)) & (e_dist < 3 * e_spread)
    return idx[on_locus], m[on_locus]


def trend(x: np.ndarray, y: np.ndarray, value: np.ndarray, ok: np.ndarray, degree: int,
          size: int) -> np.ndarray:
    """A polynomial of the position through `value` (where `ok`), clipped at 3 robust sigma
    (galaxies, blends), evaluated at every position."""
    t = terms(x, y, degree, size)
    use = ok.copy()
    for _ in range(3):
        coef = np.linalg.lstsq(t[use], value[use], rcond=None)[0]
        resid = np.where(ok, value - t @ coef, np.inf)
        spread = 1.4826 * np.median(np.abs(resid[use]))
        new = ok & (np.abs(resid) < 3 * spread + 1e-6)
        if new.sum() < t.shape[1] or (new == use).all():
            break
        use = new
    return t @ coef


def fit_pixel_psf(image: np.ndarray, weight_var: np.ndarray, x: np.ndarray, y: np.ndarray,
                  flux: np.ndarray, candidates: np.ndarray, cand_moments: np.ndarray,
                  fwhm_px: float, ccd_size: int) -> tuple[PixelPsf, PsfStars]:
    """Fit the model to the candidates (less the reserved), then measure it at the reserved.
    With too few stars for even a constant model, the CCD's Moffat (`moffat_model`).

    Each star's stamp is registered to its centroid (shifted by minus its sub-pixel offset)
    and divided by its flux, leaving out the pixels next to other detections. The model is
    the stars' weighted mean image (free pixels) plus its change in size and shape
    (`shape_basis`), each a polynomial of the position. Three passes: each takes the stars'
    fluxes from the model before and drops stars whose residual is an outlier (a blend the
    detection missed, a cosmic ray).
    """
    half = model_half(fwhm_px)
    order = np.arange(len(candidates))
    reserved_mask = (order % RESERVE_EVERY) == RESERVE_EVERY - 1
    fit_idx, res_idx = candidates[~reserved_mask], candidates[reserved_mask]
    degree = next((d for d in (2, 1, 0) if len(fit_idx) >= max(MIN_STARS[d], MIN_FIT_STARS)),
                  None)
    if degree is None:
        model = moffat_model(fwhm_px, ccd_size)
        return model, PsfStars(candidates, np.zeros(0, int), *np.zeros((3, 0)),
                               data_size=cand_moments[:, 0],
                               model_size=moments(model.stamps(x[candidates], y[candidates], half)[3],
                                                  fwhm_px / 2.3548)[:, 0])
    ix, iy = np.round(x[fit_idx]).astype(int), np.round(y[fit_idx]).astype(int)
    fx, fy = x[fit_idx] - ix, y[fit_idx] - iy
    registered = shift_stamps(cutouts(image, ix, iy, half), -fx, -fy)
    var = shift_weights(cutouts(weight_var, ix, iy, half), -fx, -fy)
    usable = shift_weights(neighbour_free(x, y, fit_idx, half, NEIGHBOUR_FWHM * fwhm_px),
                          -fx, -fy) > 0.99
    t = terms(x[fit_idx], y[fit_idx], degree, ccd_size)[:, 1:]     # the variation's terms
    f = np.asarray(flux[fit_idx], float)
    keep = np.ones(len(fit_idx), bool)
    side = 2 * half + 1
    shape = (len(fit_idx), -1)
    source = np.maximum(registered, 0)          # the stars' own photons, first from the data
    for _ in range(3):
        # the normalised stamps' pixels, weighted by their inverse variance (background and
        # the star's photons), zero next to a neighbour
        w = (usable * keep[:, None, None] * f[:, None, None] ** 2
             / np.maximum(var + source, 1e-12)).reshape(shape)
        d = (registered / f[:, None, None]).reshape(shape)
        # the fewest variation terms that the stars ask for (BIC: each term must lower the
        # chi2 by ln(pixels)); a free quadratic fitted noise as 0.4% size changes, 4 mmag
        fits = [solve_model(d, w, t[:, :n]) for n in (0, 2, 5)[:degree + 1]]
        penalty = np.log(max(np.count_nonzero(w), 2))
        best = int(np.argmin([chi2 + penalty * (len(SHAPE_BASIS) + 1) * n
                              for n, (_, chi2) in zip((0, 2, 5), fits, strict=False)]))
        model = PixelPsf(fits[best][0].reshape(-1, side, side), best, ccd_size, fwhm_px)
        pred = model.centred(x[fit_idx], y[fit_idx])
        # each star's flux from the model, its residual, and its photons for the weights
        wf = usable * pred / np.maximum(var, 1e-12)
        f = (wf * registered).sum(axis=(1, 2)) / (wf * pred).sum(axis=(1, 2))
        source = np.maximum(f[:, None, None] * pred, 0)
        chi2 = (usable * (registered - f[:, None, None] * pred) ** 2
                / np.maximum(var + source, 1e-12)).sum(axis=(1, 2)) / usable.sum(axis=(1, 2))
        centre = np.median(chi2[keep])
        keep = chi2 <= centre + 5 * 1.4826 * np.median(np.abs(chi2[keep] - centre))
    used = fit_idx[keep]
    stars = PsfStars(used, res_idx, *reserved_residuals(x, y, res_idx, model,
                                                        cand_moments[reserved_mask]),
                     data_size=cand_moments[~reserved_mask][keep, 0],
                     model_size=moments(model.stamps(x[used], y[used], half)[3], fwhm_px / 2.3548)[:, 0])
    return model, stars


def solve_model(d: np.ndarray, w: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, float]:
    """The mean image and its variation (`shape_basis` times the polynomial terms `t`, none
    for a constant model) that fit the normalised stamps `d` [star, pixel] with weights `w`:
    coefficient images [1 + terms, pixel] and the chi2."""
    vary = np.zeros_like(d)
    coeffs = np.zeros((1 + t.shape[1], d.shape[1]))
    for _ in range(3 if t.shape[1] else 1):
        coeffs[0] = (w * (d - vary)).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-300)
        if t.shape[1]:
            side = int(round(np.sqrt(d.shape[1])))
            # size, shear, and the mean itself: a star's flux, taken from a model of the wrong
            # size, is off with it, and without a term of its own that error pulls the fitted
            # size change low
            basis = np.vstack([shape_basis(coeffs[0].reshape(side, side)).reshape(
                len(SHAPE_BASIS), -1), coeffs[:1]])
            gram = (w[:, None, :] * basis[None]) @ basis.T              # [star, b, b]
            n_coef = len(basis) * t.shape[1]
            a = np.einsum("sk,sl,sbc->bkcl", t, t, gram).reshape(n_coef, n_coef)
            rhs = (((w * (d - coeffs[0])) @ basis.T).T @ t).reshape(-1)
            amp = np.linalg.solve(a + 1e-9 * np.trace(a) * np.eye(n_coef), rhs)
            coeffs[1:] = np.einsum("bk,bp->kp", amp.reshape(len(basis), -1), basis)
            vary = t @ coeffs[1:]
    return coeffs, float((w * (d - coeffs[0] - vary) ** 2).sum())


def moffat_model(fwhm_px: float, ccd_size: int) -> PixelPsf:
    """The fallback of a CCD with too few PSF stars: its fitted Moffat, constant over it."""
    half = model_half(fwhm_px)
    image = moffat_stamps(np.zeros(1), np.zeros(1), fwhm_px, half)[3]
    return PixelPsf(image, 0, ccd_size, fwhm_px, empirical=False)


def size_response(psf: PixelPsf) -> float:
    """How a PSF flux measured with the model responds to the model's size error at the
    CCD's centre: flux / true flux = 1 + k (model size / true size - 1); k ~ 1 (a Gaussian's
    is 1), from the model's own size derivative (`shape_basis`)."""
    c = np.array([(psf.ccd_size - 1) / 2])
    p = psf.centred(c, c)[0]
    grow = shape_basis(p)[0]          # the true PSF larger than the model by a fraction e: p + e grow
    return float(-(p * grow).sum() / (p * p).sum())


def shape_basis(mean: np.ndarray, step: float = 0.01) -> np.ndarray:
    """How the mean PSF image changes as it grows and as it shears (e1, e2): the derivatives
    [3, side, side], taken by drawing it (an interpolated image) dilated and sheared by
    +-`step`. The PSF's variation over a CCD is the atmosphere's and the optics' size and
    shape (SCIENCE.md): three images, each a polynomial over the CCD, where a free polynomial
    per pixel fitted the stars' noise (1% flux errors at the corners of a CCD whose PSF was
    constant)."""
    image = galsim.InterpolatedImage(galsim.ImageD(np.ascontiguousarray(mean), scale=1.0))
    side = mean.shape[0]

    def draw(obj):
        return obj.drawImage(nx=side, ny=side, scale=1.0, method="no_pixel").array

    out = []
    for change in SHAPE_BASIS:
        plus, minus = (draw(image.dilate(1 + sign * step) if change == "size" else
                            image.shear(**{change: sign * step})) for sign in (1, -1))
        out.append((plus - minus) / (2 * step))
    return np.array(out)


def neighbour_free(x: np.ndarray, y: np.ndarray, stars: np.ndarray, half: int,
                   radius: float) -> np.ndarray:
    """Per star, its stamp's pixels farther than `radius` from every other detection."""
    side = 2 * half + 1
    out = np.ones((len(stars), side, side))
    tree = cKDTree(np.column_stack([x, y]))
    offs = np.arange(-half, half + 1)
    for k, i in enumerate(stars):
        cx, cy = round(x[i]), round(y[i])
        for j in tree.query_ball_point([x[i], y[i]], half * np.sqrt(2) + radius):
            if j != i:
                near = ((cx + offs[None, :] - x[j]) ** 2 + (cy + offs[:, None] - y[j]) ** 2
                        < radius ** 2)
                out[k][near] = 0.0
    return out


def reserved_residuals(x: np.ndarray, y: np.ndarray, res_idx: np.ndarray, model: PixelPsf,
                       data_moments: np.ndarray):
    """(data - model) of HSM size (fraction) and e1, e2 at the reserved stars, the model drawn
    at each star's own sub-pixel position as the data were."""
    if len(res_idx) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    # drawn at the star's offset from its rounded centre, where its data stamp was cut
    drawn = model.stamps(x[res_idx], y[res_idx], model.half)[3]
    mm = moments(drawn, model.fwhm_px / 2.3548)
    return ((data_moments[:, 0] - mm[:, 0]) / mm[:, 0], data_moments[:, 1] - mm[:, 1],
            data_moments[:, 2] - mm[:, 2])
