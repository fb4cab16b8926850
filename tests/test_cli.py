"""The command line's plain progress line (what a log shows of a campaign that is not in a
terminal); tests/test_resume.py reads it from a real `drp campaign`."""

from drp_flows.cli import progress_line


def row(site, stage, step, state, total=0, done=0, skipped=0, failed=0):
    return {"site": site, "stage": stage, "step": step, "state": state, "total": total,
            "done": done, "skipped": skipped, "failed": failed, "blocked": 0}


def test_progress_line_shows_each_sites_latest_stage():
    rows = [row("usdf", "stage1", "calibrateImage", "done", 72, 70, 1, 1),
            row("usdf", "stage1", "consolidateVisitSummary", "done", 8, 8),
            row("usdf", "global", "fgcmFitCycle", "running", 1),
            row("usdf", "global", "fgcmOutputProducts", "waiting"),
            row("frdf", "stage1", "calibrateImage", "done", 72, 72),
            row("frdf", "stage1", "consolidateVisitSummary", "failed", 8, 7, 0, 1),
            row("frdf", "stage1", "isolatedStarAssociation", "waiting")]
    assert progress_line(rows) == ("progress: usdf global fgcmFitCycle 0/1, 0 failed; "
                                   "frdf stage1 consolidateVisitSummary 7/8, 1 failed")


def test_progress_line_counts_each_running_step_over_the_groups():
    rows = [row("usdf", "stage1", "calibrateImage", "done", 72, 72),
            row("usdf", "stage1", "consolidateVisitSummary", "running", 8, 5),
            row("usdf", "stage1", "calibrateImage", "running", 72, 30, 2),
            row("usdf", "stage1", "consolidateVisitSummary", "running", 8, 1, 0, 1),
            row("usdf", "stage1", "isolatedStarAssociation", "waiting")]
    assert progress_line(rows) == ("progress: usdf stage1 calibrateImage 104/144 "
                                   "consolidateVisitSummary 6/16, 1 failed")


def test_progress_line_before_any_stage():
    assert progress_line([]) == "progress: starting (no stage has begun)"
