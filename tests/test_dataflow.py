"""The window in which a stage's groups run: never more at once than asked, results in the
groups' order, and after a failure no new group starts while those running finish."""

import threading
import time

import pytest

from drp_flows.engine.dataflow import run_window


def test_groups_run_within_their_window_in_order():
    running, peak, lock = [0], [0], threading.Lock()

    def group(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05 * (5 - i))       # the first groups take longest: they end last
        with lock:
            running[0] -= 1
        return i

    assert run_window([lambda i=i: group(i) for i in range(6)], 3) == list(range(6))
    assert peak[0] == 3
    peak[0] = 0
    assert run_window([lambda i=i: group(i) for i in range(3)], 1) == [0, 1, 2]
    assert peak[0] == 1


def test_a_failed_group_stops_the_window_after_those_running():
    started, ended = [], []
    seconds = {0: 0.05, 1: 0.15, 2: 0.3}    # 2 starts when 0 ends, and is running when 1 fails

    def group(i: int) -> int:
        started.append(i)
        time.sleep(seconds.get(i, 0.0))
        if i == 1:
            raise RuntimeError("group 1 lost its cluster")
        ended.append(i)
        return i

    with pytest.raises(RuntimeError, match="group 1 lost its cluster"):
        run_window([lambda i=i: group(i) for i in range(5)], 2)
    assert sorted(started) == [0, 1, 2] and sorted(ended) == [0, 2]
