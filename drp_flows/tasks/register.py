"""Registration (BPS's finalJob): bulk, idempotent ingest of quantum manifests into a Butler.

Workers wrote the files inside the site's datastore root; registration records them in place
(transfer=None), one call per batch, skipping datasets that are already registered.
It runs in the flow process, the only writer of the site's registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lsst.daf.butler import Butler, DatasetIdGenEnum, DatasetRef, FileDataset

from drp_flows.sites.butler import formatter_for
from drp_flows.sites.storage import Storage
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.quanta import OutputManifest, QuantumResult


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
    manifests: list[OutputManifest] = [m for r in results if r.ok for m in r.outputs]
    reg = Registration(run)
    if not manifests:
        return reg
    butler.registry.registerRun(run)
    types = {name: butler.get_dataset_type(name) for name in {m.dataset_type for m in manifests}}
    datasets = []
    for m in manifests:
        dataset_type = types[m.dataset_type]
        data_id = m.data_id
        if "instrument" in dataset_type.dimensions.names and "instrument" not in data_id:
            data_id = {"instrument": INSTRUMENT, **data_id}
        ref = DatasetRef(dataset_type, data_id, run=run,
                         id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN)
        datasets.append(FileDataset(path=storage.butler_uri_of(m.uri), refs=[ref],
                                    formatter=formatter_for(dataset_type.storageClass_name)))
    butler.ingest(*datasets, transfer=None, skip_existing=True)
    reg.datasets = len(datasets)
    reg.seconds = time.perf_counter() - start
    return reg
