"""The batching engine: quanta, their clustering into batches, and running a batch on Dask.

A quantum is one step on one data ID. It reads its inputs by URI, writes its outputs to the
site's storage and returns a small manifest; it never touches a registry. A batch is a list of
quanta of one step that one Prefect task drives with `client.map` (explicit keys, results as
they complete). Science failures are data (status "failed", with error class and message) and
the batch carries on; transient errors (lost connections, time-outs) are re-raised so Dask
retries the quantum, and a quantum whose retries run out is recorded as failed too.
"""

from __future__ import annotations

import hashlib
import resource
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby

from distributed import Client, as_completed

from drp_flows.sites.storage import Storage

TRANSIENT_ERRORS = (ConnectionError, TimeoutError)


@dataclass(frozen=True)
class Quantum:
    step: str
    data_id: dict
    inputs: dict = field(default_factory=dict)    # dataset type -> URI or list of URIs
    outputs: dict = field(default_factory=dict)   # dataset type -> URI to write

    @property
    def key(self) -> str:
        return self.step + "-" + "-".join(f"{k}{v}" for k, v in sorted(self.data_id.items()))

    def __str__(self) -> str:
        ids = ", ".join(f"{k}={v}" for k, v in self.data_id.items())
        return f"{self.step}({ids})"


@dataclass(frozen=True)
class OutputManifest:
    dataset_type: str
    data_id: dict
    uri: str
    bytes: int
    sha256: str


@dataclass
class QuantumResult:
    step: str
    data_id: dict
    status: str                      # done | failed
    outputs: list[OutputManifest] = field(default_factory=list)
    error_class: str = ""
    error: str = ""
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    inputs: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "done"


class OutputWriter:
    """Writes a quantum's outputs to their planned URIs and records size and checksum."""

    def __init__(self, storage: Storage, quantum: Quantum):
        self.storage, self.quantum = storage, quantum
        self.written: list[OutputManifest] = []

    def write(self, dataset_type: str, data: bytes, data_id: dict | None = None) -> None:
        uri = self.quantum.outputs[dataset_type]
        with self.storage.open(uri, "wb") as f:
            f.write(data)
        self.written.append(OutputManifest(dataset_type, data_id or self.quantum.data_id, uri,
                                           len(data), hashlib.sha256(data).hexdigest()))


StepFunction = Callable[[Quantum, Storage, OutputWriter, dict], None]


def execute_quantum(step: StepFunction, storage: Storage, config: dict,
                    quantum: Quantum) -> QuantumResult:
    """Run one quantum on a worker; science errors become a failed result."""
    start = time.perf_counter()
    writer = OutputWriter(storage, quantum)
    result = QuantumResult(quantum.step, quantum.data_id, "done", inputs=quantum.inputs)
    try:
        step(quantum, storage, writer, config)
        missing = set(quantum.outputs) - {m.dataset_type for m in writer.written}
        if missing:
            raise RuntimeError(f"{quantum} did not write {sorted(missing)}")
        result.outputs = writer.written
    except TRANSIENT_ERRORS:
        raise
    except Exception as e:  # a failed quantum is data, not a crashed batch
        result.status = "failed"
        result.error_class = type(e).__name__
        result.error = f"{quantum}: {e}"
        result.outputs = []
        tb = traceback.extract_tb(e.__traceback__)
        if tb:
            result.error += f" [{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}]"
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def cluster_quanta(quanta: Iterable[Quantum], dimensions: tuple[str, ...],
                   max_size: int) -> list[list[Quantum]]:
    """Dimension clustering (BPS style): quanta sharing `dimensions` values stay together,
    whole clusters are packed into batches of at most `max_size` quanta, split only if larger."""
    if max_size < 1:
        raise ValueError(f"max_size={max_size}: must be >= 1")

    def cluster_key(q: Quantum):
        return tuple(q.data_id.get(d) for d in dimensions)

    ordered = sorted(quanta, key=lambda q: (cluster_key(q), q.key))
    batches: list[list[Quantum]] = [[]]
    for _, group in groupby(ordered, key=cluster_key):
        members = list(group)
        if batches[-1] and len(batches[-1]) + len(members) > max_size:
            batches.append([])
        while len(members) > max_size:
            if batches[-1]:
                batches.append([])
            batches[-1].extend(members[:max_size])
            members = members[max_size:]
            batches.append([])
        batches[-1].extend(members)
    return [b for b in batches if b]


def run_batch(client: Client, step: StepFunction, storage: Storage, config: dict,
              quanta: list[Quantum], token: str, retries: int = 2,
              on_result: Callable[[QuantumResult], None] | None = None) -> list[QuantumResult]:
    """Map a batch onto the cluster; returns one result per quantum, in completion order."""
    by_key = {f"{q.key}-{token}": q for q in quanta}
    futures = client.map(partial(execute_quantum, step, storage, config), list(by_key.values()),
                         key=list(by_key), retries=retries, pure=False)
    results = []
    for future in as_completed(futures, loop=client.loop):
        if future.status == "finished":
            result = future.result()
        else:
            exc = future.exception()
            q = by_key[future.key]
            result = QuantumResult(q.step, q.data_id, "failed", error_class=type(exc).__name__,
                                   error=f"{q}: {exc} (after {retries} retries)", inputs=q.inputs)
        future.release()
        results.append(result)
        if on_result:
            on_result(result)
    return results
