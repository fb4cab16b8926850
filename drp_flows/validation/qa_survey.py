"""QA of step 7 at the campaign site: the survey-wide maps hold exactly the per-tract maps
that every site made, and their n_exposure and exposure time equal the truth footprint over the
whole skymap; the report carries step 7's whole-field plots and metrics table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from astropy.table import Table, vstack
from lsst.daf.butler import Butler

from drp_flows.sites.butler import open_dataset_file
from drp_flows.tasks.step7 import CONSOLIDATED, METRICS, SURVEY_PLOT
from drp_flows.validation.qa import FootprintTruth, check


@dataclass
class Step7QA:
    name = "step 7: survey-wide property maps"
    per_band: dict = field(default_factory=dict)
    metrics: Table = field(default_factory=Table)
    plots: dict = field(default_factory=dict)      # band -> PNG bytes

    def checks(self) -> list[dict]:
        if not self.per_band:
            return []
        p = {k: sum(b[k] for b in self.per_band.values())
             for k in ("pixels", "tract_pixels", "footprint_pixels", "exact_pixels")}
        bands = "".join(sorted(self.per_band))
        return [check(f"survey maps ({bands}): pixels = sum of the tract maps' ({p['tract_pixels']})",
                      p["pixels"], "pixels", f"= {p['tract_pixels']}", p["pixels"] == p["tract_pixels"]),
                check(f"survey n_exposure and exposure-time maps ({bands}) = truth footprint "
                      f"({p['footprint_pixels']} pixels)", 100 * p["exact_pixels"] / p["footprint_pixels"],
                      "% of pixels", ">= 99.5", p["exact_pixels"] >= 0.995 * p["footprint_pixels"])]

    def details(self) -> str:
        if not self.per_band:
            return ""
        lines = ["Per band:", "", "| band | pixels | exact vs truth |", "|---|---:|---:|"]
        lines += [f"| {b} | {p['pixels']} | {100 * p['exact_pixels'] / p['footprint_pixels']:.2f}% |"
                  for b, p in sorted(self.per_band.items())]
        if len(self.metrics):
            lines += ["", "Metrics table (`property_map_metrics`):", "",
                      "| band | property | area (deg2) | median | 5% | 95% |",
                      "|---|---|---:|---:|---:|---:|"]
            lines += [f"| {r['band']} | {r['property']} | {r['area_deg2']:.4f} | {r['median']:.3f} | "
                      f"{r['p05']:.3f} | {r['p95']:.3f} |" for r in self.metrics]
        return "\n".join(lines)

    def summary(self) -> dict:
        return {"per_band": self.per_band,
                "metrics": [dict(zip(self.metrics.colnames, r, strict=True)) for r in self.metrics]}

    def plot(self, plt, out: Path) -> list[str]:
        names = []
        for band, png in sorted(self.plots.items()):
            name = f"step7_survey_maps_{band}.png"
            (out / name).write_bytes(png)
            names.append(name)
        return names


def step7_qa(butler: Butler, collection: str, survey: Path) -> Step7QA:
    """QA of the survey-wide maps at the campaign site."""
    qa = Step7QA()
    registry = butler.registry
    nexp_type = "deep_coadd_n_exposure_map_sum"
    refs = list(registry.queryDatasets(CONSOLIDATED[nexp_type], collections=collection, findFirst=True))
    if not refs:
        return qa
    truth = FootprintTruth(butler, collection, survey)
    tables = []
    for ref in refs:
        band = ref.dataId["band"]
        nexp = butler.get(ref)
        exptime = butler.get(CONSOLIDATED["deep_coadd_exposure_time_map_sum"], dataId=ref.dataId,
                             collections=collection)
        tract_pixels = sum(len(butler.get(r).valid_pixels) for r in registry.queryDatasets(
            nexp_type, collections=collection, findFirst=True, band=band))
        n, good_n, good_t = truth.exact(nexp, exptime, band)
        qa.per_band[band] = {"pixels": len(nexp.valid_pixels), "tract_pixels": tract_pixels,
                             "footprint_pixels": n, "exact_pixels": min(good_n, good_t)}
        metrics = butler.get(METRICS, dataId=ref.dataId, collections=collection)
        metrics["band"] = band
        tables.append(metrics)
        plot = butler.find_dataset(SURVEY_PLOT, ref.dataId, collections=collection)
        with open_dataset_file(butler, plot) as f:
            qa.plots[band] = f.read()
    qa.metrics = vstack(tables)
    return qa
