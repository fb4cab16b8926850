"""The fixed start of a campaign: what `drp campaign` spends before its first quantum runs,
and its parts, on a one-site survey of one night (CCDs of 384 pixels as in the tests, stars
enough for every CCD to calibrate):
- `python -c "import ..."` of what the command imports before it runs a flow (the CLI, the
  campaign flow and everything a stage needs), each in a fresh interpreter;
- Prefect's temporary API server, started as a flow run without PREFECT_API_URL starts it;
- a LocalCluster of one worker process;
- the whole `drp campaign` of stage 1: seconds from the command's start to its first
  quantum's start (the manifests keep when each quantum started), and to its end.
JSON in build/bench/start.json. Run: python bench/start.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
IMPORTS = {
    "the command line (drp_flows.cli)": "import drp_flows.cli",
    "the campaign flow (drp_flows.flows.campaign)": "import drp_flows.flows.campaign",
    "a stage's science (drp_flows.tasks.pipeline)": "import drp_flows.tasks.pipeline",
    "prefect": "import prefect",
    "lsst.daf.butler": "import lsst.daf.butler",
    "distributed": "import distributed",
}
EMPTY_FLOW = """
import time
start = time.perf_counter()
from prefect import flow
imported = time.perf_counter()

@flow
def nothing():
    return 1

nothing()
print(imported - start, time.perf_counter() - imported)
"""
LOCAL_CLUSTER = """
import time
from distributed import Client, LocalCluster
start = time.perf_counter()
with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, \\
        Client(cluster) as client:
    client.wait_for_workers(1)
    print(time.perf_counter() - start)
"""


def python(code: str, env: dict | None = None) -> tuple[float, str]:
    """Seconds a fresh interpreter takes to run the code, and what it printed."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env or os.environ)
    return time.perf_counter() - start, out.stdout


def first_quantum(root: Path) -> float:
    """When the campaign's first quantum started (Unix seconds), from the kept manifests."""
    from astropy.table import Table

    started = [float(Table.read(p)["started"].min()) for p in root.rglob("manifests/**/*.parq")]
    return min(started)


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from survey_registry import SMALL, small_site

    rows: dict[str, float] = {}
    bare, _ = python("pass")
    rows["python itself"] = bare
    for name, code in IMPORTS.items():
        rows[f"import {name}"] = python(code)[0] - bare
    offline = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    _, out = python(EMPTY_FLOW, offline)
    rows["a flow run on Prefect's temporary server (its start)"] = float(out.split()[1])
    _, out = python(LOCAL_CLUSTER)
    rows["a LocalCluster of one worker"] = float(out.split()[0])
    with tempfile.TemporaryDirectory() as tmp:
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=180):
            site_file = small_site(Path(tmp), SMALL | {"ccd_size": 384, "star_density": 150.0})
        env = offline | {"DRP_PROGRESS_SECONDS": "3600"}
        start = time.time()
        subprocess.run([str(BIN / "drp"), "campaign", "start", "--sites", site_file, "--stage",
                        "stage1"], check=True, capture_output=True, env=env)
        rows["drp campaign: its start to the first quantum's"] = first_quantum(Path(tmp)) - start
        rows["drp campaign of stage 1 (one night), whole"] = time.time() - start
    for key, value in rows.items():
        print(f"{key:>58}: {value:7.2f} s")
    out = Path("build/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "start.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
