"""The transfer mechanism on its own: small files in zip bundles (kept as zips at the
destination, read in place) and large ones alone over parallel streams, what arrived checked
against what left, damage in flight detected and the file or bundle sent again; local ->
local and S3 -> S3 across two moto_server endpoints."""

import hashlib
import os
from datetime import timedelta

import numpy as np
import pytest
from astropy.time import Time
from conftest import moto_server

from drp_flows.datamodel import RAW_RUN
from drp_flows.engine.transfer import (
    EmbargoError,
    Ledger,
    TransferError,
    TransferItem,
    check_embargo,
    copy_items,
    plan_transfer,
    plan_units,
)
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import EmbargoConfig, load_sites
from drp_flows.sites.storage import (
    ZIP_MEMBER,
    Storage,
    member_name,
    member_uri,
    split_member,
    zip_bytes,
)
from drp_flows.tasks.ingest import site_exposures
from drp_flows.validation.simulate import load_survey


def _files(store: Storage, n_small: int, n_large: int, seed: int = 0) -> list[TransferItem]:
    """n_small files of 1-3 kB and n_large of 40 kB in a few folders, as runs hold them."""
    rng = np.random.default_rng(seed)
    items = []
    for k in range(n_small + n_large):
        size = 40_000 if k >= n_small else int(rng.integers(1000, 3000))
        rel = f"repo/run/step/{k % 7}/file_{k:04d}.fits"
        with store.open(store.join(rel), "wb") as f:
            f.write(rng.bytes(size))
        items.append(TransferItem(None, store.join(rel), rel))
    return items


def _to(destination: Storage, items: list[TransferItem]) -> list[TransferItem]:
    return [TransferItem(None, i.source_uri, destination.join(i.destination_uri)) for i in items]


def _same_bytes(source: Storage, destination: Storage, items: list[TransferItem]) -> bool:
    def digest(store, uri):
        with store.open(uri, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    return all(digest(source, i.source_uri) == digest(destination, i.destination_uri) for i in items)


class Damaging(Storage):
    """A destination whose first `damage` writes of every file lose a byte on the way."""

    damage = 1

    def open(self, uri, mode="rb"):
        f = super().open(uri, mode)
        if "w" not in mode:
            return f
        seen = self.options.setdefault("_writes", {})
        seen[uri] = seen.get(uri, 0) + 1
        if seen[uri] > self.damage:
            return f
        write = f.write
        f.write = lambda data: write(data[:len(data) // 2] + data[len(data) // 2 + 1:])
        return f


def test_plan_units_bundles_the_small_files():
    items = [TransferItem(None, f"s{k}", f"d{k}") for k in range(10)]
    sizes = {f"s{k}": (50 if k in (3, 7) else 10) for k in range(10)}
    units = plan_units(items, sizes, bundle_bytes=30, small_bytes=40)
    assert [len(u) for u in units] == [3, 1, 3, 1, 2]     # 3 and 7 alone, the rest by ~30 bytes
    assert sorted(i.source_uri for u in units for i in u) == sorted(sizes)


def test_local_copy_in_bundles_over_streams(tmp_path):
    source, destination = Storage(f"file://{tmp_path}/a"), Storage(f"file://{tmp_path}/b")
    items = _to(destination, _files(source, 300, 3))
    copied = Ledger("test", "a", "b")
    placed = copy_items(copied, source, destination, items, bundle_bytes=100_000,
                        small_bytes=20_000, streams=4)
    assert copied.bundles >= 5 and copied.retries == 0
    assert copied.bytes == sum(source.fs.size(source.path(i.source_uri)) for i in items)
    assert _same_bytes(source, destination, placed)
    # the small files are read in place from their zips, one zip a bundle; the large ones alone
    zipped = {split_member(p.destination_uri)[0] for p in placed if ZIP_MEMBER in p.destination_uri}
    assert len(zipped) == copied.bundles and sum(ZIP_MEMBER in p.destination_uri for p in placed) == 300
    assert all(destination.exists(p.destination_uri) for p in placed if ZIP_MEMBER not in p.destination_uri)
    recorded = {p.source_uri: (p.size, p.sha256) for p in placed}
    assert recorded == {i.source_uri: (len(d), hashlib.sha256(d).hexdigest())
                        for i, d in zip(items, source.read_all([i.source_uri for i in items]),
                                        strict=True)}


def test_files_read_from_one_zip_at_once(tmp_path):
    """Several files of a zip come from one read of it, sliced out; one alone by ranged reads;
    a file that is not in it is missing (or None when that is allowed)."""
    store = Storage(f"file://{tmp_path}")
    files = {f"run/type/{k}/file_{k}.parq": np.random.default_rng(k).bytes(1000 * k + 7)
             for k in range(1, 30)}
    archive = store.join("repo", "zips", "a.zip")
    with store.open(archive, "wb") as f:
        f.write(zip_bytes({member_name(p): d for p, d in files.items()}))
    uris = [member_uri(archive, p) for p in files]
    assert store.read_all(uris) == list(files.values())
    assert store.open(uris[3]).read() == files["run/type/4/file_4.parq"]
    lost = member_uri(archive, "run/type/none.parq")
    assert store.read_all([uris[0], lost], missing_ok=True) == [files["run/type/1/file_1.parq"], None]
    with pytest.raises(FileNotFoundError, match="none.parq"):
        store.read_all([uris[0], lost])


def test_damage_in_flight_is_detected_and_resent(tmp_path):
    source = Storage(f"file://{tmp_path}/a")
    destination = Damaging(f"file://{tmp_path}/b", options={})
    items = _to(destination, _files(source, 40, 2))
    copied = Ledger("test", "a", "b")
    placed = copy_items(copied, source, destination, items, bundle_bytes=30_000,
                        small_bytes=20_000)
    # every first write is damaged: each large file and each bundle is sent twice
    assert copied.retries == 2 + copied.bundles and copied.bundles >= 2
    assert _same_bytes(source, destination, placed)


def test_damage_that_persists_is_a_clear_error(tmp_path):
    source = Storage(f"file://{tmp_path}/a")
    destination = Damaging(f"file://{tmp_path}/b", options={})
    destination.damage = 99
    items = _to(destination, _files(source, 0, 1))
    with pytest.raises(TransferError, match="file_0000.fits.*what arrived differs.*after 3 attempts"):
        copy_items(Ledger("test", "a", "b"), source, destination, items)


def test_a_source_damaged_since_it_was_made_is_not_sent_on(tmp_path):
    """Each file carries the sha256 recorded when it was made: one that rotted at the source
    since is refused, named, rather than copied and verified as it now is."""
    from dataclasses import replace

    source, destination = Storage(f"file://{tmp_path}/a"), Storage(f"file://{tmp_path}/b")
    items = []
    for i in _to(destination, _files(source, 5, 1)):
        with source.open(i.source_uri) as f:
            items.append(replace(i, sha256=hashlib.sha256(f.read()).hexdigest()))
    copy_items(Ledger("test", "a", "b"), source, destination, items[:3])   # intact: copied
    rotten = items[4].source_uri
    data = source.open(rotten).read()
    with source.open(rotten, "wb") as f:
        f.write(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(TransferError, match=f"{rotten} at .* is damaged: its sha256 differs"):
        copy_items(Ledger("test", "a", "b"), source, destination, items[3:])
    assert not destination.exists(items[4].destination_uri)


def test_s3_to_s3_across_two_endpoints(s3_credentials):
    with moto_server("usdf-drp") as usdf, moto_server("frdf-drp") as frdf:
        source = Storage("s3://usdf-drp/drp", options={"endpoint_url": usdf}, profile="usdf")
        destination = Storage("s3://frdf-drp/drp", options={"endpoint_url": frdf}, profile="frdf")
        items = _to(destination, _files(source, 120, 2))
        copied = Ledger("test", "a", "b")
        placed = copy_items(copied, source, destination, items, bundle_bytes=60_000,
                            small_bytes=20_000)
        assert copied.bundles >= 3
        assert _same_bytes(source, destination, placed)
        # the bytes went to the other endpoint: the source's knows no such bucket
        assert not Storage("s3://frdf-drp/drp", options={"endpoint_url": usdf}).exists(
            split_member(placed[0].destination_uri)[0])


def test_s3_keys_from_an_aws_profile_file(s3_credentials, tmp_path, monkeypatch):
    """No keys in the environment, a profile in an AWS credentials file: the site's storage
    (s3fs) and its Butler's (lsst.resources, through the site's endpoint profile) both use it."""
    from lsst.resources import ResourcePath

    (tmp_path / "credentials").write_text("[drp]\naws_access_key_id = profilekey\n"
                                          "aws_secret_access_key = profilesecret\n")
    with moto_server("profile-drp") as endpoint:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
        monkeypatch.setenv("AWS_PROFILE", "drp")
        store = Storage("s3://profile-drp/drp", options={"endpoint_url": endpoint},
                        profile="profiletest")
        with store.open(store.join("a.txt"), "wb") as f:
            f.write(b"written by s3fs")
        uri = ResourcePath(store.butler_uri("a.txt"))
        assert uri.read() == b"written by s3fs"
        assert "profilekey" in os.environ["LSST_RESOURCES_S3_PROFILE_profiletest"]
        monkeypatch.setenv("AWS_PROFILE", "none-such")
        with pytest.raises(Exception, match="none-such|no S3 keys"):
            store.butler_uri("a.txt")


def test_embargoed_datasets_are_refused_outside_embargo_sites(three_sites):
    """The last night is under embargo: its raws may go to an embargo site, never to frdf."""
    sites = load_sites(three_sites)
    usdf, frdf = open_butler(sites["usdf"]), open_butler(sites["frdf"])
    begins = {int(r.id): r.timespan.begin for r in usdf.registry.queryDimensionRecords("exposure")}
    last = max(begins.values()).to_datetime()
    embargoed = EmbargoConfig(hours=12, now=last + timedelta(hours=1)).embargoed_exposures(usdf)
    assert embargoed and len(embargoed) < len(begins)
    assert all(begins[e] > min(begins.values()) for e in embargoed)
    items = plan_transfer(usdf, sites["usdf"].store, frdf, sites["frdf"].store, ["raw"], [RAW_RUN])
    with pytest.raises(EmbargoError, match=r"embargoed datasets may not go from usdf to frdf, which "
                                           r"is not an embargo site: raw \{"):
        check_embargo(items, embargoed, "usdf", "frdf", sites["frdf"].embargo)
    check_embargo(items, embargoed, "usdf", "usdf_backup", True)
    released = [i for i in items if int(i.ref.dataId["exposure"]) not in embargoed]
    assert released
    check_embargo(released, embargoed, "usdf", "frdf", False)


def test_embargoed_raws_go_only_to_the_site_that_holds_them(survey):
    cfg, visits = load_survey(survey)
    now = Time(visits["mjd"].max(), format="mjd", scale="tai").utc.to_datetime() + timedelta(hours=1)
    policy = EmbargoConfig(hours=12, now=now)
    raws = survey / "raw"
    everything = site_exposures(raws, cfg.skymap, lambda tract, dec: True)
    held = site_exposures(raws, cfg.skymap, lambda tract, dec: False, policy, holds_embargoed=True)
    elsewhere = site_exposures(raws, cfg.skymap, lambda tract, dec: True, policy)
    assert held and elsewhere and not set(held) & set(elsewhere)
    assert set(held) | set(elsewhere) == set(everything)
    last_night = visits["night"] == visits["night"].max()
    assert set(held) == {int(v) for v in visits["visit"][last_night]}
