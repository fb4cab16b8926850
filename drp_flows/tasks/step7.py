"""Step 7 at the campaign site, per band: the survey-wide property maps from every site's
per-tract maps (consolidateHealSparsePropertyMaps), and their whole-field plot with a metrics
table (plotPropertyMapSurvey: area, and the median and 5-95% range of every property)."""

from __future__ import annotations

import io

import healsparse as hsp
import hpgeom
import numpy as np
from astropy.table import Table

from drp_flows.datamodel import PROPERTY_MAPS
from drp_flows.engine.quanta import OutputWriter, Quantum
from drp_flows.sites.storage import Storage
from drp_flows.tasks.catalogs import table_bytes
from drp_flows.tasks.property_maps import NSIDE, NSIDE_COVERAGE, map_bytes, read_map

CONSOLIDATE_MAPS = "consolidateHealSparsePropertyMaps"
PLOT_MAPS = "plotPropertyMapSurvey"
# per-tract map -> its survey-wide consolidation, as Rubin names them
CONSOLIDATED = {f"deep_coadd_{m}": f"deep_coadd_{m.replace('_map_', '_consolidated_map_')}"
                for m in PROPERTY_MAPS}
SURVEY_PLOT = "deep_coadd_property_map_survey_plot"
METRICS = "property_map_metrics"
LABELS = {"n_exposure": "number of exposures", "exposure_time": "exposure time (s)",
          "psf_size": "PSF FWHM (arcsec)", "psf_maglim": "5-sigma depth (mag)"}


def consolidate(maps: list[hsp.HealSparseMap]) -> hsp.HealSparseMap:
    """The union of per-tract maps; they are disjoint (each keeps the pixels centred in its
    tract), so no pixel is written twice."""
    out = hsp.HealSparseMap.make_empty(NSIDE_COVERAGE, NSIDE, np.float64)
    for m in maps:
        pix = m.valid_pixels
        if np.any(out.get_values_pix(pix) > hpgeom.UNSEEN):
            raise ValueError("per-tract property maps overlap: a pixel belongs to two tracts")
        out.update_values_pix(pix, m.get_values_pix(pix))
    return out


def consolidate_maps(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """Every property's survey-wide map of one band (runs on a worker)."""
    for tract_type, survey_type in CONSOLIDATED.items():
        out.write(survey_type, map_bytes(consolidate([read_map(storage, u)
                                                      for u in quantum.inputs[tract_type]])))


def property_metrics(maps: dict[str, hsp.HealSparseMap]) -> Table:
    """A row per property: the area it covers, its median and 5-95% range."""
    rows = []
    for survey_type, m in maps.items():
        values = m.get_values_pix(m.valid_pixels)
        rows.append({"property": _short(survey_type),
                     "area_deg2": len(values) * hpgeom.nside_to_pixel_area(NSIDE),
                     "median": float(np.median(values)), "p05": float(np.percentile(values, 5)),
                     "p95": float(np.percentile(values, 95))})
    return Table(rows=rows)


def _short(survey_type: str) -> str:
    return survey_type.removeprefix("deep_coadd_").split("_consolidated_map_")[0]


def survey_plot(maps: dict[str, hsp.HealSparseMap], band: str) -> bytes:
    """The whole field in every property, one panel each (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 3.6), squeeze=False)
    for ax, (survey_type, m) in zip(axes[0], maps.items(), strict=True):
        pix = m.valid_pixels
        ra, dec = hpgeom.pixel_to_angle(NSIDE, pix)
        sc = ax.scatter(ra, dec, c=m.get_values_pix(pix), s=2, marker="s", linewidths=0)
        fig.colorbar(sc, ax=ax, shrink=0.8)
        ax.invert_xaxis()
        ax.set(title=f"{band}: {LABELS.get(_short(survey_type), _short(survey_type))}",
               xlabel="RA (deg)", ylabel="Dec (deg)", aspect=1 / np.cos(np.radians(np.median(dec))))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def plot_maps(quantum: Quantum, storage: Storage, out: OutputWriter, config: dict) -> None:
    """Whole-field plot and metrics of one band's survey maps (runs on a worker)."""
    maps = {name: read_map(storage, uri) for name, uri in quantum.inputs.items()}
    band = quantum.data_id["band"]
    out.write(SURVEY_PLOT, survey_plot(maps, band))
    metrics = property_metrics(maps)
    metrics.meta = {"band": band}
    out.write(METRICS, table_bytes(metrics))
