"""The data model shared by every site: dataset types (Rubin DRP v2 names) and collections.

The same names exist in every site's repository, so a dataset means the same thing wherever it
is. Images are FITS (`FitsHDUList`: IMAGE, MASK, VARIANCE HDUs with a WCS header), catalogs
Parquet (`ArrowAstropy`), small structures YAML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from drp_flows.errors import InputError
from drp_flows.tasks.camera import INSTRUMENT

# the survey property maps (healSparsePropertyMaps), as Rubin names them: deep_coadd_<name>
PROPERTY_MAPS = ("n_exposure_map_sum", "exposure_time_map_sum", "psf_size_map_weighted_mean",
                 "psf_maglim_map_weighted_mean")


@dataclass(frozen=True)
class DatasetTypeSpec:
    name: str
    dimensions: tuple[str, ...]
    storage_class: str
    is_calibration: bool = False

    @property
    def extension(self) -> str:
        return {"FitsHDUList": ".fits", "ArrowAstropy": ".parq", "HealSparseMap": ".hsp",
                "Plot": ".png"}.get(self.storage_class, ".yaml")


DATASET_TYPES = {d.name: d for d in [
    DatasetTypeSpec("raw", ("instrument", "exposure", "detector"), "FitsHDUList"),
    DatasetTypeSpec("camera", ("instrument",), "StructuredDataDict", is_calibration=True),
    DatasetTypeSpec("bias", ("instrument", "detector"), "FitsHDUList", is_calibration=True),
    DatasetTypeSpec("dark", ("instrument", "detector"), "FitsHDUList", is_calibration=True),
    DatasetTypeSpec("flat", ("instrument", "detector", "physical_filter"), "FitsHDUList",
                    is_calibration=True),
    DatasetTypeSpec("the_monster_sim", ("htm7",), "ArrowAstropy"),
    DatasetTypeSpec("skyMap", ("skymap",), "StructuredDataDict"),
    DatasetTypeSpec("preliminary_visit_image", ("instrument", "visit", "detector"), "FitsHDUList"),
    DatasetTypeSpec("single_visit_star_unstandardized", ("instrument", "visit", "detector"),
                    "ArrowAstropy"),
    DatasetTypeSpec("single_visit_star", ("instrument", "visit"), "ArrowAstropy"),
    DatasetTypeSpec("preliminary_visit_summary", ("instrument", "visit"), "ArrowAstropy"),
    DatasetTypeSpec("isolated_star", ("skymap", "tract"), "ArrowAstropy"),
    DatasetTypeSpec("isolated_star_source", ("skymap", "tract"), "ArrowAstropy"),
    DatasetTypeSpec("fgcm_zeropoints", ("instrument",), "ArrowAstropy"),
    DatasetTypeSpec("fgcm_standard_star", ("instrument",), "ArrowAstropy"),
    DatasetTypeSpec("fgcm_photo_calib", ("instrument", "visit"), "ArrowAstropy"),
    DatasetTypeSpec("visit_summary", ("instrument", "visit"), "ArrowAstropy"),
    DatasetTypeSpec("recalibrated_star", ("instrument", "visit"), "ArrowAstropy"),
    DatasetTypeSpec("deep_coadd", ("skymap", "tract", "patch", "band"), "FitsHDUList"),
    DatasetTypeSpec("template_coadd", ("skymap", "tract", "patch", "band"), "FitsHDUList"),
    DatasetTypeSpec("object_patch", ("skymap", "tract", "patch"), "ArrowAstropy"),
    DatasetTypeSpec("object", ("skymap", "tract"), "ArrowAstropy"),
    DatasetTypeSpec("difference_image", ("instrument", "visit", "detector"), "FitsHDUList"),
    DatasetTypeSpec("dia_source_detector", ("instrument", "visit", "detector"), "ArrowAstropy"),
    DatasetTypeSpec("dia_source_visit", ("instrument", "visit"), "ArrowAstropy"),
    DatasetTypeSpec("dia_source", ("skymap", "tract"), "ArrowAstropy"),
    DatasetTypeSpec("dia_object", ("skymap", "tract"), "ArrowAstropy"),
    DatasetTypeSpec("dia_object_forced_source", ("skymap", "tract"), "ArrowAstropy"),
    DatasetTypeSpec("ss_object", ("instrument",), "ArrowAstropy"),
    DatasetTypeSpec("ss_source", ("instrument",), "ArrowAstropy"),
    *[DatasetTypeSpec(f"deep_coadd_{name}", ("skymap", "tract", "band"), "HealSparseMap")
      for name in PROPERTY_MAPS],
    *[DatasetTypeSpec(f"deep_coadd_{name.replace('_map_', '_consolidated_map_')}", ("skymap", "band"),
                      "HealSparseMap") for name in PROPERTY_MAPS],
    DatasetTypeSpec("deep_coadd_property_map_survey_plot", ("skymap", "band"), "Plot"),
    DatasetTypeSpec("property_map_metrics", ("skymap", "band"), "ArrowAstropy"),
]}

REFCAT = "the_monster_sim"
RAW_RUN = f"{INSTRUMENT}/raw/all"
CALIB_RUN = f"{INSTRUMENT}/calib/run"
CALIB_COLLECTION = f"{INSTRUMENT}/calib"
REFCAT_RUN = f"refcats/{REFCAT}"
SKYMAP_RUN = "skymaps"
DEFAULTS = f"{INSTRUMENT}/defaults"


CAMPAIGNS = f"{INSTRUMENT}/runs/"      # every campaign's chain is named under it
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def checked_name(kind: str, name: str) -> str:
    """A campaign's or group's name, refused unless it is 1-64 letters, digits, '_', '.' and
    '-', starting with a letter or digit: it names collections and folders, so it must not
    hold '/', '..', glob or query characters."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InputError(f"{kind} name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return name


def campaign_collection(campaign: str) -> str:
    return CAMPAIGNS + checked_name("campaign", campaign)


def group_run(campaign: str, step: str, group: str, attempt: int) -> str:
    """RUN collection of one group attempt: <instrument>/runs/<campaign>/<step>/<group>/<attempt>."""
    return f"{campaign_collection(campaign)}/{step}/{checked_name('group', group)}/{attempt}"
