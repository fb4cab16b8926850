"""Registration (BPS's finalJob): bulk, idempotent ingest of quantum manifests into a Butler.

Workers wrote the files inside the site's datastore root; registration records them in place
(transfer=None), one call per batch, skipping datasets that are already registered in the run.
It runs in the flow process, the only writer of the site's registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lsst.daf.butler import Butler, DatasetRef, FileDataset

from drp_flows.datamodel import DATASET_TYPES
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


def full_data_id(spec_dims: tuple[str, ...], data_id: dict) -> dict:
    return {"instrument": INSTRUMENT, **data_id} if "instrument" in spec_dims else dict(data_id)


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
    existing = registered_keys(butler, run, {m.dataset_type for m in manifests})
    datasets = []
    for m in manifests:
        spec = DATASET_TYPES[m.dataset_type]
        data_id = butler.registry.expandDataId(full_data_id(spec.dimensions, m.data_id))
        if (m.dataset_type, tuple(sorted(data_id.required.items()))) in existing:
            reg.skipped += 1
            continue
        ref = DatasetRef(butler.get_dataset_type(m.dataset_type), data_id, run=run)
        datasets.append(FileDataset(path=storage.butler_uri_of(m.uri), refs=[ref],
                                    formatter=formatter_for(spec.storage_class)))
    if datasets:
        butler.ingest(*datasets, transfer=None)
    reg.ingested = len(datasets)
    reg.seconds = time.perf_counter() - start
    return reg
