"""The pipeline table: rows that cannot be planned are refused when the table is built, and
the stages run the table's labels in its order."""

import pytest

from drp_flows.engine.pipeline import CALIBRATION, EACH, OF_DRIVER, OVERLAP, SAME, Input, Label
from drp_flows.tasks.pipeline import LABELS, PIPELINE, STAGES


def row(*inputs, dims=("visit",), scope="visit"):
    return Label("aLabel", "step1", "stage1", scope, dims, inputs, ("visit_summary",),
                 run=lambda *a: None)


@pytest.mark.parametrize("inputs, dims, wrong", [
    ((Input("preliminary_visit_image", SAME),), ("visit",), "cannot be 'same'"),
    ((Input("visit_summary", EACH),), ("visit", "detector"), "cannot be 'each'"),
    ((Input("visit_summary", OF_DRIVER),), ("visit",), "first input cannot be 'of driver'"),
    ((Input("bias", CALIBRATION),), ("visit", "detector"), "first input cannot be 'calibration'"),
    ((), ("visit",), "need a first input"),
])
def test_rows_that_cannot_be_planned_are_refused(inputs, dims, wrong):
    with pytest.raises(ValueError, match=wrong):
        row(*inputs, dims=dims)


def test_a_relation_must_be_known():
    with pytest.raises(ValueError, match="relation 'beside'"):
        Input("raw", "beside")


def test_a_scope_must_be_known():
    with pytest.raises(ValueError, match="scope 'night'"):
        row(Input("preliminary_visit_image", EACH), scope="night")


def test_stages_run_the_tables_labels_in_order():
    assert [name for stage in STAGES.values() for labels in stage.values() for name in labels] \
        == [label.name for label in PIPELINE]
    assert list(STAGES) == ["stage1", "global", "stage2", "stage3", "stage4", "final"]
    assert STAGES["stage4"] == {"visit": ["subtractImages", "consolidateDiaSourceTable"],
                                "tract": ["drpAssociation", "drpDiaCalculation"]}
    # every input a label reads is made by an earlier label or comes with the repository
    made = {"raw", "bias", "dark", "flat", "the_monster_sim"}
    for label in PIPELINE:
        assert {i.dataset_type for i in label.inputs} <= made, label.name
        made |= set(label.outputs)
    assert LABELS["assembleCoadd"].inputs[0].relation == OVERLAP
