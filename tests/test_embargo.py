"""The embargo in the shared campaign (tests/conftest.py): the survey's last two visits are under
embargo and usdf is the embargo site. They are processed there, and nothing made from them, by
any number of steps, is at frdf or ukdf: every dataset outside usdf is traced back through the
inputs its quantum read (the manifests kept beside each repository) to the visits it was made
from. A transfer that would send embargoed data out is refused, naming datasets and sites; a
neighbour gets no boundary CCD of an embargoed visit."""

import json

import pytest

from drp_flows.datamodel import DEFAULTS, campaign_collection
from drp_flows.engine.register import read_manifests
from drp_flows.engine.transfer import EmbargoError
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites


def made_from(site, campaign: str, made_here_only: bool = False) -> dict[str, set[int]]:
    """The visits each of a campaign's datasets at a site was made from, by its description
    ("type {data ID}"): a per-visit or per-CCD dataset holds its own visit's data; any other,
    the union of what its quantum's inputs were made from. A dataset that has neither a visit
    nor a manifest saying what it was made from fails the test, naming it, unless
    `made_here_only` (the campaign site, which also holds what other sites made)."""
    butler = open_butler(site)
    prefix = campaign_collection(campaign) + "/"
    runs = [c for c in butler.registry.getCollectionChain(campaign_collection(campaign))
            if c.startswith(prefix)]
    refs = list(butler.registry.queryDatasets(..., collections=runs))
    inputs = list(butler.registry.queryDatasets(..., collections=DEFAULTS))
    from_setup = {ref.id for ref in inputs}
    by_uri = {site.store.from_butler_uri(uris.primaryURI): ref
              for ref, uris in butler.get_many_uris(refs + inputs).items()}
    read = {}
    for row in read_manifests(site.store, runs):
        values = json.loads(row["inputs"]).values()
        read[row["uri"]] = [u for v in values for u in (v if isinstance(v, list) else [v])
                            if isinstance(u, str) and u.startswith(site.store.root)]
    visits: dict[str, set[int]] = {}

    def of(uri: str) -> set[int]:
        if uri not in visits:
            ref = by_uri[uri]
            ids = ref.dataId.required
            if "visit" in ids or "exposure" in ids:
                visits[uri] = {int(ids["visit"] if "visit" in ids else ids["exposure"])}
            elif uri in read:
                visits[uri] = set().union(*(of(u) for u in read[uri]))
            else:                         # calibrations, reference catalog, skymap
                assert ref.id in from_setup or made_here_only, \
                    f"{site.name}: nothing says what {ref} was made from"
                visits[uri] = set()
        return visits[uri]

    return {f"{ref.datasetType.name} {dict(ref.dataId.required)}": of(uri)
            for uri, ref in by_uri.items() if ref.id not in from_setup}


def test_embargoed_visits_processed_at_the_embargo_site(campaign):
    """Calibrated and summarised at usdf; differenced too where a template without them exists
    (of two visits of a band on a tract, one is the other's template)."""
    usdf = open_butler(load_sites(campaign.site_file)["usdf"])
    assert len(campaign.embargoed) == 2

    def visits(dataset_type: str) -> set[int]:
        return {int(r.dataId["visit"]) for r in usdf.registry.queryDatasets(
            dataset_type, collections=campaign_collection(campaign.name))}

    assert campaign.embargoed <= visits("preliminary_visit_image")
    assert campaign.embargoed <= visits("visit_summary")
    assert campaign.embargoed & visits("difference_image")


def test_nothing_made_from_embargoed_visits_leaves_the_embargo_site(campaign):
    sites = load_sites(campaign.site_file)
    # the walk finds embargoed visits where they are: in usdf's tract-level products
    at_usdf = made_from(sites["usdf"], campaign.name, made_here_only=True)
    assert any(visits & campaign.embargoed for name, visits in at_usdf.items()
               if name.startswith(("deep_coadd ", "object ", "dia_object ")))
    for name in ("frdf", "ukdf"):
        found = made_from(sites[name], campaign.name)
        # every tract-level product (coadds, objects, maps, DIA catalogs) traced to its visits
        tract_level = {d: visits for d, visits in found.items() if "'tract'" in d}
        assert len(tract_level) > 30 and all(tract_level.values()), (name, tract_level)
        leaked = {d: sorted(v & campaign.embargoed) for d, v in found.items()
                  if v & campaign.embargoed}
        assert not leaked, (name, leaked)
    # frdf's visits did arrive there, with their calibration from usdf
    assert any(t["destination"] == "frdf" and t["files"] for t in campaign.result["transfers"])


def test_sending_embargoed_data_out_is_refused(campaign):
    from drp_flows.flows.campaign import transfer_task

    visit = min(campaign.embargoed)
    with pytest.raises(EmbargoError, match=rf"may not go from usdf to frdf, which is not an "
                                           rf"embargo site: preliminary_visit_image .*{visit}"):
        transfer_task.fn(campaign.site_file, campaign.name, "leak", "usdf", "frdf",
                         ["preliminary_visit_image"], [visit])


def test_no_boundary_ccd_of_an_embargoed_visit_goes_to_a_neighbour(campaign, tmp_path):
    """With the embargo period over all of usdf's visits of the last night, the CCDs usdf would
    send its neighbours leave out exactly those of the embargoed visits."""
    import yaml

    from drp_flows.flows.campaign import boundary_ccds

    sites = yaml.safe_load(open(campaign.site_file).read())
    sites["embargo"]["hours"] = 13
    longer = tmp_path / "sites.yaml"
    longer.write_text(yaml.safe_dump(sites))
    embargoed = load_sites(longer).embargo.embargoed_exposures(
        open_butler(load_sites(longer)["usdf"]))
    assert embargoed > campaign.embargoed
    released, held = boundary_ccds(campaign.site_file, "usdf"), boundary_ccds(str(longer), "usdf")
    assert {v for ccds in released.values() for v, _ in ccds} & embargoed
    for neighbour in ("frdf", "ukdf"):
        assert held[neighbour] == [c for c in released[neighbour] if c[0] not in embargoed]
