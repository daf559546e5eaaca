"""The spool: decisions answered while the decision log was unavailable, kept on local disk until it is back.

A warehouse needs an answer for every parcel even when the database is down
(issue #12, SPEC "If the decision log is unavailable..."). Such a decision is
written here, appended and fsynced, before it is answered, and later replayed
into the log (`DecisionService.replay_spool`), where ``order_id`` is unique,
so a replay that is repeated (a crash mid-replay, two workers) stores nothing
twice.

Layout: one directory per decision log; each worker appends to a segment of
its own, ``<pid>-<random>.spool``, created under a temporary name, locked with
``flock`` and only then renamed, so that another worker never sees an unlocked
live segment. A segment whose lock can be taken belongs to a worker that died
(the kernel drops a dead process's locks): any worker *adopts* it and replays
it. Each line is one decision, framed ``<crc32 hex> <json>\\n``: a line torn by a
crash mid-write (its answer was never sent, as the fsync comes first) or
damaged on disk fails its check and is skipped with a warning on replay.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from insertrec.logschema import LogUnavailable
from insertrec.serving.decisionlog import Entry

__all__ = ["Segment", "Spool", "default_directory", "frame", "read_segment"]

_log = logging.getLogger("insertrec.serving")
_SUFFIX = ".spool"


def default_directory(db_url: str) -> Path:
    """Where the spool lives unless configured: beside a SQLite file (``<file>-spool``), else
    ``insertrec-spool`` in the working directory."""
    prefix = "sqlite:///"
    database = db_url[len(prefix):].split("?", 1)[0] if db_url.startswith(prefix) else ""
    if database and database != ":memory:":
        return Path(f"{database}-spool")
    return Path("insertrec-spool")


@dataclass(eq=False)
class Segment:
    """One segment file this worker holds the lock of, and the decisions in it; ``replayed`` of
    them are in the log."""

    path: Path
    fd: int
    entries: list[Entry] = field(default_factory=list)
    replayed: int = 0


class Spool:
    """This worker's spool in ``directory``: its live segment, the segments it sealed or adopted
    for replay, and an index of every decision not yet in the log by ``order_id`` (a retry
    during the outage gets the spooled answer).

    Used from one thread (the worker's event loop).
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self._live: Segment | None = None
        self._sealed: list[Segment] = []
        self._index: dict[str, Entry] = {}
        self.error: str | None = None   # why the last append failed (cleared by one that succeeds)

    def __len__(self) -> int:
        """Decisions answered and not yet in the log."""
        return len(self._index)

    def get(self, order_id: str) -> Entry | None:
        return self._index.get(order_id)

    def append(self, entry: Entry) -> None:
        """Write ``entry`` durably (append, fsync) or raise LogUnavailable: then it must not be answered."""
        line = frame(entry)
        try:
            segment = self._live or self._create()
            written = os.write(segment.fd, line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            os.fsync(segment.fd)
        except OSError as exc:
            self.error = f"spool {self.directory}: cannot write ({type(exc).__name__}: {exc})"
            raise LogUnavailable(f"decision log unavailable and {self.error}") from None
        self.error = None
        segment.entries.append(entry)
        self._index[entry.order_id] = entry

    def usable(self) -> str | None:
        """None if decisions can be spooled; else why not (the last append's failure, or a
        directory that cannot be created)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"spool {self.directory}: cannot create ({type(exc).__name__})"
        return self.error

    def to_replay(self) -> list[Segment]:
        """Every segment to replay, adopted ones included, oldest first. Once those are all
        replayed, the live segment is sealed and handed out (later decisions start a new one):
        a log that keeps failing leaves one sealed and one live segment, not a file per attempt."""
        if not self._sealed and self._live is not None and self._live.entries:
            self._sealed.append(self._live)
            self._live = None
        return list(self._sealed)

    def adopt(self) -> int:
        """Take over the segments of workers that died (their lock can be taken); their decisions
        join the index. Returns how many decisions were adopted."""
        held = {s.path for s in self._sealed} | ({self._live.path} if self._live else set())
        try:
            candidates = sorted(self.directory.glob("*" + _SUFFIX))
        except OSError:
            return 0
        adopted = 0
        for path in candidates:
            if path in held:
                continue
            segment = _lock_existing(path)
            if segment is None:
                continue
            segment.entries = read_segment(path)
            if not segment.entries:   # nothing that was answered: a crash before the first line was whole
                path.unlink()
                os.close(segment.fd)
                continue
            for entry in segment.entries:
                self._index.setdefault(entry.order_id, entry)
            self._sealed.append(segment)
            adopted += len(segment.entries)
            _log.warning("adopted a spool segment of a worker that stopped", extra={
                "event": "spool_adopted", "path": str(path), "decisions": len(segment.entries)})
        return adopted

    def replayed(self, segment: Segment) -> None:
        """Every decision of ``segment`` is in the log: forget it and delete its file."""
        for entry in segment.entries:
            if self._index.get(entry.order_id) is entry:
                del self._index[entry.order_id]
        self._sealed.remove(segment)
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        os.close(segment.fd)

    def close(self) -> None:
        """Release the locks (what is left stays on disk, for the next worker to adopt)."""
        for segment in [*self._sealed, *([self._live] if self._live else [])]:
            with contextlib.suppress(OSError):
                os.close(segment.fd)
        self._sealed, self._live = [], None

    def _create(self) -> Segment:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        temporary = self.directory / f".{name}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path = self.directory / (name + _SUFFIX)
            os.rename(temporary, path)
            _fsync_directory(self.directory)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        self._live = Segment(path, fd)
        return self._live


def frame(entry: Entry) -> bytes:
    """One spool line: the CRC-32 of the JSON, a space, the JSON, a newline."""
    payload = orjson.dumps(asdict(entry))
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def read_segment(path: Path) -> list[Entry]:
    """The decisions of a segment, in order. A line that fails its check (torn by a crash
    mid-write, or damaged) is skipped with a warning: its answer was never sent."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    entries = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        torn = number == len(lines)   # no newline after it: the write did not finish
        entry = None if torn else _unframe(line)
        if entry is None:
            _log.warning("skipped a spool line that is torn or damaged", extra={
                "event": "spool_line_skipped", "path": str(path), "line": number, "torn": torn})
            continue
        entries.append(entry)
    return entries


def _unframe(line: bytes) -> Entry | None:
    checksum, _, payload = line.partition(b" ")
    try:
        if int(checksum, 16) != zlib.crc32(payload):
            return None
        fields = orjson.loads(payload)
        fields["box"] = {slot: (action, float(p)) for slot, (action, p) in fields["box"].items()}
        fields["limited"] = tuple(fields["limited"])
        return Entry(**fields)
    except (ValueError, TypeError, KeyError):
        return None


def _lock_existing(path: Path) -> Segment | None:
    """``path`` locked for this worker, if no live worker holds it and it is still that file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:   # replayed and deleted meanwhile
            raise FileNotFoundError(path)
    except OSError:
        os.close(fd)
        return None
    return Segment(path, fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
