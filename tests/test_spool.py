"""The spool of decisions answered while the decision log was unavailable: durable, framed, adoptable."""

from __future__ import annotations

import logging
import os

from insertrec.serving.decisionlog import DecisionLog, Entry, Recorded
from insertrec.serving.spool import Spool, default_directory, frame, read_segment


def entry(i: int, customer: str = "c-1") -> Entry:
    return Entry(f"d-{i}", f"o-{i}", customer, i, "v1", "fallback", '{"order_id":"o-%d"}' % i,
                 {"insert": ("none", 1.0)}, '{"answer":%d}' % i, None, 0, (), "f" * 64)


def test_a_torn_last_line_is_skipped_with_a_warning_and_nothing_acknowledged_is_lost(tmp_path, caplog):
    spool = Spool(tmp_path / "spool")
    for i in range(3):
        spool.append(entry(i))   # each acknowledged once append returned
    segment, = (tmp_path / "spool").glob("*.spool")
    with open(segment, "ab") as out:
        out.write(frame(entry(3))[:-20])   # a crash in the middle of writing the fourth
    spool.close()                          # the worker is gone: its lock with it
    with caplog.at_level(logging.WARNING, logger="insertrec.serving"):
        heir = Spool(tmp_path / "spool")
        assert heir.adopt() == 3
        replay, = heir.to_replay()
    assert replay.entries == [entry(i) for i in range(3)]
    assert [r.msg for r in caplog.records if getattr(r, "event", None) == "spool_line_skipped"] == \
        ["skipped a spool line that is torn or damaged"]
    assert heir.get("o-1") == entry(1) and len(heir) == 3


def test_a_damaged_line_in_the_middle_is_skipped_and_the_rest_kept(tmp_path):
    path = tmp_path / "x.spool"
    lines = [frame(entry(i)) for i in range(3)]
    lines[1] = lines[1].replace(b"o-1", b"o-7")   # a flipped byte: the CRC no longer matches
    path.write_bytes(b"".join(lines))
    assert read_segment(path) == [entry(0), entry(2)]


def test_a_live_workers_segment_is_not_adopted_and_a_dead_ones_is(tmp_path):
    live = Spool(tmp_path)
    live.append(entry(1))
    other = Spool(tmp_path)
    assert other.adopt() == 0 and len(other) == 0   # locked by a live worker
    live.close()
    assert other.adopt() == 1 and other.get("o-1") == entry(1)
    assert other.adopt() == 0                       # already held


def test_replaying_stores_each_decision_once_without_the_customer_check(tmp_path):
    """A spooled decision was made without the log: replaying it must not be refused because the
    customer has newer decisions (it would be CustomerMoved, and never stored), and replaying it
    twice (a crash between the commit and deleting the segment) stores it once."""
    log = DecisionLog(f"sqlite:///{tmp_path / 'log.db'}")
    log.create()
    try:
        first = log.record_many([Entry("d-x", "o-x", "c-1", 0, "v1", "model", "{}", {}, "{}", 0)])
        assert isinstance(first[0], Recorded) and first[0].row_id
        spool = Spool(tmp_path / "spool")
        for i in range(3):
            spool.append(entry(i))
        segment, = spool.to_replay()
        results = log.record_many(segment.entries)
        assert all(isinstance(r, Recorded) and r.row_id for r in results)
        again = log.record_many(segment.entries)
        assert [r.row_id for r in again] == [None, None, None]
        spool.replayed(segment)
        assert len(spool) == 0 and not list((tmp_path / "spool").glob("*.spool"))
        assert len(log.events("c-1", -(2**63))) == 4
    finally:
        log.close()


def test_the_spool_lives_beside_a_sqlite_file_else_in_the_working_directory(tmp_path):
    assert default_directory(f"sqlite:///{tmp_path}/log.db") == tmp_path / "log.db-spool"
    assert str(default_directory("postgresql+psycopg://u@h/db")) == "insertrec-spool"
    assert not os.path.isabs(default_directory("sqlite:///:memory:"))
