"""Quanta on a real Dask LocalCluster: clustering, failures as data, retries."""

import os

import pytest

from drp_flows.engine.executor import Executor
from drp_flows.engine.quanta import Quantum, ordered
from drp_flows.sites.clusters import executor_pool, running_cluster
from drp_flows.sites.config import ClusterConfig
from drp_flows.sites.storage import Storage


def _q(visit, detector, **outputs):
    return Quantum("demo", {"visit": visit, "detector": detector}, outputs=outputs)


def test_clustering_keeps_visits_together():
    quanta = [_q(v, d) for d in range(9) for v in (3, 1, 4, 0, 2)]
    visits = [q.data_id["visit"] for q in ordered(quanta, ("visit",))]
    assert visits == sorted(visits)          # each visit's detectors one after the other


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
def executor():
    cfg = ClusterConfig(kind="local", jobs=1, threads_per_worker=2)
    with running_cluster(cfg) as address, \
            Executor("test", {"short": executor_pool("short", address, cfg)}) as ex:
        yield ex


def test_failures_are_data_and_transients_retry(executor, tmp_path):
    storage = Storage(f"file://{tmp_path}")
    quanta = [_q(1, d, thing=storage.join("out", f"{d}.txt")) for d in range(8)]
    seen = []
    results = executor.run(write_or_fail, storage, {"marker_dir": str(tmp_path)}, quanta,
                           token="t1", memory=10**8, on_result=seen.append)
    assert len(results) == len(seen) == 8
    by_det = {r.data_id["detector"]: r for r in results}
    assert not by_det[3].ok
    assert by_det[3].error_class == "ValueError" and by_det[3].reason == "error"
    assert "demo(visit=1, detector=3)" in by_det[3].error and "bad pixels" in by_det[3].error
    assert by_det[5].ok                                      # retried by Dask after ConnectionError
    for d in (0, 1, 2, 4, 5, 6, 7):
        (m,) = by_det[d].outputs
        assert m.bytes == len(f"payload {d}") and len(m.sha256) == 64
        assert storage.open(m.uri).read() == f"payload {d}".encode()
        assert by_det[d].seconds > 0 and by_det[d].peak_rss_mb > 0


def test_missing_output_is_a_failure(executor, tmp_path):
    storage = Storage(f"file://{tmp_path}")
    q = Quantum("demo", {"visit": 1, "detector": 0}, outputs={"thing": storage.join("a"),
                                                              "other": storage.join("b")})
    (r,) = executor.run(write_or_fail, storage, {"marker_dir": str(tmp_path)}, [q], "t2", 10**8)
    assert not r.ok and "did not write ['other']" in r.error
