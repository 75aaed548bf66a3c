"""Run events (``metrics.jsonl``), atomic file writes, and the run summary.

``metrics.jsonl`` holds one JSON object per line with an ``"event"`` key:
``client_update`` (one per reply, accepted or not) and ``round`` (one per round).
``summary.json`` is written last, atomically: its presence means the run finished.

A process killed mid-append leaves a last line without its newline: readers drop it
(:func:`read_events`) and :class:`EventLog` cuts it off before appending again.

Files are created with the process's umask (``0o666 & ~umask``), except those that
hold a secret, written with ``mode=SECRET_MODE`` whatever the umask.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO

from fedtune.errors import FedtuneError

SECRET_MODE = 0o600
"""Mode of a file holding a credential or a token, under any umask."""
logger = logging.getLogger("fedtune")


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, which races
    with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # no /proc: the only portable read sets it for a moment
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename: never half-written.

    The file gets ``mode`` if given (:data:`SECRET_MODE` for secrets), else what
    ``open`` would give it under the umask; it never exists with a wider mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Fill a temp folder beside ``target``; on success it replaces ``target`` whole.

    A crash part-way leaves the old ``target`` (or none), never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; mkdir would not
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB: since the last
    :func:`reset_peak_rss` where Linux allows it (``VmHWM``), else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> None:
    """Restart :func:`peak_rss_mb` from the current resident memory (Linux >= 4.0).

    A simulation actor trains many clients, perhaps with different engines: without a
    reset each would report the largest peak of any before it.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class EventSink(Protocol):
    """Anything that takes events as they are written (:mod:`fedtune.tracking`)."""

    def record(self, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class EventLog:
    """Append-only JSONL event writer; each line is flushed as it is written.

    A torn last line (a process killed mid-append) is cut off first: appending after
    it would glue the next event onto it. Each of ``sinks`` (experiment trackers)
    receives every event after its line is written; a sink that raises is logged and
    dropped, as the file is the run's record and a tracker is a view of it.
    """

    def __init__(self, path: Path, sinks: Iterable[EventSink] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.path)
        self._handle: TextIO = open(self.path, "a", encoding="utf-8")
        self.sinks = list(sinks)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, **fields}
        self._handle.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
        self._handle.flush()
        for sink in list(self.sinks):
            self._call(sink, sink.record, record)
        return record

    def close(self) -> None:
        self._handle.close()
        for sink in list(self.sinks):
            self._call(sink, sink.close)

    def _call(self, sink: EventSink, method: Any, *args: Any) -> None:
        try:
            method(*args)
        except Exception as exc:  # a tracker's store or server failing must not end the run
            logger.warning(
                "%s failed (%s: %s); it gets no more events",
                type(sink).__name__,
                type(exc).__name__,
                exc,
            )
            self.sinks.remove(sink)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventLogError(FedtuneError):
    """A complete line of ``metrics.jsonl`` that is not an event: damage, not a crash."""


def drop_torn_tail(path: Path) -> bool:
    """Cut a last line that lacks its newline (a kill mid-append); True if one was cut."""
    try:
        with open(path, "r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return False
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return False
            # Walk back to the last newline, a block at a time (lines are short).
            end = size
            while end > 0:
                start = max(0, end - 65536)
                handle.seek(start)
                cut = handle.read(end - start).rfind(b"\n")
                if cut >= 0:
                    end = start + cut + 1
                    break
                end = start
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    except FileNotFoundError:
        return False
    logger.warning("%s: dropped a torn last line (%d bytes)", path, size - end)
    return True


def read_events(path: Path, event: str | None = None) -> Iterator[dict[str, Any]]:
    """Events of a ``metrics.jsonl``, optionally only those of one kind.

    A last line without its newline is torn (the writer was killed mid-append): it is
    skipped with a warning. Any other line that is not a JSON object is an
    :class:`EventLogError` naming the file and line.
    """
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                logger.warning("%s:%d: skipped a torn last line", path, number)
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, too deep
                raise EventLogError(f"{path}:{number}: not a JSON event ({exc})") from None
            if not isinstance(record, dict):
                raise EventLogError(f"{path}:{number}: not a JSON object")
            if event is None or record.get("event") == event:
                yield record
