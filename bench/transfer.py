"""Fan-in of 1,500 small files (~30 MB): per-file copy vs zipped bundles vs a raw copy of the
same bytes as one file, local -> local and S3 -> S3 between two moto_server endpoints.

Every variant goes through `copy_items` (read at the source, each file's sha256 taken there,
what arrived read back and compared at the destination), so the figures include the checks;
"raw" copies one file of the same total size. Bundles stay zips at the destination (the
Butler reads their files in place). The sources: the files loose, as quanta write them today,
or in zips of 64 (as a transfer leaves them at its destination, so an onward transfer reads
them; or as quanta would write them in zips, one a Dask task of clustered quanta). moto runs
on this machine, so S3 round trips cost its HTTP handling (~6 ms a request), not a WAN's
latency: per-file costs on a real network are larger still.
Each figure is the fastest of up to 5 runs (those under a second vary by 2x from run to run).
Run: make bench (or python bench/transfer.py). Figures: build/bench/transfer.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import moto_server  # noqa: E402

from drp_flows.engine.transfer import Ledger, TransferItem, copy_items  # noqa: E402
from drp_flows.sites.storage import Storage, member_name, member_uri, split_member, zip_bytes  # noqa: E402

N_FILES = 1500
PER_ZIP = 64
REPEATS, REPEAT_SECONDS = 5, 5.0
OUT = Path(__file__).resolve().parents[1] / "build" / "bench" / "transfer.json"


def make_files(store: Storage, rng: np.random.Generator) -> tuple[list, list]:
    """Catalog-sized files (5-35 kB, ~30 MB in all) over 50 run folders, loose, and the same
    files again in zips of PER_ZIP: (URI relative to the root, zip members as
    `<zip>#zip-path=<name>`; size, as the source's records give it)."""
    loose, zipped, members = [], [], {}
    for k in range(N_FILES):
        rel = f"repo/run/{k % 50:02d}/table_{k:05d}.parq"
        data = rng.bytes(int(rng.integers(5_000, 35_000)))
        with store.open(store.join(rel), "wb") as f:
            f.write(data)
        loose.append((rel, len(data)))
        archive = f"repo/zips/{k // PER_ZIP:03d}.zip"
        members.setdefault(archive, {})[member_name(rel.removeprefix("repo/"))] = data
        zipped.append((member_uri(archive, rel.removeprefix("repo/")), len(data)))
    for archive, files in members.items():
        with store.open(store.join(archive), "wb") as f:
            f.write(zip_bytes(files))
    return loose, zipped


def run(source: Storage, destination: Storage, files: list, label: str, **kw) -> tuple[float, int]:
    items = [TransferItem(None, source.join(r), destination.join("repo", label, split_member(r)[1] or r),
                          size=size) for r, size in files]
    copied = Ledger(label, "source", "destination")
    start = time.perf_counter()
    copy_items(copied, source, destination, items, **kw)
    return time.perf_counter() - start, copied.bytes


def best(source: Storage, destination: Storage, files: list, label: str, **kw) -> tuple[float, int]:
    """The fastest of up to REPEATS runs (as many as fit in REPEAT_SECONDS): sub-second
    copies vary by 2x from run to run on a shared machine."""
    runs = [run(source, destination, files, f"{label}-0", **kw)]
    while len(runs) < REPEATS and sum(t for t, _ in runs) < REPEAT_SECONDS:
        runs.append(run(source, destination, files, f"{label}-{len(runs)}", **kw))
    return min(runs)


def bench(source: Storage, destination: Storage, title: str) -> list[dict]:
    rng = np.random.default_rng(1)
    loose, zipped = make_files(source, rng)
    total = sum(size for _, size in loose)
    with source.open(source.join("repo/raw/all.bin"), "wb") as f:
        f.write(rng.bytes(total))
    variants = [("per file, 1 stream", loose, dict(small_bytes=0, streams=1)),
                ("per file, 4 streams", loose, dict(small_bytes=0, streams=4)),
                ("loose -> zips of 8 MB, 4 streams", loose, dict(bundle_bytes=8 * 2**20, streams=4)),
                (f"zips of {PER_ZIP} -> zips of 8 MB, 4 streams", zipped,
                 dict(bundle_bytes=8 * 2**20, streams=4)),
                ("raw copy, one file", [("repo/raw/all.bin", total)], dict(streams=1))]
    print(f"\n{title}: {N_FILES} files, {total / 1e6:.1f} MB")
    print(f"{'variant':40s} {'seconds':>8s} {'MB/s':>7s} {'of raw':>7s}")
    rows = [(name, *best(source, destination, r, f"v{k}", **kw)) for k, (name, r, kw) in enumerate(variants)]
    raw = rows[-1][1]
    out = []
    for name, seconds, nbytes in rows:
        print(f"{name:40s} {seconds:8.2f} {nbytes / 1e6 / seconds:7.1f} {raw / seconds:7.0%}")
        out.append({"storage": title, "variant": name, "seconds": seconds,
                    "mb_per_s": nbytes / 1e6 / seconds, "fraction_of_raw_rate": raw / seconds})
    return out


def main():
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench(Storage(f"file://{tmp}/a"), Storage(f"file://{tmp}/b"), "local -> local")
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    with moto_server("usdf") as a, moto_server("frdf") as b:
        rows += bench(Storage("s3://usdf/drp", {"endpoint_url": a}, "usdf"),
                      Storage("s3://frdf/drp", {"endpoint_url": b}, "frdf"), "S3 -> S3, two endpoints")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
