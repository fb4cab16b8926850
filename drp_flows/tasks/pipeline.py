"""The pipeline: every task label with its step, quantum function, planner, clustering and
resources.

A planner turns a group's data IDs into quanta against the site Butler (skipping what is
registered, marking blocked what lacks inputs); the quantum function runs on a Dask worker.
Each label declares its first memory request (a quantum that dies of memory is retried with
more, engine/executor.py) and its class: `long` labels run on the site's long-quantum cluster
when it has one. The requests are the peaks measured in the 1024-px demo (under 0.8 GB, subtractImages and
drpDiaCalculation under 1.2 GB), rounded up; a campaign can start from an earlier one's
measured peaks instead (`memory_from`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from drp_flows.engine.quanta import StepFunction
from drp_flows.tasks import step1, step2, step3, step4, step5, step7

Planner = Callable[..., tuple[list, int, list[dict]]]


@dataclass(frozen=True)
class Label:
    step: str
    run: StepFunction
    plan: Planner
    cluster_by: tuple[str, ...] = ()     # BPS-style clustering dimensions
    pool: str = "short"                  # the class: short, or long (the long_cluster)
    memory: str = "1GB"                  # the first memory request of a quantum


LABELS = {
    step1.CALIBRATE: Label("step1", step1.calibrate_image, step1.plan_calibrate, ("visit",)),
    step1.CONSOLIDATE: Label("step1", step1.consolidate_visit, step1.plan_consolidate),
    step1.ASSOCIATE: Label("step1", step1.associate_isolated_stars, step1.plan_associate),
    step2.FIT_CYCLE: Label("step2", step2.run_fit_cycle, step2.plan_fit_cycle, pool="long"),
    step2.OUTPUT_PRODUCTS: Label("step2", step2.run_output_products, step2.plan_output_products),
    step2.UPDATE_VISIT_SUMMARY: Label("step2", step2.run_update_visit_summary,
                                      step2.plan_update_visit_summary),
    step3.ASSEMBLE_COADD: Label("step3", step3.assemble_coadd, step3.plan_assemble_coadd, pool="long"),
    step3.PROPERTY_MAPS: Label("step3", step3.healsparse_property_maps, step3.plan_property_maps),
    step3.WRITE_OBJECT_TABLE: Label("step3", step3.write_object_table, step3.plan_write_object_table),
    step3.CONSOLIDATE_OBJECT_TABLE: Label("step3", step3.consolidate_object_table,
                                          step3.plan_consolidate_object_table),
    step4.SUBTRACT: Label("step4", step4.subtract_and_detect, step4.plan_subtract, ("visit",),
                          memory="1.5GB"),
    step5.CONSOLIDATE: Label("step5", step5.consolidate_dia_sources, step5.plan_consolidate),
    step5.ASSOCIATE: Label("step5", step5.associate_tract, step5.plan_associate),
    step5.DIA_CALCULATION: Label("step5", step5.dia_calculation, step5.plan_dia_calculation,
                                 pool="long", memory="1.5GB"),
    step5.LINK: Label("step5", step5.link_solar_system_objects, step5.plan_link),
    step7.CONSOLIDATE_MAPS: Label("step7", step7.consolidate_maps, step7.plan_consolidate_maps),
    step7.PLOT_MAPS: Label("step7", step7.plot_maps, step7.plan_plot_maps),
}
