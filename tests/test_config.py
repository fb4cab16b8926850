"""Site files: the embedded default loads; bad files fail with the file and the key named."""

from pathlib import Path

import pytest

from drp_flows.sites.config import LOCAL_SITES, ConfigError, load_sites

PRODUCTION = LOCAL_SITES.with_name("production.yaml")


def test_local_sites_load(tmp_path):
    sites = load_sites(LOCAL_SITES, DRP_DATA=str(tmp_path))
    assert sites.campaign_site == "usdf"
    assert set(sites.sites) == {"usdf", "frdf", "ukdf"}
    assert sites["usdf"].embargo and not sites["frdf"].embargo
    assert sites["frdf"].store.root == f"file://{tmp_path}/frdf"
    owned = {name: [t for t in range(6) if s.owns_tract(t, 0.0)] for name, s in sites.sites.items()}
    assert owned == {"usdf": [0, 1], "frdf": [2, 3], "ukdf": [4, 5]}


def test_the_pipeline_settings_are_the_campaigns(tmp_path):
    """One pipeline for every site: the site file's `pipeline` section (default: the Moffat)."""
    path = tmp_path / "sites.yaml"
    path.write_text(LOCAL_SITES.read_text() + "pipeline: {psf_model: empirical}\n")
    assert load_sites(path, DRP_DATA=str(tmp_path)).pipeline.psf_model == "empirical"
    assert load_sites(LOCAL_SITES, DRP_DATA=str(tmp_path)).pipeline.psf_model == "moffat"


def test_a_site_file_is_parsed_once_while_its_text_stays(tmp_path):
    """Every flow and task loads the site file by path: one parse per process, and a changed
    file or variable is read afresh."""
    path = tmp_path / "sites.yaml"
    path.write_text(LOCAL_SITES.read_text())
    first = load_sites(path, DRP_DATA=str(tmp_path))
    assert load_sites(path, DRP_DATA=str(tmp_path)) is first
    elsewhere = load_sites(path, DRP_DATA=str(tmp_path / "b"))
    assert elsewhere["frdf"].store.root == f"file://{tmp_path}/b/frdf"
    path.write_text(LOCAL_SITES.read_text().replace("campaign_site: usdf", "campaign_site: frdf"))
    assert load_sites(path, DRP_DATA=str(tmp_path)).campaign_site == "frdf"


def test_production_example_validates():
    sites = load_sites(PRODUCTION)
    usdf = sites["usdf"]
    assert usdf.cluster.kind == "slurm"
    assert usdf.cluster.backend_kwargs["queue"] == "roma"       # passes through to dask-jobqueue
    assert usdf.long_cluster.backend_kwargs["walltime"] == "14:00:00"
    assert sites["frdf"].store.scheme == "s3"
    assert sites["ukdf"].cluster.address.startswith("tcp://")
    assert usdf.owns_tract(0, -60.0) and not usdf.owns_tract(0, -20.0)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sites.yaml"
    path.write_text(text)
    return path


GOOD_SITE = "cluster: {kind: local}\n    storage: file:///tmp/x"


@pytest.mark.parametrize("text, expected", [
    (f"campaign_site: a\nsites:\n  a:\n    {GOOD_SITE}\n    colour: red\n",
     "sites.a.colour: Extra inputs are not permitted"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: pbs}\n    storage: file:///tmp/x\n",
     "sites.a.cluster.kind"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: address}\n    storage: file:///tmp/x\n",
     "kind 'address' needs an 'address'"),
    (f"campaign_site: b\nsites:\n  a:\n    {GOOD_SITE}\n", "campaign_site 'b' is not one of"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: local}\n", "sites.a.storage: Field required"),
    ("campaign_site: a\nsites: [\n", "not valid YAML"),
    (f"campaign_site: a\nembargo: {{hours: 80}}\nsites:\n  a:\n    {GOOD_SITE}\n",
     "an embargo period needs the campaign site to be an embargo site"),
    (f"campaign_site: a\nembargo: {{hours: -1}}\nsites:\n  a:\n    {GOOD_SITE}\n    embargo: true\n",
     "embargo.hours: Input should be greater than 0"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: local}\n    storage: ${NOPE_NOT_SET}\n",
     "variable ${NOPE_NOT_SET} is not set"),
    # what a typo in a production file looks like: each refused, the key named
    (f"campaign_site: a\nsites:\n  a:\n    {GOOD_SITE}\n  a:\n    {GOOD_SITE}2\n",
     "key 'a' given twice (first at line 3)"),
    (f"campaign_site: a\nsites:\n  a:\n    {GOOD_SITE}\n  b:\n    {GOOD_SITE}\n",
     "sites a and b share storage"),
    (f"campaign_site: a\nsites:\n  a:\n    {GOOD_SITE}\n  b:\n    {GOOD_SITE}/b\n",
     "sites a and b share storage"),
    (f"campaign_site: a\nsites:\n  a:\n    {GOOD_SITE}\n    butler: {{registry: 'sqlite:////tmp/r.db'}}"
     f"\n  b:\n    {GOOD_SITE}2\n    butler: {{registry: 'sqlite:////tmp/r.db'}}\n",
     "sites a and b share registry sqlite:////tmp/r.db"),
    (f"campaign_site: a\nsites:\n  a:\n    {GOOD_SITE}\n    sky: {{tracts: []}}\n",
     "sites.a.sky.tracts: List should have at least 1 item"),
    (f"campaign_site: a\nsites:\n  a:\n    {GOOD_SITE}\n    sky: {{dec_min: 10, dec_max: -10}}\n",
     "dec_min 10.0 is not below dec_max -10.0"),
    (f"campaign_site: a\nsites:\n  a:\n    {GOOD_SITE}\n    sky: {{dec_max: 95}}\n",
     "sites.a.sky.dec_max: Input should be less than or equal to 90"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: local, jobs: 0}\n    storage: file:///x\n",
     "a cluster needs at least one job"),
    (f"campaign_site: a\nsites:\n  a:\n    {GOOD_SITE}\n    embargo: 'yes'\n",
     "sites.a.embargo: Input should be a valid boolean"),
    (f"campaign_site: a\npipeline: {{psf_model: piff}}\nsites:\n  a:\n    {GOOD_SITE}\n",
     "pipeline.psf_model: Input should be 'moffat' or 'empirical'"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: slurm, queue: roma, wallclock: '1:00:00'}"
     "\n    storage: file:///x\n", "unknown key(s) wallclock for a 'slurm' cluster"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: local, thread_per_worker: 2}"
     "\n    storage: file:///x\n", "unknown key(s) thread_per_worker for a 'local' cluster"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: local}\n    storage: file://relative/dir\n",
     "'file://relative/dir' is not an absolute path"),
    # secrets are never in a site file (it is copied to butler.yaml, logs, Prefect parameters)
    (f"campaign_site: a\nsites:\n  a:\n    {GOOD_SITE}\n    butler: "
     "{registry: 'postgresql://drp:s3cr3t-pw@db.example.org:5432/drp'}\n",
     "registry 'postgresql://drp:***@db.example.org:5432/drp' holds a password"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: local}\n    storage: s3://b/x\n"
     "    storage_options: {endpoint_url: 'https://s3.example.org', secret: s3cr3t-pw}\n",
     "storage_options: Value error, secret: keys and secrets are never written"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: local}\n    storage: s3://b/x\n"
     "    storage_options: {client_kwargs: {aws_secret_access_key: s3cr3t-pw}}\n",
     "client_kwargs.aws_secret_access_key: keys and secrets"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: local}\n    storage: s3://b/x\n"
     "    storage_options: {endpoint_url: 'https://k:s3cr3t-pw@s3.example.org'}\n",
     "endpoint_url 'https://k:***@s3.example.org' holds a password"),
    ("campaign_site: a\nsites:\n  a:\n    cluster: {kind: local}\n    storage: s3://k:s3cr3t-pw@b/x\n",
     "a storage URL holds no user or key"),
])
def test_bad_site_file_names_file_and_key(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_sites(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)
    assert "s3cr3t-pw" not in str(err.value)


def test_missing_site_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read site file"):
        load_sites(tmp_path / "nope.yaml")


def test_bad_storage_scheme(tmp_path):
    path = _write(tmp_path, "campaign_site: a\nsites:\n  a:\n    cluster: {kind: local}\n"
                            "    storage: ftp://host/x\n")
    with pytest.raises(ConfigError, match=r"sites.a.storage: .*scheme 'ftp' is not one of"):
        load_sites(path)
