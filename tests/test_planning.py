"""Planning that does not grow with the campaign: the solo site's registry grown to 2,000
visits (its four visits copied, bench/survey_registry.py), a 2,000-visit step-1 group planned
whole (no SQL expression limit), and the last group of a campaign planned with the same
registry rows as the first although every other group's outputs are registered."""

import sys
from pathlib import Path

import pytest

from drp_flows.datamodel import campaign_collection, group_run
from drp_flows.engine.planning import make_groups
from drp_flows.flows.stages import chain_run, site_visits
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites
from drp_flows.tasks import step1
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.pipeline import LABELS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from survey_registry import grow  # noqa: E402

VISITS = 2000
CAMPAIGN = "bigplan"


@pytest.fixture(scope="module")
def big_site(solo_site, tmp_path_factory):
    """The solo site's storage copied whole (its repository is shared with other tests) and
    grown to VISITS visits."""
    import shutil

    source = load_sites(solo_site("big-source"))["solo"]
    root = tmp_path_factory.mktemp("big")
    shutil.copytree(source.store.path(source.store.root), root / "solo")
    site_file = root / "sites.yaml"
    site_file.write_text(f"campaign_site: big\nsites:\n  big:\n    cluster: {{kind: local}}\n"
                         f"    storage: file://{root}/solo\n")
    grow(str(site_file), VISITS)
    return str(site_file)


class Counted:
    """Counts what the planner reads from the registry: every dataset, data ID and record
    its queries return."""

    def __init__(self, butler, monkeypatch):
        self.rows = 0
        shim = type(butler.registry)          # a new shim object at every `butler.registry`
        for name in ("queryDatasets", "queryDataIds", "queryDimensionRecords"):
            monkeypatch.setattr(shim, name, self.counting(getattr(shim, name)))

    def counting(self, query):
        def wrapped(registry, *args, **kwargs):
            for item in query(registry, *args, **kwargs):
                self.rows += 1
                yield item
        return wrapped


def test_a_2000_visit_group_plans(big_site):
    site = load_sites(big_site)["big"]
    butler = open_butler(site)
    visits = site_visits(big_site, "big")
    assert len(visits) == VISITS
    quanta, skipped, blocked = LABELS[step1.CALIBRATE].plan(butler, site.store, "run", visits,
                                                    [campaign_collection(CAMPAIGN)])
    assert len(quanta) == 9 * VISITS and not skipped and not blocked
    q = quanta[-1]
    assert {"raw", "bias", "dark", "flat", "refcat"} <= set(q.inputs) and q.inputs["refcat"]


def test_last_group_reads_what_the_first_does(big_site, monkeypatch):
    site = load_sites(big_site)["big"]
    butler = open_butler(site, writeable=True)
    groups = make_groups(site_visits(big_site, "big"), 100)
    *others, last = groups
    collections = [campaign_collection(CAMPAIGN)]

    def plan(group: str) -> tuple[int, int]:
        counted = Counted(butler, monkeypatch)
        quanta, skipped, _ = LABELS[step1.CALIBRATE].plan(butler, site.store, "run", groups[group],
                                                  collections)
        monkeypatch.undo()
        return counted.rows, len(quanta) + skipped

    first_rows, planned = plan(last)
    for name in others:           # every other group done, each in its own RUN in the chain
        run = group_run(CAMPAIGN, "step1", name, 1)
        butler.registry.registerRun(run)
        chain_run(butler, CAMPAIGN, run)
        ids = [{"instrument": INSTRUMENT, "visit": v, "detector": d}
               for v in groups[name] for d in range(9)]
        for dataset_type in ("preliminary_visit_image", "single_visit_star_unstandardized"):
            butler.registry.insertDatasets(dataset_type, ids, run)
    last_rows, again = plan(last)
    assert again == planned == 9 * len(groups[last])
    assert last_rows == first_rows, (first_rows, last_rows)


def test_bulk_uris_are_the_butlers(big_site):
    """The datastore's records give the same URIs as Butler.getURI, for files it copied in
    (paths relative to its root) and files it took as they were (absolute)."""
    from drp_flows.engine.planning import dataset_uri, dataset_uris

    site = load_sites(big_site)["big"]
    butler = open_butler(site)
    refs = sorted(butler.registry.queryDatasets("raw", collections="ComCamSim/raw/all"),
                  key=lambda r: r.dataId["exposure"])          # copies first, originals last
    assert refs[0].dataId["exposure"] < 2 * 10**11 < refs[-1].dataId["exposure"]
    sample = refs[:20] + refs[-20:] + list(butler.registry.queryDatasets(
        "flat", collections="ComCamSim/calib/run"))[:5]
    assert dataset_uris(butler, site.store, sample) == [
        dataset_uri(butler, site.store, r) for r in sample]


def test_a_calibration_is_the_one_valid_when_the_visit_was_taken(big_site, tmp_path):
    """Two flats certified for one detector and filter, the second from the middle of the
    survey on: each visit's quanta get the one valid at its exposure's time."""
    from lsst.daf.butler import DatasetRef, FileDataset, Timespan

    from drp_flows.datamodel import CALIB_COLLECTION, CALIB_RUN
    from drp_flows.engine.planning import dataset_uri
    from drp_flows.sites.butler import formatter_for

    site = load_sites(big_site)["big"]
    butler = open_butler(site, writeable=True)
    old = next(r for r in butler.registry.queryDatasets("flat", collections=CALIB_RUN)
               if r.dataId["detector"] == 0)
    physical_filter = old.dataId["physical_filter"]
    exposures = sorted((r.timespan.begin, int(r.id)) for r in butler.registry
                       .queryDimensionRecords("exposure", instrument=INSTRUMENT,
                                              physical_filter=physical_filter))
    change = exposures[len(exposures) // 2][0]
    butler.registry.registerRun("newflats")
    new = DatasetRef(old.datasetType, old.dataId, run="newflats")
    copy = tmp_path / "new_flat.fits"
    copy.write_bytes(butler.getURI(old).read())
    butler.ingest(FileDataset(path=str(copy), refs=[new],
                              formatter=formatter_for("FitsHDUList")), transfer="direct")
    butler.registry.decertify(CALIB_COLLECTION, "flat", Timespan(None, None),
                              dataIds=[old.dataId])
    butler.registry.certify(CALIB_COLLECTION, [old], Timespan(None, change))
    butler.registry.certify(CALIB_COLLECTION, [new], Timespan(change, None))

    # a campaign of its own: the one above has registered most visits' outputs
    quanta, _, blocked = LABELS[step1.CALIBRATE].plan(
        butler, site.store, "run", [v for _, v in exposures], [campaign_collection("calibs")])
    flats = {q.data_id["visit"]: q.inputs["flat"] for q in quanta if q.data_id["detector"] == 0}
    assert not blocked and len(flats) == len(exposures)
    assert dataset_uri(butler, site.store, old) != dataset_uri(butler, site.store, new)
    assert {flats[v] for begin, v in exposures if begin < change} == {
        dataset_uri(butler, site.store, old)}
    assert {flats[v] for begin, v in exposures if begin >= change} == {
        dataset_uri(butler, site.store, new)}
