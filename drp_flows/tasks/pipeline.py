"""The pipeline: one row per task label, in the order the campaign runs them. A row says
where the label runs (stage and scope), what its quanta are (dimensions), what each reads and
how its inputs relate to it, what it writes, its run function and its resources; the engine's
one planner (engine/pipeline.py) plans every label from its row. A new step is a run function
and a row here.

Each label declares its first memory request (a quantum that dies of memory is retried with
more, engine/executor.py) and its class: `long` labels run on the site's long-quantum cluster
when it has one. The requests are the peaks measured in the 1024-px demo (under 0.8 GB,
subtractImages and drpDiaCalculation under 1.2 GB), rounded up; a campaign can start from an
earlier one's measured peaks instead (`memory_from`).
"""

from __future__ import annotations

from drp_flows.datamodel import REFCAT
from drp_flows.engine.pipeline import CALIBRATION, EACH, OF_DRIVER, OVERLAP, Input, Label
from drp_flows.tasks import step1, step2, step3, step4, step5, step7

PIPELINE = [
    Label(step1.CALIBRATE, "step1", "stage1", "visit", ("visit", "detector"),
          (Input("raw"), Input("bias", CALIBRATION), Input("dark", CALIBRATION),
           Input("flat", CALIBRATION), Input(REFCAT, OVERLAP, "refcat", region=("visit",))),
          ("preliminary_visit_image", "single_visit_star_unstandardized"),
          step1.calibrate_image, cluster_by=("visit",)),
    Label(step1.CONSOLIDATE, "step1", "stage1", "visit", ("visit",),
          (Input("preliminary_visit_image", EACH),
           Input("single_visit_star_unstandardized", EACH, required=False)),
          ("single_visit_star", "preliminary_visit_summary"), step1.consolidate_visit),
    Label(step1.ASSOCIATE, "step1", "stage1", "tract", ("tract",),
          (Input("single_visit_star", OVERLAP),),
          ("isolated_star", "isolated_star_source"), step1.associate_isolated_stars),
    Label(step2.FIT_CYCLE, "step2", "global", "campaign", (),
          (Input("isolated_star_source", EACH), Input("preliminary_visit_summary", EACH),
           Input(REFCAT, EACH, "refcat")),
          ("fgcm_zeropoints", "fgcm_standard_star"), step2.run_fit_cycle, pool="long"),
    Label(step2.OUTPUT_PRODUCTS, "step2", "global", "campaign", ("visit",),
          (Input("preliminary_visit_summary"), Input("fgcm_zeropoints")),
          ("fgcm_photo_calib",), step2.run_output_products),
    Label(step2.UPDATE_VISIT_SUMMARY, "step2", "stage2", "visit", ("visit",),
          (Input("preliminary_visit_summary"), Input("single_visit_star"),
           Input("fgcm_photo_calib")),
          ("visit_summary", "recalibrated_star"), step2.run_update_visit_summary),
    Label(step3.ASSEMBLE_COADD, "step3", "stage3", "tract", ("tract", "patch", "band"),
          (Input("preliminary_visit_image", OVERLAP, exact=step3.warp_region),
           Input("visit_summary", OF_DRIVER)),
          ("deep_coadd", "template_coadd"), step3.assemble_coadd, pool="long"),
    Label(step3.PROPERTY_MAPS, "step3", "stage3", "tract", ("tract", "band"),
          (Input("preliminary_visit_image", OVERLAP, exact=step3.footprint_region),
           Input("visit_summary", OF_DRIVER)),
          step3.MAP_TYPES, step3.healsparse_property_maps),
    Label(step3.WRITE_OBJECT_TABLE, "step3", "stage3", "tract", ("tract", "patch"),
          (Input("deep_coadd", EACH),), ("object_patch",), step3.write_object_table),
    Label(step3.CONSOLIDATE_OBJECT_TABLE, "step3", "stage3", "tract", ("tract",),
          (Input("object_patch", EACH),), ("object",), step3.consolidate_object_table),
    Label(step4.SUBTRACT, "step4", "stage4", "visit", ("visit", "detector"),
          (Input("preliminary_visit_image"), Input("visit_summary"),
           Input("template_coadd", OVERLAP)),
          step4.OUTPUTS, step4.subtract_and_detect, cluster_by=("visit",), memory="1.5GB",
          adjust=step4.usable_templates),
    Label(step5.CONSOLIDATE, "step5", "stage4", "visit", ("visit",),
          (Input("dia_source_detector", EACH),), ("dia_source_visit",),
          step5.consolidate_dia_sources),
    Label(step5.ASSOCIATE, "step5", "stage4", "tract", ("tract",),
          (Input("dia_source_visit", OVERLAP),), ("dia_source",), step5.associate_tract),
    Label(step5.DIA_CALCULATION, "step5", "stage4", "tract", ("tract",),
          (Input("dia_source"), Input("difference_image", OVERLAP),
           Input("object", required=False)),
          ("dia_object", "dia_object_forced_source"), step5.dia_calculation, pool="long",
          memory="1.5GB"),
    Label(step5.LINK, "step5", "final", "campaign", (), (Input("dia_source", EACH),),
          ("ss_object", "ss_source"), step5.link_solar_system_objects),
    Label(step7.CONSOLIDATE_MAPS, "step7", "final", "campaign", ("band",),
          tuple(Input(m, EACH) for m in step7.CONSOLIDATED), tuple(step7.CONSOLIDATED.values()),
          step7.consolidate_maps),
    Label(step7.PLOT_MAPS, "step7", "final", "campaign", ("band",),
          tuple(Input(m) for m in step7.CONSOLIDATED.values()),
          (step7.SURVEY_PLOT, step7.METRICS), step7.plot_maps),
]

LABELS = {label.name: label for label in PIPELINE}

# What each stage runs, by scope, in the table's order. A scope says what a group of the stage
# is: a range of visits, of the site's tracts, or (at the campaign site) the whole campaign.
STAGES: dict[str, dict[str, list[str]]] = {}
for _label in PIPELINE:
    STAGES.setdefault(_label.stage, {}).setdefault(_label.scope, []).append(_label.name)
