"""Closed-loop transfers of Butler datasets between sites (every data movement of ARCHITECTURE.md).

plan (which datasets, how many bytes, what the destination already has, each file's size and
sha256 from the source's records) -> copy through fsspec over parallel streams, large files
alone and small ones in zip bundles that stay zips at the destination (one round trip per
bundle at that end; the Butler reads a file in place from its zip, `<zip>#zip-path=<name>`),
every file checked against the sha256 recorded when it was made as it leaves, and what
arrived read back and compared with what was sent, file or bundle sent again when it differs
-> ingest at the destination in place (dimension records first, same dataset IDs and RUNs,
each file's size and sha256 in the records) -> verify that every planned dataset is now
registered there -> a ledger (files, bundles, bytes, seconds, MB/s). Nothing is ingested
before its checksum matched, and nothing is reported done before the verification passes.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from lsst.daf.butler import Butler, DatasetRef, FileDataset

from drp_flows.engine.planning import dataset_uris
from drp_flows.sites.butler import formatter_for, ingest_recorded
from drp_flows.sites.storage import (
    SMALL_FILE_BYTES,
    Storage,
    member_name,
    member_uri,
    split_member,
    zip_bytes,
)
from drp_flows.tasks.camera import INSTRUMENT

COPY_ATTEMPTS = 3
BUNDLE_BYTES = 32 * 2**20        # target zip bundle size
STREAMS = 4                      # files and bundles copied at once


class TransferError(RuntimeError):
    """A transfer that could not be completed or verified; names the datasets and sites."""


@dataclass(frozen=True)
class TransferItem:
    ref: DatasetRef | None       # None for plain files (the copy needs only the two URIs)
    source_uri: str
    destination_uri: str
    sha256: str = ""             # recorded when it was made (the source's records), if known
    size: int = -1


@dataclass
class Ledger:
    label: str
    source: str
    destination: str
    datasets: int = 0          # planned and verified at the destination
    files: int = 0             # copied now (the rest were already there)
    bundles: int = 0           # zip bundles the small files travelled in
    bytes: int = 0
    seconds: float = 0.0
    retries: int = 0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


def plan_transfer(source: Butler, source_store: Storage, destination: Butler,
                  destination_store: Storage, dataset_types: list[str], collections: list[str],
                  where: str = "", bind: dict | None = None) -> list[TransferItem]:
    """The datasets to move: found (find-first) in the source collections, not yet present at
    the destination (same dataset ID); each keeps its path relative to the repository root."""
    items = []
    source_root = source_store.join("repo")
    for dataset_type in dataset_types:
        refs = [ref for ref in source.registry.queryDatasets(
                    dataset_type, collections=collections, findFirst=True, instrument=INSTRUMENT,
                    where=where, bind=bind or {})
                if destination.get_dataset(ref.id) is None]
        for ref, uri in zip(refs, dataset_uris(source, source_store, refs), strict=True):
            if not uri.startswith(source_root):
                raise TransferError(f"{ref} at {uri} lies outside the repository {source_root}")
            # where it lies in the repository (in a zip: its name there)
            path = split_member(uri)[1] or uri[len(source_root) + 1:]
            items.append(TransferItem(ref, str(uri), destination_store.join("repo", path),
                                      getattr(uri, "sha256", ""), getattr(uri, "size", -1)))
    return items


class EmbargoError(TransferError):
    """A transfer that would copy embargoed data to a site outside the embargo."""


def check_embargo(items: list[TransferItem], embargoed: set[int], source: str, destination: str,
                  destination_embargo: bool) -> None:
    """Refuse to plan embargoed datasets (those of an embargoed exposure or visit) for a
    destination that is not an embargo site, naming them and the sites."""
    if destination_embargo or not embargoed:
        return
    bad = [i for i in items if i.ref is not None and _exposure_of(i.ref) in embargoed]
    if bad:
        named = ", ".join(f"{i.ref.datasetType.name} {dict(i.ref.dataId.required)}" for i in bad[:3])
        raise EmbargoError(f"{len(bad)} embargoed datasets may not go from {source} to {destination}, "
                           f"which is not an embargo site: {named}" + (" ..." if len(bad) > 3 else ""))


def _exposure_of(ref: DatasetRef) -> int | None:
    ids = ref.dataId.required
    return int(ids["visit"]) if "visit" in ids else int(ids["exposure"]) if "exposure" in ids else None


def file_sizes(store: Storage, uris: list[str]) -> dict[str, int]:
    """Sizes of files, from one listing per directory rather than one request per file."""
    folders: dict[str, list[str]] = {}
    for uri in uris:
        folders.setdefault(uri.rsplit("/", 1)[0], []).append(uri)
    sizes = {}
    for folder, members in folders.items():
        listed = {store.fs._strip_protocol(e["name"]): e["size"]
                  for e in store.fs.ls(store.path(folder), detail=True, refresh=True)}
        for uri in members:
            if store.path(uri) not in listed:
                raise TransferError(f"{uri} is registered but missing from storage")
            sizes[uri] = int(listed[store.path(uri)])
    return sizes


def plan_units(items: list[TransferItem], sizes: dict[str, int], bundle_bytes: int = BUNDLE_BYTES,
               small_bytes: int = SMALL_FILE_BYTES) -> list[list[TransferItem]]:
    """What is copied together: a file of small_bytes or more alone, smaller ones packed in
    order into zip bundles of about bundle_bytes (one round trip each instead of one per file)."""
    units, bundle, size = [], [], 0
    for item in items:
        n = sizes[item.source_uri]
        if n >= small_bytes:
            units.append([item])
            continue
        bundle.append(item)
        size += n
        if size >= bundle_bytes:
            units.append(bundle)
            bundle, size = [], 0
    return units + ([bundle] if bundle else [])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_checked(source_store: Storage, unit: list[TransferItem]) -> tuple[list[bytes], list[str]]:
    """The files' bytes at the source (those in one zip from one reading of it) and their
    sha256, refused when one differs from its record."""
    data = source_store.read_all([item.source_uri for item in unit])
    digests = [_sha256(d) for d in data]
    for item, digest in zip(unit, digests, strict=True):
        if item.sha256 and digest != item.sha256:
            raise TransferError(
                f"{item.source_uri} at {source_store.root} is damaged: its sha256 differs from "
                "the one recorded when it was made, so it is not sent on (`drp verify "
                "CAMPAIGN --repair` unregisters it, and a re-run makes it again)")
    return data, digests


def copy_unit(source_store: Storage, destination_store: Storage,
              unit: list[TransferItem]) -> tuple[list[TransferItem], int, int]:
    """Copy one file to its place, or a bundle of small files as one new zip, where they are
    read in place (`<zip>#zip-path=<name>`). Each file is checked against its record as it
    leaves; what arrived is read back and compared with what was sent, byte for byte, and
    sent again if it differs (COPY_ATTEMPTS at most). Returns the items as placed
    (destination URI, size and sha256 filled in), the files' bytes and the retries."""
    data, digests = _read_checked(source_store, unit)
    if len(unit) == 1:
        target, payload = unit[0].destination_uri, data[0]
        placed = [replace(unit[0], sha256=digests[0], size=len(data[0]))]
    else:
        paths = [destination_store.repo_path(item.destination_uri) for item in unit]
        target = destination_store.new_zip()
        payload = zip_bytes({member_name(p): d for p, d in zip(paths, data, strict=True)})
        placed = [replace(item, destination_uri=member_uri(target, path), sha256=digest,
                          size=len(d)) for item, path, d, digest in zip(unit, paths, data, digests,
                                                                        strict=True)]
    for attempt in range(COPY_ATTEMPTS):
        with destination_store.open(target, "wb") as f:
            f.write(payload)
        with destination_store.open(target, "rb") as f:
            if f.read() == payload:     # byte for byte: what arrived is what was checked
                return placed, sum(map(len, data)), attempt
    raise TransferError(f"{unit[0].destination_uri}" + (f" and {len(unit) - 1} more" if len(unit) > 1 else "")
                        + f": what arrived differs from what left {source_store.root} after "
                        f"{COPY_ATTEMPTS} attempts")


def copy_items(ledger: Ledger, source_store: Storage, destination_store: Storage,
               items: list[TransferItem], bundle_bytes: int = BUNDLE_BYTES,
               small_bytes: int = SMALL_FILE_BYTES, streams: int = STREAMS) -> list[TransferItem]:
    """Copy files and bundles over `streams` parallel streams, each checked at the far side
    (bundles stay zips, in the destination repository's `zips/` folder); bytes, bundles and
    retries go into the ledger. Returns the items as placed."""
    sizes = {i.source_uri: i.size for i in items if i.size >= 0}
    unknown = [i.source_uri for i in items if i.size < 0]
    units = plan_units(sorted(items, key=lambda i: i.source_uri),   # a zip's files together
                       sizes | file_sizes(source_store, unknown), bundle_bytes, small_bytes)
    with ThreadPoolExecutor(max_workers=streams) as pool:
        results = list(pool.map(lambda unit: copy_unit(source_store, destination_store, unit),
                                units))
    ledger.bundles += sum(len(u) > 1 for u in units)
    placed = []
    for unit, size, retries in results:
        placed += unit
        ledger.bytes += size
        ledger.retries += retries
    return placed


def ingest_items(source: Butler, destination: Butler, destination_store: Storage,
                 items: list[TransferItem]) -> None:
    """Register copied files at the destination: dimension records, RUNs, then the datasets
    with their source's records of size and sha256."""
    refs = [i.ref for i in items]
    destination.transfer_dimension_records_from(source, refs)
    for run in sorted({r.run for r in refs}):
        destination.registry.registerRun(run)
    datasets = [FileDataset(path=destination_store.butler_uri_of(i.destination_uri), refs=[i.ref],
                            formatter=formatter_for(i.ref.datasetType.storageClass_name))
                for i in items]
    ingest_recorded(destination, datasets, {d.refs[0].id: (i.size, i.sha256)
                                            for d, i in zip(datasets, items, strict=True)})


def verify(destination: Butler, items: list[TransferItem]) -> None:
    """Every planned dataset is registered at the destination (its bytes were checked before
    ingest)."""
    missing = [i for i in items if destination.get_dataset(i.ref.id) is None]
    if missing:
        raise TransferError(f"{len(missing)} datasets not registered after ingest, e.g. "
                            f"{missing[0].ref.datasetType.name} {dict(missing[0].ref.dataId.required)}")


def transfer(ledger: Ledger, source: Butler, source_store: Storage, destination: Butler,
             destination_store: Storage, items: list[TransferItem]) -> Ledger:
    """Copy and check, ingest and verify planned items, filling in the ledger."""
    ledger.datasets = ledger.files = len(items)
    start = time.perf_counter()
    placed = copy_items(ledger, source_store, destination_store, items)
    if placed:
        ingest_items(source, destination, destination_store, placed)
        verify(destination, placed)
    ledger.seconds = time.perf_counter() - start
    return ledger
