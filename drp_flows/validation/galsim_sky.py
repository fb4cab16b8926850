"""The sky drawn with GalSim, as Rubin's imSim draws it: a PSF the pipeline does not model
exactly, and galaxies.

The PSF is a Kolmogorov atmosphere x an obscured Airy (8.36 m, obscuration 0.61, at the band's
effective wavelength) x a Gaussian for charge diffusion, drawn with pixel integration. The
atmosphere's FWHM and ellipticity vary smoothly over the focal plane (a quadratic in focal
plane position, as focus and tracking errors make them) and from visit to visit; `PsfField`
holds a visit's and tells the true PSF anywhere (the QA reads it; the pipeline never does).
A test can pick another family (`family="kolmogorov"`: atmosphere only) the fitting code has no
special case for.

Galaxies are bulge (de Vaucouleurs) + disk (exponential) with counts rising 0.35 dex/mag,
half-light radii shrinking with magnitude and random ellipticities; each drawn through the
local WCS Jacobian of its position, convolved with the PSF there.

Speed (SCIENCE.md): stars brighter than BRIGHT_E electrons are drawn with their own exact PSF by
FFT (~1 ms each) in a stamp wide enough to hold all but ~0.1-0.3% of the flux; fainter stars
use the PSF of the nearest of NODES x NODES points of the CCD, pre-drawn (pixel included) as an
interpolated image, dilated and sheared to the star's position (`SceneDrawer._placed`), ~0.1 ms
a star. Galaxies brighter than GALAXY_EXACT_E are convolved with
that node's PSF by FFT (~5 ms each: a de Vaucouleurs cusp and an Airy need large FFTs); the
fainter nine in ten, below any S/N that matters, are drawn as the Gaussian of the same size
and shape after the PSF (~0.1 ms). Photon shooting would be 100x slower. A 1k CCD of the
demo's sky takes ~1 s.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import galsim
import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from drp_flows.tasks.camera import BANDS, PIXEL_SCALE, Camera, focal_plane
from drp_flows.tasks.skymap import tangent_wcs

DIAMETER_M, OBSCURATION = 8.36, 0.61
WAVELENGTH_NM = {"u": 367.0, "g": 482.0, "r": 622.0, "i": 755.0, "z": 869.0, "y": 971.0}
CHARGE_DIFFUSION_FWHM = 0.3    # arcsec
FAMILIES = ("kolmogorov x airy", "kolmogorov")
GSPARAMS = galsim.GSParams(folding_threshold=2e-3, maxk_threshold=5e-4)
GALAXY_GSPARAMS = galsim.GSParams(folding_threshold=5e-3, maxk_threshold=5e-3)
NODES = 3                      # faint objects take the PSF of the nearest of NODES x NODES points
BRIGHT_E = 2e4                 # stars brighter (electrons) get their exact PSF and a wide stamp
STAMP_BRIGHT = 64              # their stamps' half-width, pixels; fainter ones: stamp_half()
GALAXY_EXACT_E = 5e3           # galaxies brighter (electrons) are drawn exactly (r < ~22.8)
GALAXY_STAMP_HLR = 6.0         # galaxy stamps: half-width in disk half-light radii + the PSF's


@dataclass(frozen=True)
class PsfField:
    """A visit's PSF over the focal plane, in pixel units. `fx, fy` are focal-plane positions
    in units of the raft's half-width (-1..1 over the nine CCDs)."""

    band: str
    seeing: float                          # atmosphere FWHM at the boresight, arcsec
    size: tuple[float, float, float]       # fractional FWHM change: d/dfx, d/dfy, d/d(r^2)
    g0: tuple[float, float]                # atmosphere shear at the boresight
    g_grad: tuple[float, float, float, float]   # dg1/dfx, dg1/dfy, dg2/dfx, dg2/dfy
    family: str = FAMILIES[0]

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"PSF family {self.family!r}: choose from {FAMILIES}")

    @classmethod
    def for_visit(cls, band: str, seeing: float, rng: np.random.Generator,
                  family: str = FAMILIES[0], size_gradient: float = 0.03) -> PsfField:
        """A random field: the size changes by up to `size_gradient` (fraction) from the raft
        centre to its edge, |g| ~0.01-0.04 with a gradient of ~0.01 over the raft."""
        size = tuple(rng.uniform(-1, 1, 3) * size_gradient * np.array([1, 1, 0.5]))
        g = rng.uniform(0.01, 0.04) * np.exp(2j * rng.uniform(0, np.pi))
        return cls(band, seeing, tuple(float(s) for s in size), (g.real, g.imag),
                   tuple(float(s) for s in rng.uniform(-0.01, 0.01, 4)), family)

    def atmosphere(self, fx, fy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FWHM (arcsec) and shear (g1, g2) of the atmosphere at focal-plane positions."""
        fx, fy = np.asarray(fx, float), np.asarray(fy, float)
        a, b, c = self.size
        fwhm = self.seeing * (1 + a * fx + b * fy + c * (fx ** 2 + fy ** 2))
        d = self.g_grad
        return fwhm, self.g0[0] + d[0] * fx + d[1] * fy, self.g0[1] + d[2] * fx + d[3] * fy

    def profile(self, fx: float, fy: float) -> galsim.GSObject:
        """The PSF at one focal-plane position (without the pixel), in pixel units."""
        fwhm, g1, g2 = (float(v) for v in self.atmosphere(fx, fy))
        parts = [galsim.Kolmogorov(fwhm=fwhm / PIXEL_SCALE).shear(g1=g1, g2=g2)]
        if self.family == FAMILIES[0]:
            lam_over_diam = WAVELENGTH_NM[self.band] * 1e-9 / DIAMETER_M * 206264.806 / PIXEL_SCALE
            parts += [galsim.Airy(lam_over_diam=lam_over_diam, obscuration=OBSCURATION),
                      galsim.Gaussian(fwhm=CHARGE_DIFFUSION_FWHM / PIXEL_SCALE)]
        return galsim.Convolve(parts, gsparams=GSPARAMS)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PsfField:
        d = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def stamp_half(flux: float) -> int:
    """A faint star's stamp half-width (pixels): its wings beyond are below the sky's noise."""
    return 12 if flux < 1e3 else 24


def true_psf_moments(field: PsfField, cam: Camera, detector: int, x, y) -> Table:
    """The true PSF (pixel included) at CCD positions, measured as a fitter's residuals are:
    adaptive-moment size sigma (pixels) and distortion e1, e2 (galsim.hsm), of the noiseless
    image."""
    fx, fy = focal_plane(cam, detector, x, y)
    rows = []
    for px, py, u, v in zip(np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(fx),
                            np.atleast_1d(fy), strict=True):
        image = field.profile(u, v).drawImage(nx=48, ny=48, scale=1.0,
                                              offset=(px % 1 - 0.5, py % 1 - 0.5))
        m = image.FindAdaptiveMom()
        rows.append((m.moments_sigma, m.observed_shape.e1, m.observed_shape.e2))
    return Table(rows=rows, names=("sigma", "e1", "e2"), dtype=(float, float, float))


def make_galaxies(seed: int, ra: float, dec: float, half_w: float, half_h: float,
                  density: float, mag_bright: float = 18.0, mag_faint: float = 26.0,
                  slope: float = 0.35) -> Table:
    """Galaxies over a field (`half_w`, `half_h` in degrees), `density` per arcmin^2 brighter
    than r = `mag_faint`, counts rising `slope` dex/mag: bulge + disk, colours, sizes, shapes."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 5]))
    n = rng.poisson(density * 4 * half_w * half_h * 3600)
    field_wcs = tangent_wcs(ra, dec, (0.0, 0.0), 3600.0)   # 1 pixel = 1 degree
    gra, gdec = field_wcs.all_pix2world(rng.uniform(-half_w, half_w, n),
                                        rng.uniform(-half_h, half_h, n), 0)
    a, b = 10 ** (slope * mag_bright), 10 ** (slope * mag_faint)
    r = np.log10(a + rng.uniform(0, 1, n) * (b - a)) / slope
    gr = rng.uniform(0.3, 1.1, n)
    mags = {"u": r + gr + 0.5 + 0.6 * gr, "g": r + gr, "r": r, "i": r - 0.3 * gr,
            "z": r - 0.45 * gr, "y": r - 0.5 * gr}
    disk_hlr = np.clip(10 ** (-0.12 * (r - 21)) * rng.uniform(0.5, 1.2, n), 0.2, 1.5)
    t = Table({"id": np.arange(n, dtype=np.int64), "ra": gra, "dec": gdec})
    for band in BANDS:
        t[f"{band}_mag"] = mags[band]
    t["bulge_fraction"] = rng.uniform(0, 0.6, n) ** 2
    t["disk_hlr"] = disk_hlr                                  # arcsec
    t["bulge_hlr"] = disk_hlr * rng.uniform(0.2, 0.5, n)
    e = np.sqrt(rng.uniform(0, 0.5 ** 2, n)) * np.exp(2j * rng.uniform(0, np.pi, n))
    t["g1"], t["g2"] = e.real, e.imag                          # on the sky (east, north)
    return t


def local_jacobian(wcs: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d(east, north)/d(x, y) in arcsec per pixel at each position: [n, 2, 2]."""
    eps = 0.5
    ra0, dec0 = wcs.all_pix2world(x, y, 0)
    cosd = np.cos(np.radians(dec0))
    jac = np.empty((len(x), 2, 2))
    for k, (ddx, ddy) in enumerate(((eps, 0.0), (0.0, eps))):
        ra1, dec1 = wcs.all_pix2world(x + ddx, y + ddy, 0)
        dra = (ra1 - ra0 + 180) % 360 - 180
        jac[:, 0, k] = dra * cosd * 3600 / eps
        jac[:, 1, k] = (dec1 - dec0) * 3600 / eps
    return jac


def faint_galaxy(flux: float, hlr: float, g1: float, g2: float, jac: np.ndarray,
                 psf_sigma: float) -> galsim.GSObject:
    """A faint galaxy after the PSF and pixel, as the Gaussian of the same second moments
    (their covariances add): drawn in real space, 50x faster than an FFT."""
    g = np.hypot(g1, g2)
    shear = np.array([[1 + g1, g2], [g2, 1 - g1]]) / np.sqrt(1 - g * g)
    sky = (hlr / 1.1774) ** 2 * shear @ shear.T                       # arcsec^2, east-north
    to_pixels = np.linalg.inv(jac)
    cov = to_pixels @ sky @ to_pixels.T + psf_sigma ** 2 * np.eye(2)
    a = np.linalg.cholesky(cov)
    return galsim.Gaussian(sigma=1.0).transform(a[0, 0], a[0, 1], a[1, 0], a[1, 1]).withFlux(flux)


class SceneDrawer:
    """Draws a CCD's objects (electrons) with its visit's PSF field."""

    def __init__(self, field: PsfField, cam: Camera, detector: int, image: np.ndarray):
        self.field, self.cam, self.detector = field, cam, detector
        self.image = galsim.ImageD(image, xmin=0, ymin=0)   # shares `image`'s memory
        n = cam.ccd_size
        self.node_xy = (np.arange(NODES) + 0.5) * n / NODES - 0.5
        self._nodes: dict[tuple[int, int], galsim.GSObject] = {}

    def _at(self, x: float, y: float) -> galsim.GSObject:
        fx, fy = focal_plane(self.cam, self.detector, x, y)
        return self.field.profile(float(fx), float(fy))

    def _node(self, key: tuple[int, int]) -> tuple:
        """Node `key`'s PSF; it with the pixel as an interpolated image; that one's Gaussian-
        equivalent sigma (pixels); and the atmosphere there with its share of the PSF's second
        moments (fwhm, g1, g2, share). Drawn once per CCD."""
        if key not in self._nodes:
            xy = tuple(float(self.node_xy[k]) for k in key)
            psf = self._at(*xy)
            side = 4 * (2 * stamp_half(BRIGHT_E) + 1)      # a faint star's stamp, 4x sampled
            with_pixel = galsim.Convolve(psf, galsim.Pixel(1.0)).drawImage(
                nx=side, ny=side, scale=0.25, method="no_pixel")
            fwhm, g1, g2 = (float(v) for v in self.field.atmosphere(*focal_plane(
                self.cam, self.detector, *xy)))
            atmosphere = galsim.Kolmogorov(fwhm=fwhm / PIXEL_SCALE).drawImage(
                nx=side, ny=side, scale=0.25, method="no_pixel")
            sigma = with_pixel.FindAdaptiveMom().moments_sigma * 0.25
            share = (atmosphere.FindAdaptiveMom().moments_sigma * 0.25 / sigma) ** 2
            self._nodes[key] = (psf, galsim.InterpolatedImage(with_pixel, gsparams=GSPARAMS),
                                sigma, (fwhm, g1, g2, share))
        return self._nodes[key]

    def _placed(self, x: np.ndarray, y: np.ndarray) -> list[tuple]:
        """For each position, its nearest node's PSF (`_node`) and how to move that node's
        image there: the image dilated and sheared by the atmosphere's change from the node to
        the position, each scaled by the atmosphere's share of the PSF's second moments (the
        Airy, diffusion and pixel do not change). The PSF of every faint object then changes
        smoothly over the CCD, as the true one does, to first order in a change of < 1%
        within a node's cell. (The nearest node's PSF alone was a staircase of three steps,
        which a smooth model fits with 8/9 of the true gradient: a few mmag corner to
        corner.) Rows: (psf, image, (dilation, g1, g2), the moved image's sigma)."""
        x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
        keys = np.clip(np.round((np.column_stack([x, y]) + 0.5) * NODES / self.cam.ccd_size
                                - 0.5), 0, NODES - 1).astype(int)
        fwhm, g1, g2 = self.field.atmosphere(*focal_plane(self.cam, self.detector, x, y))
        rows = []
        for key, f, a, b in zip(keys, fwhm, g1, g2, strict=True):
            psf, image, sigma, (fwhm0, g10, g20, share) = self._node((int(key[0]), int(key[1])))
            scale = float(np.sqrt(1 + share * ((f / fwhm0) ** 2 - 1)))
            rows.append((psf, image, (scale, share * (a - g10), share * (b - g20)), sigma * scale))
        return rows

    def _add(self, obj: galsim.GSObject, x: float, y: float, half: int, method: str) -> None:
        ix, iy = int(np.round(x)), int(np.round(y))
        bounds = galsim.BoundsI(ix - half, ix + half, iy - half, iy + half)
        overlap = bounds & self.image.bounds
        if not overlap.isDefined():
            return
        stamp = galsim.ImageD(bounds, scale=1.0)
        obj.drawImage(image=stamp, method=method, offset=(x - ix, y - iy), add_to_image=False)
        self.image[overlap] += stamp[overlap]

    def add_stars(self, x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> None:
        """Point sources of total `flux` electrons."""
        bright = flux >= BRIGHT_E
        for px, py, f in zip(x[bright], y[bright], flux[bright], strict=True):
            self._add(self._at(px, py).withFlux(f), px, py, STAMP_BRIGHT, "auto")
        faint = ~bright
        for px, py, f, (_, image, (scale, g1, g2), _) in zip(
                x[faint], y[faint], flux[faint], self._placed(x[faint], y[faint]), strict=True):
            # scaled, not withFlux: the node image holds the PSF out to its edge, 0.4-0.8%
            # short of its total; withFlux put that into the core (+4-8 mmag a faint star)
            self._add(image.dilate(scale).shear(g1=g1, g2=g2).withScaledFlux(f), px, py,
                      stamp_half(f), "no_pixel")

    def add_galaxies(self, galaxies: Table, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                     jacobian: np.ndarray) -> None:
        """Bulge + disk galaxies of total `flux` electrons, each through its local Jacobian."""
        columns = [np.asarray(galaxies[c], float) for c in ("bulge_fraction", "bulge_hlr",
                                                            "disk_hlr", "g1", "g2")]
        for px, py, f, jac, bf, bulge, disk, g1, g2, (psf, _, _, psf_sigma) in zip(
                x, y, flux, jacobian, *columns, self._placed(x, y), strict=True):
            to_pixels = galsim.JacobianWCS(*jac.ravel())
            half = int(min(GALAXY_STAMP_HLR * disk / PIXEL_SCALE, 40)) + 8
            if f >= GALAXY_EXACT_E:
                sky = galsim.Add([galsim.DeVaucouleurs(half_light_radius=bulge, flux=bf),
                                  galsim.Exponential(half_light_radius=disk, flux=1 - bf)])
                obj = galsim.Convolve(to_pixels.toImage(sky.shear(g1=g1, g2=g2)), psf,
                                      gsparams=GALAXY_GSPARAMS)
                self._add(obj.withFlux(f), px, py, half, "auto")
            else:
                self._add(faint_galaxy(f, bf * bulge + (1 - bf) * disk, g1, g2, jac, psf_sigma),
                          px, py, min(half, 16), "no_pixel")
