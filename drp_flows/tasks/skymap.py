"""A mini skymap: a grid of small tracts, each a TAN projection cut into patches.

Rubin's skymaps (ring-based, ~1.7 deg tracts) are far larger than the simulated field, so the
mini skymap scales the same structure down: tracts laid on a grid in the tangent plane of the
field centre, each with its own TAN WCS at the coadd pixel scale, and nx x ny patches per tract.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

SKYMAP_NAME = "mini_skymap"


def tangent_wcs(ra: float, dec: float, crpix: tuple[float, float], scale_arcsec: float,
                rotation_deg: float = 0.0) -> WCS:
    """A TAN WCS with north up and east left at rotation 0 (0-based crpix)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [crpix[0] + 1, crpix[1] + 1]
    s = scale_arcsec / 3600.0
    c, n = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    w.wcs.cd = np.array([[-s * c, s * n], [s * n, s * c]])
    return w


def header_wcs(header: fits.Header) -> WCS:
    """The celestial WCS of a header, also of a primary header that has no image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header, naxis=2)


def sky_polygon(wcs: WCS, x: np.ndarray, y: np.ndarray) -> ConvexPolygon:
    """The convex sky region with the given pixel corners (0-based)."""
    ra, dec = wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    return ConvexPolygon.convexHull(
        [UnitVector3d(LonLat.fromDegrees(float(r), float(d))) for r, d in zip(ra, dec, strict=True)])


def inset_polygon(polygon: ConvexPolygon, arcsec: float) -> ConvexPolygon:
    """A small convex polygon with its corners moved `arcsec` inwards along both edges (the
    diagonal of a square corner), as the part of a CCD a sliver overlap does not reach."""
    vertices = [np.array([v.x(), v.y(), v.z()]) for v in polygon.getVertices()]
    centre = np.mean(vertices, axis=0)
    step = np.radians(arcsec / 3600) * np.sqrt(2)
    moved = []
    for v in vertices:
        towards = (centre - v) / np.linalg.norm(centre - v)
        u = v + towards * step
        moved.append(UnitVector3d(*(u / np.linalg.norm(u))))
    return ConvexPolygon(moved)


def box_polygon(wcs: WCS, x0: float, y0: float, x1: float, y1: float) -> ConvexPolygon:
    return sky_polygon(wcs, np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]))


@dataclass(frozen=True)
class MiniSkymap:
    ra: float
    dec: float
    tract_pixels: int          # tract side, coadd pixels
    n_cols: int = 3
    n_rows: int = 2
    patches_per_side: int = 2
    pixel_scale: float = 0.2   # arcsec
    name: str = SKYMAP_NAME

    @property
    def tracts(self) -> range:
        return range(self.n_cols * self.n_rows)

    @property
    def patch_pixels(self) -> int:
        return self.tract_pixels // self.patches_per_side

    @cached_property
    def _field_wcs(self) -> WCS:
        return tangent_wcs(self.ra, self.dec, (0.0, 0.0), self.pixel_scale)

    def tract_center(self, tract: int) -> tuple[float, float]:
        row, col = divmod(tract, self.n_cols)
        x = (col - (self.n_cols - 1) / 2) * self.tract_pixels
        y = (row - (self.n_rows - 1) / 2) * self.tract_pixels
        ra, dec = self._field_wcs.all_pix2world([x], [y], 0)
        return float(ra[0]), float(dec[0])

    def tract_wcs(self, tract: int) -> WCS:
        c = (self.tract_pixels - 1) / 2
        return tangent_wcs(*self.tract_center(tract), (c, c), self.pixel_scale)

    def tract_region(self, tract: int) -> ConvexPolygon:
        n = self.tract_pixels
        return box_polygon(self.tract_wcs(tract), -0.5, -0.5, n - 0.5, n - 0.5)

    def patch_bbox(self, patch: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a patch in tract pixels, end exclusive."""
        py, px = divmod(patch, self.patches_per_side)
        p = self.patch_pixels
        return px * p, py * p, (px + 1) * p, (py + 1) * p

    def patch_region(self, tract: int, patch: int) -> ConvexPolygon:
        x0, y0, x1, y1 = self.patch_bbox(patch)
        return box_polygon(self.tract_wcs(tract), x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5)

    def tract_of(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Tract whose inner box holds each position (-1 outside the skymap)."""
        x, y = self._field_wcs.all_world2pix(np.atleast_1d(ra), np.atleast_1d(dec), 0)
        col = np.floor(x / self.tract_pixels + self.n_cols / 2).astype(int)
        row = np.floor(y / self.tract_pixels + self.n_rows / 2).astype(int)
        inside = (col >= 0) & (col < self.n_cols) & (row >= 0) & (row < self.n_rows)
        return np.where(inside, row * self.n_cols + col, -1)

    def to_dict(self) -> dict:
        return {"ra": self.ra, "dec": self.dec, "tract_pixels": self.tract_pixels,
                "n_cols": self.n_cols, "n_rows": self.n_rows,
                "patches_per_side": self.patches_per_side, "pixel_scale": self.pixel_scale,
                "name": self.name}
