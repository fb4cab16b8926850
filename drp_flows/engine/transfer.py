"""Closed-loop transfers of Butler datasets between sites (every data movement of ARCHITECTURE.md).

plan (which datasets, how many bytes, what the destination already has) -> copy through fsspec
over parallel streams, large files alone and small ones in zip bundles (one round trip per
bundle; checked and unpacked in the destination's staging area), every file's sha256 checked
against the one recorded when it was made before it leaves (when the caller knows it) and on
the far side and the file or bundle sent again when it does not match ->
ingest at the destination in place (dimension records first, same dataset IDs and RUNs, what
exists is skipped) -> verify that every planned dataset is now registered there -> a ledger
(files, bundles, bytes, seconds, MB/s). Nothing is ingested before its checksum matched, and
nothing is reported done before the verification passes.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lsst.daf.butler import Butler, DatasetRef, FileDataset

from drp_flows.engine.planning import dataset_uris
from drp_flows.sites.butler import formatter_for, ingest_recorded
from drp_flows.sites.storage import Storage
from drp_flows.tasks.camera import INSTRUMENT

COPY_ATTEMPTS = 3
BUNDLE_BYTES = 32 * 2**20        # target zip bundle size
SMALL_FILE_BYTES = 4 * 2**20     # files below this travel in bundles
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
            items.append(TransferItem(ref, str(uri), destination_store.join("repo", uri[len(source_root) + 1:]),
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


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _write_unit(destination_store: Storage, unit: list[TransferItem], data: dict[str, bytes],
                staging: str) -> bool:
    """One file straight to its place; a bundle as one zip to the destination's staging area,
    checked there and unpacked, then removed. False if the bundle arrived damaged."""
    if len(unit) == 1:
        with destination_store.open(unit[0].destination_uri, "wb") as f:
            f.write(data[unit[0].source_uri])
        return True
    names = {item.source_uri: f"{k:05d}" for k, item in enumerate(unit)}
    bundle = _zip({names[u]: d for u, d in data.items()})
    try:
        with destination_store.open(staging, "wb") as f:
            f.write(bundle)
        with destination_store.open(staging, "rb") as f:
            arrived = f.read()
        if _sha256(arrived) != _sha256(bundle):
            return False
        with zipfile.ZipFile(io.BytesIO(arrived)) as z:
            for item in unit:
                with destination_store.open(item.destination_uri, "wb") as out:
                    out.write(z.read(names[item.source_uri]))
        return True
    finally:
        destination_store.rm(staging)


def copy_unit(source_store: Storage, destination_store: Storage, unit: list[TransferItem],
              staging: str) -> tuple[int, int]:
    """Copy one file or bundle, re-reading every file at the destination until its sha256
    matches the source's (COPY_ATTEMPTS at most). Returns (bytes, retries)."""
    data = {}
    for item in unit:
        with source_store.open(item.source_uri, "rb") as f:
            data[item.source_uri] = f.read()
        if item.sha256 and _sha256(data[item.source_uri]) != item.sha256:
            raise TransferError(
                f"{item.source_uri} at {source_store.root} is damaged: its sha256 differs from "
                "the one recorded when it was made, so it is not sent on (`drp verify "
                "CAMPAIGN --repair` unregisters it, and a re-run makes it again)")
    digests = {item.destination_uri: _sha256(data[item.source_uri]) for item in unit}
    for attempt in range(COPY_ATTEMPTS):
        if not _write_unit(destination_store, unit, data, staging):
            continue                     # a bundle damaged in flight: send it again
        bad = []
        for uri, digest in digests.items():
            with destination_store.open(uri, "rb") as f:
                if _sha256(f.read()) != digest:
                    bad.append(uri)
        if not bad:
            return sum(map(len, data.values())), attempt
    raise TransferError(f"{unit[0].destination_uri}" + (f" and {len(unit) - 1} more" if len(unit) > 1 else "")
                        + f": checksums differ from the source's at {source_store.root} after "
                        f"{COPY_ATTEMPTS} attempts")


def copy_items(ledger: Ledger, source_store: Storage, destination_store: Storage,
               items: list[TransferItem], bundle_bytes: int = BUNDLE_BYTES,
               small_bytes: int = SMALL_FILE_BYTES, streams: int = STREAMS) -> Ledger:
    """Copy files and bundles over `streams` parallel streams, each checked at the far side;
    bytes, bundles and retries go into the ledger."""
    units = plan_units(items, file_sizes(source_store, [i.source_uri for i in items]), bundle_bytes,
                       small_bytes)
    staging = destination_store.join("transfers", uuid.uuid4().hex)
    with ThreadPoolExecutor(max_workers=streams) as pool:
        results = list(pool.map(lambda k: copy_unit(source_store, destination_store, units[k],
                                                    f"{staging}/bundle-{k:05d}.zip"),
                                range(len(units))))
    destination_store.rm(staging)
    ledger.bundles += sum(len(u) > 1 for u in units)
    for size, retries in results:
        ledger.bytes += size
        ledger.retries += retries
    return ledger


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
    ingest_recorded(destination, datasets, {i.ref.id: (i.size, i.sha256) for i in items if i.sha256})


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
    copy_items(ledger, source_store, destination_store, items)
    if items:
        ingest_items(source, destination, destination_store, items)
        verify(destination, items)
    ledger.seconds = time.perf_counter() - start
    return ledger
