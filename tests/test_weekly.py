"""The weekly cumulative campaign: named after the ISO week of its run, it takes the released
visits that began before its time, and reuses the previous weekly's single-frame outputs."""

from datetime import UTC, datetime, timedelta

import yaml
from astropy.time import Time

from drp_flows.flows.stages import site_visits
from drp_flows.flows.weekly import released_query, weekly_name
from drp_flows.validation.simulate import FIRST_NIGHT_MJD


def test_weekly_names_are_iso_weeks():
    assert weekly_name(datetime(2026, 12, 7, 6, tzinfo=UTC)) == "w_2026_50"     # a Monday
    assert weekly_name(datetime(2027, 1, 1, 6, tzinfo=UTC)) == "w_2026_53"      # ISO 2026-W53
    assert weekly_name(datetime(2027, 1, 4, 6, tzinfo=UTC)) == "w_2027_01"


def test_released_visits_follow_the_embargo_period(three_sites, tmp_path):
    """A visit of the second night is out of a weekly run 12 hours after it (24-hour embargo)
    and in the next week's; without an embargo the cut is the run's own time."""
    sites = yaml.safe_load(open(three_sites).read())
    sites["embargo"] = {"hours": 24}
    embargoed = tmp_path / "embargoed.yaml"
    embargoed.write_text(yaml.safe_dump(sites))
    del sites["embargo"]
    free = tmp_path / "free.yaml"
    free.write_text(yaml.safe_dump(sites))
    night2 = Time(FIRST_NIGHT_MJD + 1, format="mjd").to_datetime(timezone=UTC)
    everything = site_visits(three_sites, "usdf")
    first_night = [v for v in everything if v // 100000 == everything[0] // 100000]
    assert 0 < len(first_night) < len(everything)
    as_of = night2 + timedelta(hours=12)
    assert site_visits(three_sites, "usdf", released_query(str(embargoed), as_of)) == first_night
    assert site_visits(three_sites, "usdf",
                       released_query(str(embargoed), as_of + timedelta(days=7))) == everything
    assert site_visits(three_sites, "usdf", released_query(str(free), as_of)) == everything


def test_no_where_widens_the_release_cut(three_sites, tmp_path):
    """The weekly's query is the release cut AND the user's condition, each checked whole:
    'OR' inside the user's condition stays inside it, and text that would close the cut's
    parenthesis is refused."""
    import pytest

    from drp_flows.engine.planning import all_of
    from drp_flows.errors import InputError

    sites = yaml.safe_load(open(three_sites).read())
    sites["embargo"] = {"hours": 24}
    embargoed = tmp_path / "embargoed.yaml"
    embargoed.write_text(yaml.safe_dump(sites))
    as_of = Time(FIRST_NIGHT_MJD + 1, format="mjd").to_datetime(timezone=UTC) + timedelta(hours=12)
    cut = released_query(str(embargoed), as_of)
    released = site_visits(three_sites, "usdf", cut)
    assert 0 < len(released) < len(site_visits(three_sites, "usdf"))
    assert site_visits(three_sites, "usdf", all_of(cut, "visit > 0 OR visit < 0")) == released
    with pytest.raises(InputError, match="Syntax error"):
        all_of(cut, "visit > 0) OR (visit > 0")
