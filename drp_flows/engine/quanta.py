"""Quanta: one step on one data ID, what runs on a worker, and their clustering into batches.

A quantum reads its inputs by URI, writes its outputs to the site's storage and returns a small
manifest; it never touches a registry. Data failures (DataError: a bad or corrupt input, a
fit that cannot converge) are results (status "failed", with error class and message) and the
rest goes on; transient errors (lost connections, time-outs) are re-raised so Dask retries the
quantum; anything else is a bug, which fails the quantum's group with its traceback.
engine/executor.py runs quanta on a site's clusters.
"""

from __future__ import annotations

import errno
import hashlib
import resource
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

from drp_flows.errors import CorruptInput, DataError
from drp_flows.sites.storage import (
    SMALL_FILE_BYTES,
    Storage,
    member_name,
    member_uri,
    zip_bytes,
)

TRANSIENT_ERRORS = (ConnectionError, TimeoutError)
# OSErrors that a second try may not meet (a storage server's hiccup), unlike a missing file
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESTALE}


def transient(e: BaseException) -> bool:
    """An error Dask should retry the quantum for, rather than a verdict on its data."""
    return isinstance(e, TRANSIENT_ERRORS) or (isinstance(e, OSError)
                                               and e.errno in TRANSIENT_ERRNOS)


@contextmanager
def reading(uri: str):
    """Reading and parsing an input: what goes wrong is a corrupt (or missing) input, named,
    unless it is transient, which is raised as it is for Dask to retry."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        if transient(e):
            raise
        raise CorruptInput(f"corrupt input {uri}: {type(e).__name__}: {e}") from e


class RecordedURI(str):
    """An input's URI with the size and sha256 its file had when it was registered (from the
    datastore's records, sites/butler.py ingest_recorded): a plain string everywhere else."""

    def __new__(cls, uri: str, sha256: str, size: int):
        self = super().__new__(cls, uri)
        self.sha256, self.size = sha256, size
        return self

    def __reduce__(self):
        return RecordedURI, (str(self), self.sha256, self.size)


def read_input(storage: Storage, uri: str) -> bytes:
    """An input file's bytes, read whole and checked against its record when it has one: a
    file damaged since it was registered fails its quantum as a corrupt input, named."""
    with reading(uri), storage.open(uri, "rb") as f:
        data = f.read()
    if isinstance(uri, RecordedURI):
        if len(data) != uri.size:
            raise CorruptInput(f"corrupt input {uri}: {len(data)} bytes, {uri.size} recorded "
                               "when it was registered")
        if hashlib.sha256(data).hexdigest() != uri.sha256:
            raise CorruptInput(f"corrupt input {uri}: its sha256 differs from the one recorded "
                               "when it was registered")
    return data


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
    reason: str = ""   # why it failed: data, corrupt input, bug, transient, memory, killed worker
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    inputs: dict = field(default_factory=dict)
    started: float = 0.0             # when it started and ended on its worker (Unix seconds)
    ended: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "done"


class ZipBundle:
    """The small outputs of a cluster of quanta (engine/executor.py run_cluster), held in
    memory and written as one zip when the cluster ends: one write instead of one a file, and
    a transfer later reads them in one go (S3 pays per zip, not per file). The Butler reads
    each in place (`<zip>#zip-path=<name>`)."""

    def __init__(self):
        self.storage: Storage | None = None
        self.files: dict[str, bytes] = {}         # planned URI -> bytes

    def keep(self, storage: Storage, uri: str, data: bytes) -> None:
        self.storage = storage
        self.files[uri] = data

    def write(self, results: list[QuantumResult]) -> list[QuantumResult]:
        """The zip of the done quanta's kept outputs (a failed quantum's are dropped); their
        manifests name each file in it."""
        kept = {m.uri for r in results if r.ok for m in r.outputs if m.uri in self.files}
        if not kept:
            return results
        archive = self.storage.new_zip()
        paths = {uri: self.storage.repo_path(uri) for uri in kept}
        with self.storage.open(archive, "wb") as f:
            f.write(zip_bytes({member_name(paths[uri]): self.files[uri] for uri in sorted(kept)}))
        return [replace(r, outputs=[replace(m, uri=member_uri(archive, paths[m.uri]))
                                    if m.uri in kept else m for m in r.outputs])
                for r in results]


BUNDLE: ContextVar[ZipBundle | None] = ContextVar("drp_zip_bundle", default=None)


class OutputWriter:
    """Writes a quantum's outputs to their planned URIs (a small one into its cluster's zip,
    when it runs in a cluster) and records size and checksum."""

    def __init__(self, storage: Storage, quantum: Quantum):
        self.storage, self.quantum = storage, quantum
        self.written: list[OutputManifest] = []

    def write(self, dataset_type: str, data: bytes, data_id: dict | None = None) -> None:
        uri = self.quantum.outputs[dataset_type]
        bundle = BUNDLE.get()
        if bundle is not None and len(data) < SMALL_FILE_BYTES:
            bundle.keep(self.storage, uri, data)
        else:
            with self.storage.open(uri, "wb") as f:
                f.write(data)
        self.written.append(OutputManifest(dataset_type, data_id or self.quantum.data_id, uri,
                                           len(data), hashlib.sha256(data).hexdigest()))


StepFunction = Callable[[Quantum, Storage, OutputWriter, dict], None]


def reset_peak_memory() -> None:
    """Start this process's peak resident size afresh (Linux's clear_refs, 5: the high-water
    mark), so that the peak after a quantum is that quantum's (one thread per worker)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:     # not Linux, or not allowed: the process's lifetime peak, an upper bound
        pass


def peak_memory_mb() -> float:
    """This process's peak resident size since the last reset (VmHWM), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def execute_quantum(step: StepFunction, storage: Storage, config: dict,
                    quantum: Quantum) -> QuantumResult:
    """Run one quantum on a worker; science errors become a failed result."""
    reset_peak_memory()
    started, start = time.time(), time.perf_counter()
    writer = OutputWriter(storage, quantum)
    result = QuantumResult(quantum.step, quantum.data_id, "done", inputs=quantum.inputs)
    try:
        step(quantum, storage, writer, config)
        missing = set(quantum.outputs) - {m.dataset_type for m in writer.written}
        if missing:
            raise RuntimeError(f"{quantum} did not write {sorted(missing)}")
        result.outputs = writer.written
    except Exception as e:  # a failed quantum is a result, not a crashed batch
        if transient(e):
            raise
        result.status, result.outputs = "failed", []
        result.error_class = type(e).__name__
        result.error = f"{quantum}: {e}"
        tb = traceback.extract_tb(e.__traceback__)
        if tb:
            result.error += f" [{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}]"
        if isinstance(e, DataError):
            result.reason = "corrupt input" if isinstance(e, CorruptInput) else "data"
        elif isinstance(e, MemoryError):
            result.reason = "memory"
        else:                       # a bug: the group fails with it (engine/dataflow.py)
            result.reason = "bug"
            result.error += "\n" + "".join(traceback.format_exception(e))
    result.seconds = time.perf_counter() - start
    result.started, result.ended = started, started + result.seconds
    result.peak_rss_mb = peak_memory_mb()
    return result


def ordered(quanta: Iterable[Quantum], dimensions: tuple[str, ...]) -> list[Quantum]:
    """Dimension clustering (BPS style), as an order: quanta sharing `dimensions` values (all
    detectors of a visit) run one after the other, so a visit's inputs stay warm in the
    workers' caches and its consolidation's inputs are all there early."""
    return sorted(quanta, key=lambda q: (tuple(q.data_id.get(d) for d in dimensions), q.key))
