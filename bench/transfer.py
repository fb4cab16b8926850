"""Fan-in of 1,500 small files (~30 MB): per-file copy vs zipped bundles vs a raw copy of the
same bytes as one file, local -> local and S3 -> S3 between two moto_server endpoints.

Every variant goes through `copy_items` (read at the source, write at the destination, sha256
of every file re-read at the far side), so the figures include the checks; "raw" copies one
file of the same total size. moto runs on this machine, so S3 round trips cost its HTTP
handling, not a WAN's latency: per-file costs on a real network are larger still.
Run: make bench (or python bench/transfer.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import moto_server  # noqa: E402

from drp_flows.engine.transfer import Ledger, TransferItem, copy_items  # noqa: E402
from drp_flows.sites.storage import Storage  # noqa: E402

N_FILES = 1500


def make_files(store: Storage, rng: np.random.Generator) -> list[str]:
    """Catalog-sized files (5-35 kB, ~30 MB in all) over 50 run folders."""
    rels = []
    for k in range(N_FILES):
        rel = f"repo/run/{k % 50:02d}/table_{k:05d}.parq"
        with store.open(store.join(rel), "wb") as f:
            f.write(rng.bytes(int(rng.integers(5_000, 35_000))))
        rels.append(rel)
    return rels


def run(source: Storage, destination: Storage, rels: list[str], label: str, **kw) -> tuple[float, int]:
    items = [TransferItem(None, source.join(r), destination.join(label, r)) for r in rels]
    start = time.perf_counter()
    copied = copy_items(Ledger(label, "source", "destination"), source, destination, items, **kw)
    return time.perf_counter() - start, copied.bytes


def bench(source: Storage, destination: Storage, title: str) -> None:
    rng = np.random.default_rng(1)
    rels = make_files(source, rng)
    total = sum(source.fs.size(source.path(source.join(r))) for r in rels)
    with source.open(source.join("repo/raw/all.bin"), "wb") as f:
        f.write(rng.bytes(total))
    variants = [("per file, 1 stream", rels, dict(small_bytes=0, streams=1)),
                ("per file, 4 streams", rels, dict(small_bytes=0, streams=4)),
                ("zip bundles of 8 MB, 4 streams", rels, dict(bundle_bytes=8 * 2**20, streams=4)),
                ("raw copy, one file", ["repo/raw/all.bin"], dict(streams=1))]
    print(f"\n{title}: {N_FILES} files, {total / 1e6:.1f} MB")
    print(f"{'variant':34s} {'seconds':>8s} {'MB/s':>7s} {'x raw':>7s}")
    rows = [(name, *run(source, destination, r, f"v{k}", **kw)) for k, (name, r, kw) in enumerate(variants)]
    raw = rows[-1][1]
    for name, seconds, nbytes in rows:
        print(f"{name:34s} {seconds:8.2f} {nbytes / 1e6 / seconds:7.1f} {seconds / raw:7.1f}")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        bench(Storage(f"file://{tmp}/a"), Storage(f"file://{tmp}/b"), "local -> local")
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    with moto_server("usdf") as a, moto_server("frdf") as b:
        bench(Storage("s3://usdf/drp", {"endpoint_url": a}, "usdf"),
              Storage("s3://frdf/drp", {"endpoint_url": b}, "frdf"), "S3 -> S3, two endpoints")


if __name__ == "__main__":
    main()
