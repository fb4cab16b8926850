"""Registration (BPS's finalJob): bulk, idempotent ingest of quantum manifests into a Butler.

Workers wrote the files inside the site's datastore root; registration records them in place
(transfer=None), one call per batch, skipping datasets that are already registered in the run.
It runs in the flow process, the only writer of the site's registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lsst.daf.butler import Butler, DatasetRef, FileDataset

from drp_flows.sites.butler import formatter_for
from drp_flows.sites.storage import Storage
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.quanta import OutputManifest, QuantumResult


@dataclass
class Registration:
    run: str
    ingested: int = 0
    skipped: int = 0
    seconds: float = 0.0


def registered_keys(butler: Butler, run: str, dataset_types: set[str]) -> set[tuple]:
    """(dataset type, data ID) pairs already in a run."""
    keys = set()
    for name in dataset_types:
        for ref in butler.registry.queryDatasets(name, collections=run, findFirst=True):
            keys.add((name, tuple(sorted(ref.dataId.required.items()))))
    return keys


def register_outputs(butler: Butler, storage: Storage, results: list[QuantumResult],
                     run: str) -> Registration:
    start = time.perf_counter()
    manifests: list[OutputManifest] = [m for r in results if r.ok for m in r.outputs]
    reg = Registration(run)
    if not manifests:
        return reg
    butler.registry.registerRun(run)
    types = {name: butler.get_dataset_type(name) for name in {m.dataset_type for m in manifests}}
    existing = registered_keys(butler, run, set(types))
    datasets = []
    for m in manifests:
        dataset_type = types[m.dataset_type]
        data_id = m.data_id
        if "instrument" in dataset_type.dimensions.names and "instrument" not in data_id:
            data_id = {"instrument": INSTRUMENT, **data_id}
        ref = DatasetRef(dataset_type, data_id, run=run)
        if (m.dataset_type, tuple(sorted(ref.dataId.required.items()))) in existing:
            reg.skipped += 1
            continue
        datasets.append(FileDataset(path=storage.butler_uri_of(m.uri), refs=[ref],
                                    formatter=formatter_for(dataset_type.storageClass_name)))
    if datasets:
        butler.ingest(*datasets, transfer=None)
    reg.ingested = len(datasets)
    reg.seconds = time.perf_counter() - start
    return reg
