"""Integrity of a campaign's products: every file registered in the campaign's RUNs, at every
site, re-read and compared with the size and sha256 in the datastore's records: what its
quantum measured as it wrote it (engine/register.py), or for a transferred copy what the
source's record said (engine/transfer.py), so a file damaged at either end is found. The
planner hands the same records to the quanta (engine/planning.py dataset_uris), which check
their inputs as they read them.

`repair` unregisters (and deletes) what is damaged, so that a re-run or a rescue makes it
again (a quantum's outputs missing) or transfers it again (a destination lacking a dataset).
Raws, calibrations and reference catalogs came from outside a campaign and are not checked.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lsst.daf.butler import Butler, DatasetRef

from drp_flows.datamodel import campaign_collection
from drp_flows.engine.planning import dataset_uris, existing_collections
from drp_flows.engine.quanta import RecordedURI
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import CampaignSites, SiteConfig
from drp_flows.sites.storage import ZIP_MEMBER, Storage, digest, split_member

READERS = 8     # files re-read at once
ORPHAN_SECONDS = 3600.0   # a zip no record names is an orphan once this old


@dataclass
class Damaged:
    site: str
    dataset_type: str
    data_id: dict
    uri: str
    why: str

    def __str__(self) -> str:
        ids = ", ".join(f"{k}={v}" for k, v in self.data_id.items() if k != "instrument")
        return f"{self.site} {self.dataset_type}({ids}) {self.uri}: {self.why}"


@dataclass
class Verification:
    checked: int
    damaged: list[Damaged]
    repaired: int = 0
    orphans: list[str] = field(default_factory=list)   # zips no record names (deleted on repair)


def campaign_runs(butler: Butler, campaign: str) -> list[str]:
    """The RUNs of a campaign's chain that are its own (not the defaults it ends with)."""
    chain = existing_collections(butler, [campaign_collection(campaign)])
    if not chain:
        return []
    return [r for r in butler.registry.getCollectionChain(chain[0]) if r.startswith(chain[0] + "/")]


def _check(store: Storage, uris: list[str], expected: list[tuple[int, str]]) -> list[str]:
    """Why each file is not what was recorded ('' when it is): a file alone, read in chunks,
    or files inside one zip, read from one opening of it."""
    try:
        if len(uris) == 1 and ZIP_MEMBER not in uris[0]:
            with store.open(uris[0], "rb") as f:
                found = [digest(f)]
        else:
            found = [None if d is None else (len(d), hashlib.sha256(d).hexdigest())
                     for d in store.read_all(uris, missing_ok=True)]
    except FileNotFoundError:
        return ["missing"] * len(uris)
    return [_why(f, *e) for f, e in zip(found, expected, strict=True)]


def _why(found: tuple[int, str] | None, size: int, sha256: str) -> str:
    if found is None:
        return "missing"
    if found[0] != size:
        return f"{found[0]} bytes, {size} recorded"
    if found[1] != sha256:
        return "sha256 differs from the one recorded when it was written"
    return ""


def products(butler: Butler, runs: list[str]) -> Iterator[DatasetRef]:
    """The datasets registered in the runs."""
    for dataset_type in {t.name for t in butler.registry.queryDatasetTypes()}:
        yield from butler.registry.queryDatasets(dataset_type, collections=runs, findFirst=False)


def verify_site(site: SiteConfig, campaign: str, fraction: float = 1.0, seed: int = 0,
                repair: bool = False) -> Verification:
    """Re-read the campaign's registered products at one site (a random `fraction` of them)
    and compare each with its record; `repair`: unregister and delete the damaged."""
    butler = open_butler(site, writeable=repair)
    runs = campaign_runs(butler, campaign)
    refs = sorted(products(butler, runs), key=lambda r: str(r.id)) if runs else []
    if fraction < 1.0:
        refs = random.Random(seed).sample(refs, round(len(refs) * fraction))
    uris = dataset_uris(butler, site.store, refs)
    unrecorded = [str(u) for u in uris if not isinstance(u, RecordedURI)]
    if unrecorded:      # every campaign output is registered with its record: a bug if not
        raise LookupError(f"site {site.name}: {len(unrecorded)} products of {campaign} have no "
                          f"size and sha256 in the datastore's records, e.g. {unrecorded[0]}")
    files: dict[str, list[int]] = {}      # a file, or a zip: the products read from it
    for k, uri in enumerate(uris):
        files.setdefault(split_member(uri)[0], []).append(k)
    whys = [""] * len(uris)
    with ThreadPoolExecutor(READERS) as pool:
        for ks, found in zip(files.values(), pool.map(
                lambda ks: _check(site.store, [uris[k] for k in ks],
                                  [(uris[k].size, uris[k].sha256) for k in ks]), files.values()),
                             strict=True):
            for k, why in zip(ks, found, strict=True):
                whys[k] = why
    damaged = [(ref, Damaged(site.name, ref.datasetType.name, dict(ref.dataId.required), uri, why))
               for ref, uri, why in zip(refs, uris, whys, strict=True) if why]
    result = Verification(len(refs), [d for _, d in damaged], orphans=orphan_zips(butler, site.store))
    if repair and damaged:
        butler.pruneDatasets([ref for ref, _ in damaged], disassociate=True, unstore=True,
                             purge=True)
        result.repaired = len(damaged)
    if repair:
        for uri in result.orphans:
            site.store.fs.rm(site.store.path(uri))
    return result


def orphan_zips(butler: Butler, store: Storage, min_age: float = ORPHAN_SECONDS) -> list[str]:
    """The zips in the repository that no dataset's record names and that are older than
    `min_age` seconds: written by a cluster of quanta or a transfer whose registration then
    failed (a re-run writes new ones). Younger ones may be a running registration's."""
    folder = store.path(store.join("repo", "zips"))
    if not store.fs.exists(folder):
        return []
    named = {split_member(row["path"])[0].rsplit("/", 1)[-1]
             for row in butler._datastore._table.fetch()       # noqa: SLF001 (no public listing)
             if ZIP_MEMBER in row["path"]}
    now = time.time()
    orphans = []
    for info in store.fs.ls(folder, detail=True):
        name = info["name"].rsplit("/", 1)[-1]
        if name.endswith(".zip") and name not in named and now - modified(info) > min_age:
            orphans.append(store.join("repo", "zips", name))
    return sorted(orphans)


def modified(info: dict) -> float:
    """A file's modification time (Unix seconds) from an fsspec listing, local or S3."""
    when = info.get("mtime", info.get("LastModified"))
    return when.timestamp() if hasattr(when, "timestamp") else float(when)


def verify_campaign(sites: CampaignSites, campaign: str, only: str | None = None,
                    fraction: float = 1.0, seed: int = 0,
                    repair: bool = False) -> dict[str, Verification]:
    """verify_site at every site (or only one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction}: must be in (0, 1]")
    return {name: verify_site(site, campaign, fraction, seed, repair)
            for name, site in sites.sites.items() if only in (None, name)}
