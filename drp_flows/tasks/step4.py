"""Step 4 as quanta: per (visit, detector), the template from the overlapping template coadds,
the difference image and its DIA sources (Rubin's buildTemplate, subtractImages and
detectAndMeasureDiaSource, which BPS clusters into one job per detector).

A visit is never differenced against a template it is part of: with templates of a few visits
its own noise and transients would cancel. Patches whose template holds the visit are left
out of its template (their pixels are NO_DATA in the difference); a CCD whose every template
holds its visit gets no quantum.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.ndimage import binary_erosion

from drp_flows.engine.pipeline import Blocked
from drp_flows.engine.quanta import OutputWriter, Quantum, reading
from drp_flows.sites.storage import Storage
from drp_flows.tasks.camera import PIXEL_SCALE
from drp_flows.tasks.catalogs import table_bytes
from drp_flows.tasks.coadd import njy_scale, warp
from drp_flows.tasks.diffim import (
    KERNEL_SIZE,
    MIN_TEMPLATE_COVERAGE,
    Template,
    detect_dia_sources,
    flag_star_residuals,
    no_dia_sources,
    subtract_images,
)
from drp_flows.tasks.images import Exposure, bit, read_fits
from drp_flows.tasks.skymap import MiniSkymap, header_wcs
from drp_flows.tasks.step3 import box_wcs, summary_rows

SUBTRACT = "subtractImages"
OUTPUTS = ("difference_image", "dia_source_detector")


@lru_cache(maxsize=1024)
def summary_detectors(storage: Storage, uri: str) -> frozenset[int]:
    """The detectors with a row in a final visit summary (read once, and only for CCDs still
    to do)."""
    return frozenset(summary_rows(storage, uri)[1])


@lru_cache(maxsize=1024)
def template_visits(storage: Storage, uri: str) -> frozenset[int]:
    """The visits a template coadd was made of (its primary header)."""
    with reading(uri), storage.open(uri, "rb") as f:
        return frozenset(int(v) for v in fits.getheader(f, 0)["VISITS"].split())


def usable_templates(storage: Storage, data_id: dict, inputs: dict) -> dict | None:
    """The pipeline's adjust of a CCD's quantum: its overlapping templates less those made
    from its own visit (none left: nothing to difference against, no quantum); blocked when
    its final visit summary has no row for it (a CCD rescued after its visit was
    consolidated)."""
    visit = data_id["visit"]
    if data_id["detector"] not in summary_detectors(storage, inputs["visit_summary"]):
        raise Blocked(f"visit {visit}'s summary has no detector {data_id['detector']}")
    usable = [t for t in inputs["template_coadd"] if visit not in template_visits(storage, t)]
    return inputs | {"template_coadd": usable} if usable else None


def build_template(templates: list[Exposure], sky: MiniSkymap, wcs: WCS,
                   shape: tuple[int, int], pad: int = KERNEL_SIZE // 2) -> Template:
    """The template on a CCD's pixel grid grown by `pad` on every side (the matching kernel's
    reach): per tract, its patches pasted into one image on the tract projection and warped
    once (no seams between patches); the first tract to cover a pixel wins. Two pixels at
    every template edge are dropped: cubic resampling blends them with the empty side.
    Patches are pasted in patch order, whatever order the quantum lists them in: where two
    overlap the later one's pixels win, and they differ in the last bits."""
    header = wcs.to_header(relax=True)          # through the header: SIP keeps its own CRPIX
    header["CRPIX1"] += pad
    header["CRPIX2"] += pad
    wcs = header_wcs(header)
    shape = (shape[0] + 2 * pad, shape[1] + 2 * pad)
    image, variance, valid = np.zeros(shape), np.zeros(shape), np.zeros(shape, bool)
    for tract in sorted({int(t.metadata["TRACT"]) for t in templates}):
        patches = sorted((t for t in templates if int(t.metadata["TRACT"]) == tract),
                         key=lambda t: int(t.metadata["PATCH"]))
        boxes = [sky.patch_bbox(int(t.metadata["PATCH"])) for t in patches]
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        m_image, m_var = np.zeros((y1 - y0, x1 - x0)), np.zeros((y1 - y0, x1 - x0))
        m_mask = np.full((y1 - y0, x1 - x0), bit("NO_DATA"), np.int32)
        for t, (bx0, by0, bx1, by1) in zip(patches, boxes, strict=True):
            box = (slice(by0 - y0, by1 - y0), slice(bx0 - x0, bx1 - x0))
            covered = np.isfinite(t.variance)
            m_image[box] = np.where(covered, t.image, 0.0)
            m_var[box] = np.where(covered, t.variance, 0.0)
            m_mask[box] = t.mask
        w = warp(Exposure(m_image, m_var, m_mask, box_wcs(sky, tract, x0, y0)), 1.0, wcs, shape)
        if w is None:
            continue
        good = binary_erosion(w.valid, iterations=2, border_value=1) & ~valid[w.y, w.x]
        image[w.y, w.x][good] = w.image[good]
        variance[w.y, w.x][good] = w.variance[good]
        valid[w.y, w.x] |= good
    return Template(image, variance, valid, pad)


def subtract_and_detect(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """Template, difference image and DIA sources of one CCD, in nJy (runs on a worker)."""
    exp = Exposure.from_hdulist(read_fits(storage, quantum.inputs["preliminary_visit_image"]))
    visit, detector = quantum.data_id["visit"], quantum.data_id["detector"]
    row = summary_rows(storage, quantum.inputs["visit_summary"])[1][detector]
    scale = njy_scale(row["zero_point"])
    fwhm_px = float(row["psf_fwhm"]) / PIXEL_SCALE
    templates = [Exposure.from_hdulist(read_fits(storage, u)) for u in quantum.inputs["template_coadd"]]
    used = sorted({int(v) for t in templates for v in t.metadata["VISITS"].split()})
    if visit in used:
        raise ValueError(f"{quantum}: a template holds visit {visit} itself")
    template = build_template(templates, MiniSkymap(**config["skymap"]), exp.wcs, exp.image.shape)
    science = Exposure(exp.image * scale, exp.variance * scale ** 2, exp.mask, exp.wcs, exp.metadata,
                       psf=exp.psf)
    covered = template.valid[template.inner].mean()
    if covered < MIN_TEMPLATE_COVERAGE:
        # the regions overlapped by a sliver: an all-NO_DATA difference and no sources, so
        # the quantum counts as done (and a re-run skips it) and nothing is pretended
        diff = Exposure(np.zeros_like(science.image), np.full(science.image.shape, np.inf),
                        science.mask | bit("NO_DATA"), exp.wcs, exp.metadata.copy())
        diff.metadata["NOTEMPL"] = (f"templates cover {100 * covered:.1f}% of the CCD", "")
        sources = no_dia_sources()
    else:
        d = subtract_images(science, template, fwhm_px)
        diff = d.exposure
        sources = flag_star_residuals(detect_dia_sources(d), science, fwhm_px)
        diff.metadata["ERRSCALE"] = (sources.meta["error_scale"],
                                     "PSF-flux error / variance-plane error")
        diff.metadata["NOISEXS"] = (sources.meta["noise_excess"],
                                    "PSF-scale noise / propagated noise")
    diff.metadata["TMPLVIS"] = (" ".join(map(str, used)), "visits of the template")
    ra, dec = exp.wcs.all_pix2world(np.asarray(sources["x"]), np.asarray(sources["y"]), 0)
    n = len(sources)
    ids = (visit * 100 + detector) * 10000 + np.arange(n, dtype=np.int64)
    sources = Table({"dia_source_id": ids, "visit": np.full(n, visit, np.int64),
                     "detector": np.full(n, detector, np.int32),
                     "band": np.full(n, exp.metadata["BAND"]),
                     "mjd": np.full(n, float(exp.metadata["MJD-OBS"])), "ra": ra, "dec": dec}
                    | {c: sources[c] for c in sources.colnames})
    out.write("difference_image", diff.to_bytes())
    out.write("dia_source_detector", table_bytes(sources))
