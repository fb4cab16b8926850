"""Closed-loop transfers of Butler datasets between sites (the six data movements).

plan (which datasets, how many bytes, what the destination already has) -> copy each file
through fsspec with its sha256 checked on the far side, retried when it does not match ->
ingest at the destination in place (dimension records first, same dataset IDs and RUNs, what
exists is skipped) -> verify that every planned dataset is now found there with the bytes it
had at the source -> a ledger (files, bytes, seconds, MB/s). Nothing is reported done before
the verification passes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from lsst.daf.butler import Butler, DatasetRef, FileDataset

from drp_flows.sites.butler import formatter_for
from drp_flows.sites.storage import Storage
from drp_flows.tasks.camera import INSTRUMENT

COPY_ATTEMPTS = 3


class TransferError(RuntimeError):
    """A transfer that could not be completed or verified; names the datasets and sites."""


@dataclass(frozen=True)
class TransferItem:
    ref: DatasetRef
    source_uri: str
    destination_uri: str


@dataclass
class Ledger:
    label: str
    source: str
    destination: str
    datasets: int = 0          # planned and verified at the destination
    files: int = 0             # copied now (the rest were already there)
    bytes: int = 0
    seconds: float = 0.0
    retries: int = 0
    checksums: dict = field(default_factory=dict, repr=False)

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
        refs = source.registry.queryDatasets(dataset_type, collections=collections, findFirst=True,
                                             instrument=INSTRUMENT, where=where, bind=bind or {})
        for ref in refs:
            if destination.get_dataset(ref.id) is not None:
                continue
            uri = source_store.from_butler_uri(source.getURI(ref))
            if not uri.startswith(source_root):
                raise TransferError(f"{ref} at {uri} lies outside the repository {source_root}")
            items.append(TransferItem(ref, uri, destination_store.join("repo", uri[len(source_root) + 1:])))
    return items


def copy_file(source_store: Storage, destination_store: Storage, item: TransferItem) -> tuple[int, str, int]:
    """Copy one file, re-reading it at the destination until its sha256 matches the source's.
    Returns (bytes, sha256, retries)."""
    with source_store.open(item.source_uri, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    for attempt in range(COPY_ATTEMPTS):
        with destination_store.open(item.destination_uri, "wb") as f:
            f.write(data)
        with destination_store.open(item.destination_uri, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == digest:
                return len(data), digest, attempt
    raise TransferError(f"{item.ref.datasetType.name} {dict(item.ref.dataId.required)}: "
                        f"checksum of {item.destination_uri} differs from {item.source_uri} "
                        f"after {COPY_ATTEMPTS} attempts")


def ingest_items(source: Butler, destination: Butler, destination_store: Storage,
                 items: list[TransferItem]) -> None:
    """Register copied files at the destination: dimension records, RUNs, then the datasets."""
    refs = [i.ref for i in items]
    destination.transfer_dimension_records_from(source, refs)
    for run in sorted({r.run for r in refs}):
        destination.registry.registerRun(run)
    datasets = [FileDataset(path=destination_store.butler_uri_of(i.destination_uri), refs=[i.ref],
                            formatter=formatter_for(i.ref.datasetType.storageClass_name))
                for i in items]
    destination.ingest(*datasets, transfer=None, skip_existing=True)


def verify(destination: Butler, destination_store: Storage, items: list[TransferItem],
           checksums: dict[str, str]) -> None:
    """Every planned dataset is registered at the destination, with the source's bytes."""
    missing = [i for i in items if destination.get_dataset(i.ref.id) is None]
    if missing:
        raise TransferError(f"{len(missing)} datasets not registered after ingest, e.g. "
                            f"{missing[0].ref.datasetType.name} {dict(missing[0].ref.dataId.required)}")
    for item in items:
        with destination_store.open(item.destination_uri, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != checksums[item.destination_uri]:
                raise TransferError(f"{item.destination_uri} changed after ingest")


def transfer(ledger: Ledger, source: Butler, source_store: Storage, destination: Butler,
             destination_store: Storage, items: list[TransferItem]) -> Ledger:
    """Copy, ingest and verify planned items, filling in the ledger."""
    ledger.datasets = len(items)
    start = time.perf_counter()
    for item in items:
        size, digest, retries = copy_file(source_store, destination_store, item)
        ledger.files += 1
        ledger.bytes += size
        ledger.retries += retries
        ledger.checksums[item.destination_uri] = digest
    if items:
        ingest_items(source, destination, destination_store, items)
        verify(destination, destination_store, items, ledger.checksums)
    ledger.seconds = time.perf_counter() - start
    return ledger
