"""Planning at survey scale: a site repository of N visits of 9 CCDs, or of the full camera's
189 (`--detectors`; bench/survey_registry.py: a tiny survey set up with our own setup flow,
its camera widened, its visits copied), then
- the visits a site holds (`site_visits`), as every campaign starts;
- calibrateImage planned for one step-1 group of G visits (every raw, calibration and refcat shard);
- assembleCoadd planned for one tract, once every CCD has a calibrated image and every visit
  a final summary (the spatial join of every CCD with the tract's patches, checked on the
  exact regions);
- the last group of a campaign of groups of `--group` visits, once every other group's outputs
  are registered (in a RUN per group, chained into the campaign as stages do), against the
  same group planned first, with only its own RUN in the campaign: planning must not grow
  with what is finished.
Seconds and the peak resident memory above the process's before each call; JSON in
build/bench/.
Run: python bench/planning.py [--visits 10000 --big-group 10000 --group 100 --detectors 9].
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from survey_registry import calibrate_all, grow, small_site, widen

from drp_flows.datamodel import campaign_collection, group_run
from drp_flows.engine.planning import make_groups
from drp_flows.engine.quanta import peak_memory_mb, reset_peak_memory
from drp_flows.flows.stages import chain_run, site_visits
from drp_flows.sites.butler import open_butler
from drp_flows.sites.config import load_sites
from drp_flows.tasks import step1, step3
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.pipeline import LABELS
from drp_flows.tasks.skymap import SKYMAP_NAME

CAMPAIGN = "scale"


def measured(fn, *args, repeat: int = 1):
    """The call's result, its median seconds over `repeat` calls, and the process's peak
    resident memory during the first, above what it held before (MB)."""
    reset_peak_memory()
    before = peak_memory_mb()
    times, peaks = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
        peaks.append(peak_memory_mb() - before)
    return out, statistics.median(times), peaks[0]


def busiest_tract(butler) -> int:
    """The tract that the most visits reach."""
    counts: dict[int, int] = {}
    for d in butler.registry.queryDataIds(["tract", "visit"], instrument=INSTRUMENT,
                                          skymap=SKYMAP_NAME):
        counts[int(d["tract"])] = counts.get(int(d["tract"]), 0) + 1
    return max(counts, key=counts.get)


def register_done(butler, groups: dict[str, list[int]], detectors: int) -> float:
    """Every group's calibrateImage outputs registered (registry only: planning never reads
    them), each group in its own RUN chained into the campaign."""
    start = time.perf_counter()
    for name, visits in groups.items():
        run = group_run(CAMPAIGN, "step1", name, 1)
        butler.registry.registerRun(run)
        chain_run(butler, CAMPAIGN, run)
        ids = [{"instrument": INSTRUMENT, "visit": v, "detector": d} for v in visits
               for d in range(detectors)]
        for dataset_type in ("preliminary_visit_image", "single_visit_star_unstandardized"):
            if ids:
                butler.registry.insertDatasets(dataset_type, ids, run)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--visits", type=int, default=10_000)
    parser.add_argument("--big-group", type=int, default=10_000)
    parser.add_argument("--group", type=int, default=100)
    parser.add_argument("--detectors", type=int, default=9)
    parser.add_argument("--no-tract", action="store_true", help="skip the step-3 tract")
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    rows = {}
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=180):
        site_file = small_site(Path(tmp))
        start = time.perf_counter()
        if args.detectors > 9:
            widen(site_file, args.detectors)
        rows["build seconds"] = time.perf_counter() - start + grow(site_file, args.visits)
        site = load_sites(site_file)["big"]
        butler = open_butler(site, writeable=True)
        visits, rows["site_visits seconds"], rows["site_visits peak MB"] = measured(
            site_visits, site_file, "big")
        assert len(visits) == args.visits, len(visits)
        collections = [campaign_collection(CAMPAIGN)]
        big = visits[:args.big_group]
        (quanta, _, _), secs, peak = measured(LABELS[step1.CALIBRATE].plan, butler, site.store, "run",
                                              big, collections)
        assert len(quanta) == args.detectors * len(big), len(quanta)
        del quanta
        rows[f"plan_calibrate {len(big)} visits seconds"] = secs
        rows[f"plan_calibrate {len(big)} visits peak MB"] = peak
        groups = make_groups(visits, args.group)
        names = list(groups)
        register_done(butler, {names[-1]: []}, args.detectors)   # its RUN, chained first
        (first, _, _), rows["first group seconds"], _ = measured(
            LABELS[step1.CALIBRATE].plan, butler, site.store, "run", groups[names[-1]], collections,
            repeat=5)
        rows["register the other groups seconds"] = register_done(
            butler, {n: groups[n] for n in names[:-1]}, args.detectors)
        (last, skipped, _), rows["last group seconds"], _ = measured(
            LABELS[step1.CALIBRATE].plan, butler, site.store, "run", groups[names[-1]], collections,
            repeat=5)
        assert len(last) == len(first) and skipped == 0
        (_, skipped, _), rows["a done group seconds"], _ = measured(
            LABELS[step1.CALIBRATE].plan, butler, site.store, "run", groups[names[0]], collections,
            repeat=5)
        assert skipped == args.detectors * len(groups[names[0]])
        if not args.no_tract:
            run = group_run(CAMPAIGN, "step2", "all", 1)
            rows["register calibrated CCDs seconds"] = calibrate_all(site_file, run)
            chain_run(butler, CAMPAIGN, run)
            tract = busiest_tract(butler)
            (coadds, _, blocked), secs, peak = measured(
                LABELS[step3.ASSEMBLE_COADD].plan, butler, site.store, "run", [tract],
                collections)
            assert coadds and not blocked, (len(coadds), len(blocked))
            rows["assembleCoadd tract seconds"], rows["assembleCoadd tract peak MB"] = secs, peak
            rows["assembleCoadd tract quanta"] = len(coadds)
            rows["assembleCoadd tract CCD inputs"] = sum(
                len(q.inputs["preliminary_visit_image"]) for q in coadds)
    rows["last / first group"] = rows["last group seconds"] / rows["first group seconds"]
    for key, value in rows.items():
        print(f"{key:>45}: {value:10.3f}")
    out = Path("build/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "planning.json").write_text(json.dumps(
        {"visits": args.visits, "group": args.group, "detectors": args.detectors, **rows},
        indent=1))


if __name__ == "__main__":
    main()
