"""Integrity of a campaign's products: every file registered in the campaign's RUNs, at every
site, re-read and compared with the size and sha256 its quantum recorded when it wrote it
(the manifests kept beside the source site's repository, engine/register.py). A transferred
copy is checked against its source's record too, so a file damaged at either end is found.

`repair` unregisters (and deletes) what is damaged, so that a re-run or a rescue makes it
again (a quantum's outputs missing) or transfers it again (a destination lacking a dataset).
Raws, calibrations and reference catalogs came from outside a campaign and are not checked.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lsst.daf.butler import Butler, DatasetRef

from drp_flows.datamodel import campaign_collection
from drp_flows.engine.planning import dataset_uris, existing_collections
from drp_flows.engine.register import read_manifests
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import CampaignSites, SiteConfig
from drp_flows.sites.storage import ZIP_MEMBER, Storage, digest, split_member

READERS = 8     # files re-read at once


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


def campaign_runs(butler: Butler, campaign: str) -> list[str]:
    """The RUNs of a campaign's chain that are its own (not the defaults it ends with)."""
    chain = existing_collections(butler, [campaign_collection(campaign)])
    if not chain:
        return []
    return [r for r in butler.registry.getCollectionChain(chain[0]) if r.startswith(chain[0] + "/")]


def recorded(sources: Iterable[tuple[Storage, list[str]]]) -> dict[str, tuple[int, str]]:
    """What the quanta of the given RUNs recorded of their outputs, in the manifests kept at
    each given storage: dataset ID -> (bytes, sha256)."""
    latest: dict[str, tuple[float, int, str]] = {}
    for store, runs in sources:
        for row in read_manifests(store, runs):   # a product made again: its latest record
            key, ended = str(row["dataset_id"]), float(row["ended"])
            if key not in latest or ended > latest[key][0]:
                latest[key] = (ended, int(row["bytes"]), str(row["sha256"]))
    return {key: (size, sha256) for key, (_, size, sha256) in latest.items()}


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


def products(butler: Butler, runs: list[str], ids: set[str]) -> Iterator[DatasetRef]:
    """The datasets registered in the runs that have a record (of those `ids`)."""
    for dataset_type in {t.name for t in butler.registry.queryDatasetTypes()}:
        for ref in butler.registry.queryDatasets(dataset_type, collections=runs, findFirst=False):
            if str(ref.id) in ids:
                yield ref


def verify_site(site: SiteConfig, campaign: str, records: dict[str, tuple[int, str]],
                fraction: float = 1.0, seed: int = 0, repair: bool = False) -> Verification:
    """Re-read the campaign's registered products at one site (a random `fraction` of them)
    and compare each with its record; `repair`: unregister and delete the damaged."""
    butler = open_butler(site, writeable=repair)
    runs = campaign_runs(butler, campaign)
    refs = sorted(products(butler, runs, set(records)), key=lambda r: str(r.id)) if runs else []
    if fraction < 1.0:
        refs = random.Random(seed).sample(refs, round(len(refs) * fraction))
    uris = dataset_uris(butler, site.store, refs)
    files: dict[str, list[int]] = {}      # a file, or a zip: the products read from it
    for k, uri in enumerate(uris):
        files.setdefault(split_member(uri)[0], []).append(k)
    whys = [""] * len(uris)
    with ThreadPoolExecutor(READERS) as pool:
        for ks, found in zip(files.values(), pool.map(
                lambda ks: _check(site.store, [uris[k] for k in ks],
                                  [records[str(refs[k].id)] for k in ks]), files.values()),
                             strict=True):
            for k, why in zip(ks, found, strict=True):
                whys[k] = why
    damaged = [(ref, Damaged(site.name, ref.datasetType.name, dict(ref.dataId.required), uri, why))
               for ref, uri, why in zip(refs, uris, whys, strict=True) if why]
    result = Verification(len(refs), [d for _, d in damaged])
    if repair and damaged:
        butler.pruneDatasets([ref for ref, _ in damaged], disassociate=True, unstore=True,
                             purge=True)
        result.repaired = len(damaged)
    return result


def verify_campaign(sites: CampaignSites, campaign: str, only: str | None = None,
                    fraction: float = 1.0, seed: int = 0,
                    repair: bool = False) -> dict[str, Verification]:
    """verify_site at every site (or only one), against the records of all sites."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction}: must be in (0, 1]")
    records = recorded((s.store, campaign_runs(open_butler(s), campaign))
                       for s in sites.sites.values())
    return {name: verify_site(site, campaign, records, fraction, seed, repair)
            for name, site in sites.sites.items() if only in (None, name)}
