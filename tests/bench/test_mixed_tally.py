"""How the ``mixed`` scenario counts replies (:class:`benchmarks.mixed.OpTally`): an
error reply is neither a done op nor a latency sample; it is counted apart."""

from __future__ import annotations

from benchmarks.mixed import OPS, OpTally

DM, ROOM, HISTORY = OPS.index("dm"), OPS.index("room"), OPS.index("history")


def tally() -> OpTally:
    t = OpTally()
    t.measure, t.end = 1_000, 2_000
    return t


def test_error_replies_are_counted_apart() -> None:
    t = tally()
    t.reply(DM, due=1_100, now=1_150, error=None)
    t.reply(DM, due=1_200, now=1_210, error="forbidden")
    t.reply(DM, due=1_300, now=1_301, error="rate_limited")
    t.reply(ROOM, due=1_400, now=1_500, error="forbidden")
    assert t.ok[DM] == t.ok_window[DM] == 1
    assert list(t.lat_ns[DM]) == [50]  # the error replies give no latency sample
    assert (t.ok[ROOM], t.ok_window[ROOM], list(t.lat_ns[ROOM])) == (0, 0, [])
    assert t.errors == {"dm:forbidden": 1, "dm:rate_limited": 1, "room:forbidden": 1}
    assert (t.errors_window[DM], t.errors_window[ROOM]) == (2, 1)
    assert (t.answered()[DM], t.answered()[ROOM], t.answered()[HISTORY]) == (3, 1, 0)


def test_the_window_bounds_counts_and_latency_samples() -> None:
    t = tally()
    t.reply(HISTORY, due=900, now=1_100, error=None)  # scheduled before: counted, no sample
    t.reply(HISTORY, due=1_900, now=2_100, error=None)  # arrived after: sample, not counted
    t.reply(HISTORY, due=1_950, now=2_050, error="internal")  # after the window
    t.reply(HISTORY, due=500, now=999, error="internal")  # before it
    assert (t.ok[HISTORY], t.ok_window[HISTORY]) == (2, 1)
    assert list(t.lat_ns[HISTORY]) == [200]
    assert (t.errors["history:internal"], t.errors_window[HISTORY]) == (2, 0)
    assert t.answered()[HISTORY] == 4
