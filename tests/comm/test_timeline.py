"""StepTimeline on its own: off by default, bounded, ordered, safe to mark from several threads."""
import threading
import time

import pytest

from lowbit.comm.transport import StepTimeline
from lowbit.errors import ConfigError


def test_off_records_nothing():
    tl = StepTimeline(keep=0)
    tl.begin(1)
    tl.mark("grads_in", 2, 0)
    assert tl.last() is None and not tl.steps


def test_keeps_the_last_steps_with_times_since_their_start():
    tl = StepTimeline(keep=2)
    assert tl.last() is None
    for step in range(5):
        t_before = time.perf_counter()
        tl.begin(step)
        tl.mark("weights_in", 0, step)
        tl.mark("end")
    assert [s["step"] for s in tl.steps] == [3, 4]
    last = tl.last()
    assert last["step"] == 4 and last["t0"] >= t_before
    assert [e[1:] for e in last["events"]] == [("weights_in", 0, 4), ("end", None, None)]
    assert 0 <= last["events"][0][0] <= last["events"][1][0] < 5.0


def test_marks_from_threads_all_land_sorted():
    tl = StepTimeline()
    tl.begin(7)

    def pump(peer):
        for i in range(200):
            tl.mark("grads_in", peer, i)

    ths = [threading.Thread(target=pump, args=(p,)) for p in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    ev = tl.last()["events"]
    assert len(ev) == 800 and [e[0] for e in ev] == sorted(e[0] for e in ev)
    for p in range(4):  # each thread's marks keep their order
        assert [e[3] for e in ev if e[2] == p] == list(range(200))


@pytest.mark.parametrize("keep", [-1, 1.5, "8"])
def test_bad_keep_is_named(keep):
    with pytest.raises(ConfigError, match="keep"):
        StepTimeline(keep=keep)


def test_a_marker_keeps_marking_its_own_step():
    """A receive thread left over from a step that gave up (marker taken then) must not put its
    arrivals into the next step."""
    tl = StepTimeline()
    tl.begin(1)
    late = tl.marker()
    tl.begin(2)
    late("grads_in", 3, 0)
    tl.mark("end")
    assert [e[1:] for e in tl.steps[0]["events"]] == [("grads_in", 3, 0)]
    assert [e[1:] for e in tl.last()["events"]] == [("end", None, None)]
    off = StepTimeline(keep=0)
    off.begin(1)
    off.marker()("grads_in", 0, 0)  # a no-op when off
    assert off.last() is None
