"""A PYTHONPATH probe that records, per process, what a server did when it was slow (issue #12).

Active only when ``STALLPROBE_DIR`` is set (bench/load_api.py ``--stall-probe`` sets it, and
``STALLPROBE_ARM`` per arm); every process that imports Python with this directory first on
``PYTHONPATH`` appends JSON lines to ``$STALLPROBE_DIR/<arm>.<pid>.jsonl``. Each line is one event,
``{"t": unix start s, "ms": duration, "kind": ..., ...}``, recorded only when slow:

- ``loop_lag``: the event loop took over 3 ms to run a callback a watchdog thread posted to it
  (every 2 ms): it could serve nothing meanwhile; with up to 4 stacks of the loop's thread,
  sampled every 2 ms while the callback waited;
- ``gc``: a garbage collection over 1 ms (its generation);
- ``cpu_wait``: a 10 ms interval in which the loop's thread waited over 2 ms for a CPU
  (``/proc/self/task/<tid>/schedstat``: runnable, not running, e.g. beside other jobs);
- ``checkpoint``: every SQLite WAL checkpoint (PASSIVE or TRUNCATE), in the checkpointer thread;
- ``turn``: a writer's turn (``<file>.writer-lock``) waited for over 1 ms, in the commit (the loop
  standing still);
- ``commit``: a group commit (``DecisionLog._record_many``) over 2 ms, with the group's size;
- ``read``: a read of the log over 2 ms, with its statement's first words;
- ``tail``: ``DecisionService._follow_tail`` over 2 ms;
- ``decide``: a micro-batch (``MicroBatch._run``) over 2 ms, with its size;
- ``request``: a decision request whose handler took over 5 ms, with each stage's lap in ms.

The insertrec functions are wrapped when their modules are first imported, so the code under
test is the code a server runs (any source tree on ``PYTHONPATH`` after this directory).
"""

from __future__ import annotations

import atexit
import gc
import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import time
import traceback

_DIR = os.environ.get("STALLPROBE_DIR")


def _install() -> None:
    arm = os.environ.get("STALLPROBE_ARM", "x")
    pending: list[str] = []
    lock = threading.Lock()

    def record(kind: str, start: float, ms: float, **extra: object) -> None:
        line = json.dumps({"t": round(start, 4), "ms": round(ms, 2), "kind": kind, "pid": os.getpid(),
                           "thread": threading.current_thread().name, **extra})
        with lock:
            pending.append(line)

    def flush() -> None:
        with lock:
            lines, pending[:] = list(pending), []
        if lines:
            with open(os.path.join(_DIR, f"{arm}.{os.getpid()}.jsonl"), "a") as out:
                out.write("\n".join(lines) + "\n")

    atexit.register(flush)
    wall = time.time() - time.perf_counter()   # perf_counter -> unix seconds

    # -- garbage collections -------------------------------------------------------
    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - gc_start[0]) * 1e3
        if ms > 1.0:
            record("gc", wall + gc_start[0], ms, generation=info["generation"], collected=info["collected"])

    gc.callbacks.append(on_gc)

    # -- the event loop's lag, with stacks sampled while it is blocked --------------
    # uvicorn runs uvloop, whose callbacks cannot be wrapped: a watchdog thread posts a callback
    # to the loop every 2 ms and times how long the loop takes to run it; while one is pending,
    # it samples the loop thread's stack
    watched: dict[str, object] = {}
    ping: dict[str, object] = {"posted": None, "samples": []}

    def pong(posted: float) -> None:
        ms = (time.perf_counter() - posted) * 1e3
        samples = ping["samples"]
        ping["posted"], ping["samples"] = None, []
        if ms > 3.0:
            record("loop_lag", wall + posted, ms, stacks=samples)

    def stack_of(ident: int) -> list[str]:
        frame = sys._current_frames().get(ident)
        if frame is None:
            return []
        frames = traceback.extract_stack(frame)[-14:]
        return [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames]

    def schedstat(native: int) -> int:
        try:
            with open(f"/proc/self/task/{native}/schedstat") as f:
                return int(f.read().split()[1])
        except OSError:
            return 0

    def watchdog() -> None:
        last_flush = last_sched = time.perf_counter()
        waited = None
        while True:
            time.sleep(0.002)
            now = time.perf_counter()
            loop = watched.get("loop")
            if loop is not None:
                posted = ping["posted"]
                if posted is None:
                    ping["posted"] = now
                    try:
                        loop.call_soon_threadsafe(pong, now)  # type: ignore[attr-defined]
                    except RuntimeError:   # the loop closed
                        watched.pop("loop", None)
                elif now - posted > 0.002 and len(ping["samples"]) < 4:  # type: ignore[operator, arg-type]
                    ping["samples"].append([f"+{(now - posted) * 1e3:.0f}ms",  # type: ignore[union-attr, operator]
                                            *stack_of(watched["ident"])])  # type: ignore[arg-type]
                if now - last_sched >= 0.010:
                    value = schedstat(watched["native"])  # type: ignore[arg-type]
                    if waited is not None and value - waited > 2e6:
                        record("cpu_wait", wall + last_sched, (now - last_sched) * 1e3,
                               waited_ms=round((value - waited) / 1e6, 2))
                    waited, last_sched = value, now
            if now - last_flush > 1.0:
                flush()
                last_flush = now

    threading.Thread(target=watchdog, name="stallprobe", daemon=True).start()

    def patch_uvicorn(module) -> None:  # type: ignore[no-untyped-def]
        import asyncio

        original = module.Server.startup

        async def startup(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            watched.update(ident=threading.get_ident(), native=threading.get_native_id())
            watched["loop"] = asyncio.get_running_loop()
            return await original(self, *args, **kwargs)

        module.Server.startup = startup

    # -- insertrec's functions, wrapped as their modules load -----------------------
    def timed(kind: str, threshold_ms: float, describe=None):  # type: ignore[no-untyped-def]
        def wrap(function):  # type: ignore[no-untyped-def]
            def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
                about = describe(*args, **kwargs) if describe else {}
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    ms = (time.perf_counter() - start) * 1e3
                    if ms > threshold_ms:
                        record(kind, wall + start, ms, **about)
            wrapper.__wrapped__ = function  # type: ignore[attr-defined]
            return wrapper
        return wrap

    def patch_decisionlog(module) -> None:  # type: ignore[no-untyped-def]
        cls = module.DecisionLog
        cls._record_many = timed("commit", 2.0, lambda self, entries: {"group": len(entries)})(cls._record_many)
        cls._fetch_now = timed("read", 2.0, lambda self, statement, params: {
            "sql": " ".join(statement.sql.split())[:60]})(cls._fetch_now)

    def patch_writers(module) -> None:  # type: ignore[no-untyped-def]
        cls = module.WriterTurn
        cls.__enter__ = timed("turn", 1.0, lambda self: {"blocking": self.deadline_s is None})(cls.__enter__)

    def patch_service(module) -> None:  # type: ignore[no-untyped-def]
        cls = module.DecisionService
        cls._follow_tail = timed("tail", 2.0)(cls._follow_tail)

    def patch_microbatch(module) -> None:  # type: ignore[no-untyped-def]
        cls = module.MicroBatch
        cls._run = timed("decide", 2.0, lambda self: {"size": len(self._pending)})(cls._run)

    def patch_metrics(module) -> None:  # type: ignore[no-untyped-def]
        base = module.Stopwatch

        class Stopwatch(base):  # laps kept per request; recorded when the handler was slow
            __slots__ = ("_began", "_laps")

            def __init__(self, metrics, start=None):  # type: ignore[no-untyped-def]
                super().__init__(metrics, start)
                self._began, self._laps = self._t, {}

            def lap(self, stage: str) -> None:
                before = self._t
                super().lap(stage)
                self._laps[stage] = round((self._t - before) * 1e3, 2)
                if stage == "logging" and (self._t - self._began) * 1e3 > 5.0:
                    record("request", wall + self._began, (self._t - self._began) * 1e3, laps=self._laps)

        module.Stopwatch = Stopwatch

    def patch_sqlalchemy(module) -> None:  # type: ignore[no-untyped-def]
        cls = module.Connection
        original = cls.exec_driver_sql

        def exec_driver_sql(self, statement, *args, **kwargs):  # type: ignore[no-untyped-def]
            if "wal_checkpoint" not in statement:
                return original(self, statement, *args, **kwargs)
            start = time.perf_counter()
            try:
                return original(self, statement, *args, **kwargs)
            finally:
                record("checkpoint", wall + start, (time.perf_counter() - start) * 1e3, sql=statement)

        cls.exec_driver_sql = exec_driver_sql

    patches = {"insertrec.serving.decisionlog": patch_decisionlog, "insertrec.serving.writers": patch_writers,
               "insertrec.serving.service": patch_service, "insertrec.serving.microbatch": patch_microbatch,
               "insertrec.serving.metrics": patch_metrics, "sqlalchemy.engine.base": patch_sqlalchemy,
               "uvicorn.server": patch_uvicorn}

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
            if name not in patches:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            loader, patch = spec.loader, patches[name]
            exec_module = loader.exec_module

            def exec_then_patch(module):  # type: ignore[no-untyped-def]
                exec_module(module)
                patch(module)

            loader.exec_module = exec_then_patch  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, Finder())


if _DIR:
    _install()
