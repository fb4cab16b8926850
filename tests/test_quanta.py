"""The batching engine on a real Dask LocalCluster: clustering, failures as data, retries."""

import os

import pytest
from distributed import Client, LocalCluster

from drp_flows.sites.storage import Storage
from drp_flows.tasks.quanta import Quantum, cluster_quanta, run_batch


def _q(visit, detector, **outputs):
    return Quantum("demo", {"visit": visit, "detector": detector}, outputs=outputs)


def test_cluster_quanta_keeps_visits_together():
    quanta = [_q(v, d) for v in range(5) for d in range(9)]
    batches = cluster_quanta(quanta, ("visit",), max_size=20)
    assert [len(b) for b in batches] == [18, 18, 9]
    for b in batches:
        visits = {q.data_id["visit"] for q in b}
        assert all(sum(q.data_id["visit"] == v for q in b) == 9 for v in visits)
    # a cluster larger than a batch is split
    assert [len(b) for b in cluster_quanta(quanta[:9], ("visit",), max_size=4)] == [4, 4, 1]
    with pytest.raises(ValueError, match="max_size"):
        cluster_quanta(quanta, ("visit",), 0)


def write_or_fail(quantum, storage, out, config):
    """A step: writes its output, fails on detector 3, a transient error once on detector 5."""
    d = quantum.data_id["detector"]
    if d == 3:
        raise ValueError(f"bad pixels on detector {d}")
    marker = config["marker_dir"] + f"/once-{d}"
    if d == 5 and not os.path.exists(marker):
        open(marker, "w").close()
        raise ConnectionError("storage went away")
    out.write("thing", f"payload {d}".encode())


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


def test_run_batch_failures_are_data_and_transients_retry(client, tmp_path):
    storage = Storage(f"file://{tmp_path}")
    quanta = [_q(1, d, thing=storage.join("out", f"{d}.txt")) for d in range(8)]
    seen = []
    results = run_batch(client, write_or_fail, storage, {"marker_dir": str(tmp_path)}, quanta,
                        token="t1", on_result=seen.append)
    assert len(results) == len(seen) == 8
    by_det = {r.data_id["detector"]: r for r in results}
    assert not by_det[3].ok
    assert by_det[3].error_class == "ValueError"
    assert "demo(visit=1, detector=3)" in by_det[3].error and "bad pixels" in by_det[3].error
    assert by_det[5].ok                                      # retried by Dask after ConnectionError
    for d in (0, 1, 2, 4, 5, 6, 7):
        (m,) = by_det[d].outputs
        assert m.bytes == len(f"payload {d}") and len(m.sha256) == 64
        assert storage.open(m.uri).read() == f"payload {d}".encode()
        assert by_det[d].seconds > 0 and by_det[d].peak_rss_mb > 0


def test_missing_output_is_a_failure(client, tmp_path):
    storage = Storage(f"file://{tmp_path}")
    q = Quantum("demo", {"visit": 1, "detector": 0}, outputs={"thing": storage.join("a"),
                                                              "other": storage.join("b")})
    (r,) = run_batch(client, write_or_fail, storage, {"marker_dir": str(tmp_path)}, [q], "t2")
    assert not r.ok and "did not write ['other']" in r.error
