"""A site whose storage and Butler datastore are S3 on a real moto_server process: ukdf of the
shared campaign (tests/conftest.py)."""

from conftest import UKDF_BUCKET

from drp_flows.datamodel import RAW_RUN, campaign_collection
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites
from drp_flows.sites.storage import ZIP_MEMBER


def test_s3_site_set_up_and_ran_its_share(campaign):
    site = load_sites(campaign.site_file)["ukdf"]
    assert site.store.scheme == "s3"
    rows = [r for r in campaign.result["progress"] if r["site"] == "ukdf"]
    assert rows and all(r["failed"] == 0 and r["done"] == r["total"] for r in rows), rows
    butler = open_butler(site, collections=campaign_collection(campaign.name))
    raws = list(butler.registry.queryDatasets("raw", collections=RAW_RUN))
    visits = {int(r.dataId["exposure"]) for r in raws}
    assert len(raws) == 9 * len(visits) == 36
    assert butler.getURI(raws[0]).scheme == "s3"
    # every CCD of its own visits calibrated, its bytes in the bucket beside the site's files
    refs = list(butler.registry.queryDatasets("preliminary_visit_image"))
    assert len([r for r in refs if int(r.dataId["visit"]) in visits]) == 9 * len(visits)
    uri = butler.getURI(refs[0])
    assert uri.scheme == "s3" and UKDF_BUCKET in str(uri)
    assert butler.get(refs[0])["IMAGE"].data.shape == (384, 384)
    keys = site.store.fs.find(f"{UKDF_BUCKET}/drp/repo/{campaign_collection(campaign.name)}")
    uris = {r: str(butler.getURI(r)) for r in refs}
    assert sum("/preliminary_visit_image_" in k for k in keys) == sum(
        ZIP_MEMBER not in u for u in uris.values())
    # small files are kept in zips on the bucket (what transfers brought, what clusters of
    # tiny quanta made) and read in place from there
    zipped = [r for t in ("fgcm_photo_calib", "preliminary_visit_summary", "visit_summary",
                          "preliminary_visit_image")
              for r in butler.registry.queryDatasets(t) if ZIP_MEMBER in str(butler.getURI(r))]
    assert zipped, "no dataset in a zip at ukdf"
    assert {r.datasetType.name for r in zipped} >= {"fgcm_photo_calib"}
    for ref in zipped[:3]:
        assert len(butler.get(ref)) > 0, ref
    # and the products of its tract: coadds, objects, DIA objects
    for dataset_type in ("deep_coadd", "object", "dia_object"):
        tracts = {int(r.dataId["tract"]) for r in butler.registry.queryDatasets(dataset_type)}
        assert tracts == {0}, dataset_type
    assert len(butler.get("object", skymap="mini_skymap", tract=0)) > 100
