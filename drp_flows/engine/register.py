"""Registration (BPS's finalJob): bulk, idempotent ingest of quantum manifests into a Butler.

Workers wrote the files inside the site's datastore root (a cluster's small outputs in one
zip, each read in place from it); registration records them in place (transfer=None), one call
per batch, skipping datasets that are already registered, with the size and sha256 each
quantum measured as it wrote (in the datastore's records: the next quanta check what they read
against them).
It runs in the flow process, the only writer of the site's registry.

The manifests themselves are kept beside the repository (`<storage>/manifests/<run>/`, one
Parquet table per batch): every output's dataset ID, URI, size and sha256, and the inputs its
quantum read, so that its bytes can be verified and its provenance traced later.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from astropy.table import Table, vstack
from lsst.daf.butler import Butler, DatasetIdGenEnum, DatasetRef, FileDataset

from drp_flows.engine.quanta import OutputManifest, QuantumResult
from drp_flows.sites.butler import formatter_for, ingest_recorded
from drp_flows.sites.storage import Storage
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.catalogs import read_table, table_bytes


@dataclass
class Registration:
    run: str
    datasets: int = 0      # registered now or already present
    seconds: float = 0.0


def register_outputs(butler: Butler, storage: Storage, results: list[QuantumResult],
                     run: str) -> Registration:
    """Ingest the outputs of a batch's successful quanta in one call.

    Dataset IDs are derived from (dataset type, data ID, run), so an output registered before
    (a re-run, a retried batch) has the same ID and is skipped by the Butler itself: the cost
    stays proportional to the batch, never to what the run already holds.
    """
    start = time.perf_counter()
    manifests: list[tuple[OutputManifest, QuantumResult]] = [(m, r) for r in results if r.ok
                                                             for m in r.outputs]
    reg = Registration(run)
    if not manifests:
        return reg
    butler.registry.registerRun(run)
    types = {name: butler.get_dataset_type(name) for name in {m.dataset_type for m, _ in manifests}}
    datasets = []
    for m, _ in manifests:
        dataset_type = types[m.dataset_type]
        data_id = m.data_id
        if "instrument" in dataset_type.dimensions.names and "instrument" not in data_id:
            data_id = {"instrument": INSTRUMENT, **data_id}
        ref = DatasetRef(dataset_type, data_id, run=run,
                         id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN)
        datasets.append(FileDataset(path=storage.butler_uri_of(m.uri), refs=[ref],
                                    formatter=formatter_for(dataset_type.storageClass_name)))
    ingest_recorded(butler, datasets, {d.refs[0].id: (m.bytes, m.sha256)
                                       for d, (m, _) in zip(datasets, manifests, strict=True)})
    keep_manifests(storage, run, [(d.refs[0], m, r) for d, (m, r) in zip(datasets, manifests,
                                                                          strict=True)])
    reg.datasets = len(datasets)
    reg.seconds = time.perf_counter() - start
    return reg


def manifest_folder(storage: Storage, run: str) -> str:
    return storage.join("manifests", run)


def keep_manifests(storage: Storage, run: str,
                   registered: list[tuple[DatasetRef, OutputManifest, QuantumResult]]) -> None:
    """One Parquet table of a batch's manifests, beside the repository."""
    table = Table(rows=[(str(ref.id), m.dataset_type, json.dumps(m.data_id), m.uri, m.bytes,
                         m.sha256, f"{r.step} {r.data_id}", r.seconds, r.peak_rss_mb, json.dumps(r.inputs),
                          r.started, r.ended)
                        for ref, m, r in registered],
                  names=("dataset_id", "dataset_type", "data_id", "uri", "bytes", "sha256",
                         "quantum", "seconds", "peak_rss_mb", "inputs", "started", "ended"))
    uri = f"{manifest_folder(storage, run)}/{uuid.uuid4().hex}.parq"
    with storage.open(uri, "wb") as f:
        f.write(table_bytes(table))


def read_manifests(storage: Storage, runs: list[str]) -> Table:
    """Every kept manifest of the given RUNs (one row per registered output)."""
    paths = [p for run in runs
             for p in storage.fs.glob(storage.path(manifest_folder(storage, run)) + "/*.parq")]
    tables = [read_table(storage, f"{storage.scheme}://{p}") for p in sorted(paths)]
    return vstack(tables) if tables else Table()
