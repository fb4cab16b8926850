"""Hostile names and queries: a campaign or group name that could climb out of the storage
root or into another collection, and a data query that is not one condition, are refused with
the value named, before anything is written; no `where` can widen the weekly release cut."""

import subprocess
import sys
from pathlib import Path

import pytest

from drp_flows.datamodel import campaign_collection, checked_name, group_run
from drp_flows.engine.planning import all_of, checked_query
from drp_flows.errors import InputError
from drp_flows.sites.storage import Storage

DRP = str(Path(sys.executable).with_name("drp"))
BAD_NAMES = ["../../../x", "a/b", "", "w_*", "x" * 65, ".hidden", "a b", "r1;rm", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_campaign_and_group_names_are_refused(name):
    with pytest.raises(InputError, match="campaign name"):
        campaign_collection(name)
    with pytest.raises(InputError, match="group name"):
        group_run("ok", "step1", name, 1)


def test_good_names_pass():
    for name in ("demo", "w_2026_49", "r1.rescue-2", "0-99", "tracts-0-3", "x" * 64):
        assert checked_name("campaign", name) == name


def test_no_path_leaves_the_storage_root(tmp_path):
    store = Storage(f"file://{tmp_path}")
    assert store.join("reports", "demo", "qa.md") == f"file://{tmp_path}/reports/demo/qa.md"
    for parts in (("reports", "../../x"), ("..",), ("repo/../..", "y")):
        with pytest.raises(InputError, match="leaves the storage root"):
            store.join(*parts)


def test_the_command_line_refuses_a_bad_name_before_anything_runs(tmp_path):
    """`drp campaign ../../../x` (and report, status, rescue) exit 2 naming the value, and
    write nothing: no Prefect server, no site touched."""
    for command in ("campaign", "rescue", "status", "report"):
        out = subprocess.run([DRP, command, "../../../x", "--data", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert "campaign name '../../../x'" in " ".join(out.stderr.split())
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("where, why", [
    ("1", "not a condition"),
    ("band", "not a condition"),
    ("visit > 1 AND 2", "not a condition"),
    ("visit = 1) OR (visit > 0", "Syntax error"),
    ("visit > 0 /* x", "Syntax error"),
    ("band =", "End of input reached"),
    ("visit > 0 $", "Unexpected character"),
])
def test_a_data_query_must_be_one_condition(where, why):
    with pytest.raises(InputError, match=why) as raised:
        checked_query(where)
    assert repr(where) in str(raised.value)


def test_conditions_are_joined_so_none_widens_another():
    assert all_of("a > 1", "", "b = 2 OR b = 3") == "(a > 1) AND (b = 2 OR b = 3)"
    with pytest.raises(InputError, match="Syntax error"):
        all_of("visit.timespan.begin < T'2026-01-01T00:00:00/utc'", "visit > 0) OR (visit > 0")


def test_a_query_that_is_no_condition_fails_clearly_at_a_site(solo_site):
    """On a real registry `where='1'` was an uncaught AssertionError deep in daf_butler."""
    from drp_flows.flows.stages import site_visits

    site_file = solo_site("query")
    assert site_visits(site_file, "solo", "visit > 0") == site_visits(site_file, "solo")
    with pytest.raises(InputError, match="data query '1'"):
        site_visits(site_file, "solo", "1")
    with pytest.raises(InputError, match="at site solo"):
        site_visits(site_file, "solo", "nosuchthing = 3")
