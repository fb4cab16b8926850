"""Quanta on a real Dask LocalCluster: clustering, failures as data, retries."""

import errno
import os

import numpy as np
import pytest

from drp_flows.engine.executor import Executor
from drp_flows.engine.quanta import Quantum, ordered, reading
from drp_flows.errors import DataError
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
    """A step: writes its output; bad data on detector 3, a bug on detector 6, an input that
    is not there on detector 7, a transient error once on detector 5 and an I/O error once
    on detector 4."""
    d = quantum.data_id["detector"]
    if d == 3:
        raise DataError(f"bad pixels on detector {d}")
    if d == 6:
        return {}["no such key"]
    if d == 7:
        with reading(config["marker_dir"] + "/lost.fits"):
            open(config["marker_dir"] + "/lost.fits", "rb")
    marker = config["marker_dir"] + f"/once-{d}"
    if d in (4, 5) and not os.path.exists(marker):
        open(marker, "w").close()
        raise ConnectionError("storage went away") if d == 5 else OSError(errno.EIO, "I/O error")
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
    assert by_det[3].error_class == "DataError" and by_det[3].reason == "data"
    assert "demo(visit=1, detector=3)" in by_det[3].error and "bad pixels" in by_det[3].error
    # a bug is no verdict on the data: its traceback goes with it (the group fails with it)
    assert by_det[6].reason == "bug" and by_det[6].error_class == "KeyError"
    assert "Traceback" in by_det[6].error and "return {}[\"no such key\"]" in by_det[6].error
    assert by_det[7].reason == "corrupt input" and by_det[7].error_class == "CorruptInput"
    assert f"corrupt input {tmp_path}/lost.fits: FileNotFoundError" in by_det[7].error
    assert by_det[4].ok and by_det[5].ok        # retried by Dask after EIO, ConnectionError
    for d in (0, 1, 2, 4, 5):
        (m,) = by_det[d].outputs
        assert m.bytes == len(f"payload {d}") and len(m.sha256) == 64
        assert storage.open(m.uri).read() == f"payload {d}".encode()
        assert by_det[d].seconds > 0 and by_det[d].peak_rss_mb > 0


def small_or_bad(quantum, storage, out, config):
    """A tiny step: a small output; bad data on detector 5."""
    if quantum.data_id["detector"] == 5:
        raise DataError("bad")
    out.write("thing", f"payload {quantum.data_id['detector']}".encode() * 100)


def test_a_cluster_of_tiny_quanta_writes_its_small_outputs_in_one_zip(executor, tmp_path):
    """Once the first tiny quanta have shown how short they are, they go in clusters; a
    cluster's outputs are one zip in the repository, each output's manifest naming its file
    inside it; a failed quantum's output is in none."""
    import hashlib

    from drp_flows.sites.storage import ZIP_MEMBER, split_member

    storage = Storage(f"file://{tmp_path}")
    quanta = [_q(1, d, thing=storage.join("repo", "run", "thing", f"{d}.txt")) for d in range(60)]
    results = executor.run(small_or_bad, storage, {}, quanta, token="z", memory=10**8)
    by_det = {r.data_id["detector"]: r for r in results}
    assert not by_det[5].ok and not by_det[5].outputs
    zipped = [m for r in results for m in r.outputs if ZIP_MEMBER in m.uri]
    archives = {split_member(m.uri)[0] for m in zipped}
    assert len(zipped) >= 30 and len(archives) <= len(zipped) / 3, (len(zipped), len(archives))
    assert all(a.startswith(storage.join("repo", "zips") + "/") for a in archives)
    for d, r in by_det.items():
        if d == 5:
            continue
        (m,) = r.outputs
        data = storage.open(m.uri).read()
        assert data == f"payload {d}".encode() * 100
        assert (m.bytes, m.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        if ZIP_MEMBER in m.uri:
            assert split_member(m.uri)[1] == f"run/thing/{d}.txt"
            assert not storage.exists(quanta[d].outputs["thing"])    # not written loose too


def test_missing_output_is_a_failure(executor, tmp_path):
    storage = Storage(f"file://{tmp_path}")
    q = Quantum("demo", {"visit": 1, "detector": 0}, outputs={"thing": storage.join("a"),
                                                              "other": storage.join("b")})
    (r,) = executor.run(write_or_fail, storage, {"marker_dir": str(tmp_path)}, [q], "t2", 10**8)
    assert not r.ok and "did not write ['other']" in r.error


def test_bad_raws_get_their_diagnosis(survey):
    """A raw full of NaN and a raw without its WCS keywords are named as such (they were
    quarantined as '0 unblended stars' and 'only 5 reference matches')."""
    from astropy.io import fits

    from drp_flows.tasks.isr import check_raw, check_science_header
    from drp_flows.validation.simulate import load_survey

    camera = load_survey(survey)[0].camera
    path = sorted((survey / "raw").glob("raw_*.fits"))[0]
    check_raw(fits.open(path), camera)                    # a good raw passes
    check_science_header(fits.open(path)[0].header)
    nan = fits.open(path)
    nan[2].data = np.full(nan[2].data.shape, np.nan, np.float32)
    with pytest.raises(DataError, match=r"amplifier 1: \d+ of \d+ pixels are not finite"):
        check_raw(nan, camera)
    blind = fits.open(path)
    del blind[0].header["CRVAL1"], blind[0].header["CTYPE2"]
    with pytest.raises(DataError, match="raw lacks its WCS keywords CTYPE2, CRVAL1"):
        check_science_header(blind[0].header)
    undated = fits.open(path)
    del undated[0].header["MJD-OBS"]
    with pytest.raises(DataError, match="raw lacks its exposure keywords MJD-OBS"):
        check_science_header(undated[0].header)


def test_a_bug_fails_the_campaign_instead_of_quarantining_every_ccd(solo_site, monkeypatch):
    """calibrateImage with a bug (a KeyError on every CCD): the campaign stops at the first
    with the bug's traceback (it had quarantined every CCD of the campaign as bad data)."""
    import dataclasses

    from drp_flows.flows.campaign import StageFailed, campaign_flow
    from drp_flows.flows.stages import site_visits
    from drp_flows.tasks.pipeline import LABELS

    def buggy(quantum, storage, out, config):
        return config["no such setting"]

    site_file = solo_site("bug", cluster="{kind: local, jobs: 1, threads_per_worker: 1, "
                                         "processes: false}")
    monkeypatch.setitem(LABELS, "calibrateImage", dataclasses.replace(LABELS["calibrateImage"],
                                                                      run=buggy))
    first = site_visits(site_file, "solo")[0]
    with pytest.raises(StageFailed) as raised:
        campaign_flow(site_file, "bug1", where=f"visit = {first}", stages=["stage1"])
    message = str(raised.value)
    assert f"QuantumBug: a bug, not bad data, failed calibrateImage(visit={first}" in message
    assert "KeyError: 'no such setting'" in message and 'config["no such setting"]' in message
    assert message.count("a bug, not bad data") == 1


def test_an_input_damaged_since_it_was_registered_is_a_corrupt_input(solo_site):
    """A raw with one pixel's bytes changed (same size, still a valid FITS file) is read whole
    by its quantum and compared with the sha256 recorded when it was ingested: that CCD is
    quarantined as a corrupt input naming the file, the visit's other CCDs go on."""
    from pathlib import Path

    from drp_flows.engine.planning import dataset_uris
    from drp_flows.flows.campaign import campaign_flow
    from drp_flows.flows.stages import site_visits
    from drp_flows.sites.butler import open_butler
    from drp_flows.sites.config import load_sites

    site_file = solo_site("rot")
    site = load_sites(site_file)["solo"]
    visit = site_visits(site_file, "solo")[0]
    butler = open_butler(site)
    refs = sorted(butler.registry.queryDatasets("raw", collections="ComCamSim/raw/all",
                                                instrument="ComCamSim", exposure=visit),
                  key=lambda r: r.dataId["detector"])
    uri = dataset_uris(butler, site.store, refs[:1])[0]
    assert len(uri.sha256) == 64 and uri.size > 0          # recorded at setup
    path = Path(butler.getURI(refs[0]).ospath)
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[-3000] ^= 0x40                                  # inside the last HDU's pixels
    path.write_bytes(bytes(damaged))
    try:
        result = campaign_flow(site_file, "rot1", where=f"visit = {visit}", stages=["stage1"])
    finally:
        path.write_bytes(original)
    (bad,) = result["quarantined"]
    assert bad["data_id"] == {"visit": visit, "detector": int(refs[0].dataId["detector"])}
    assert bad["reason"] == "corrupt input" and bad["error_class"] == "CorruptInput"
    assert f"corrupt input {uri}: its sha256 differs from the one recorded" in bad["error"]
    step1 = next(r for r in result["progress"] if r["step"] == "calibrateImage")
    assert step1["done"] == len(refs) - 1
