"""Warm ClientApps on SuperNodes: a worker process per node keeps the model loaded.

Flower 1.41 starts a new ClientApp process (``flwr-clientapp``) for every message a
SuperNode receives, so fedtune's ClientApp (``fedtune.clients.app``) would import torch
and load the model every round. This module's ClientApp (``fedtune.clients.warm:app``,
the component ``fedtune serve`` names) imports neither: it hands each message, with its
Context, to a **worker** — one long-lived process per SuperNode that runs fedtune's
real ClientApp and keeps its caches (model, tokenizer, chunks) between messages — over
a Unix socket, and returns the worker's reply and updated Context state.

- The worker of a SuperNode is found by the ClientApp process's parent (Flower's
  SuperExec, one per SuperNode): ``$FEDTUNE_WORKER_DIR`` (default
  ``$TMPDIR/fedtune-workers-$UID``, mode 0700) / ``node-<pid>.sock`` (mode 0600). Only
  processes of the same user may connect (checked with ``SO_PEERCRED``).
- The first message starts the worker (detached; its log beside the socket) and waits
  up to :data:`START_TIMEOUT_S` for it. The worker exits when that parent is gone (the
  SuperNode stopped or was killed) or after :data:`IDLE_EXIT_S` without a message.
- Absent, dead, or failing to start: the message runs in the ClientApp process itself
  (today's per-message behaviour), with the reason logged, and the next message starts
  a new worker. A worker that dies mid-message is the same.
- ``--node-config "warm-worker=false"`` turns it off for a node.

Each reply's metrics carry ``process-model-loads`` (models the training process has
loaded so far) and ``warm-worker`` (1 when the worker trained it), recorded in the
``client_update`` events as ``model_loads`` and ``warm_worker``.

Frames are protobuf (Flower's own serde), length-prefixed; nothing is unpickled.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedtune.protocol import (
    ERROR_REPLY_CODE,
    INFO_KEY,
    METRICS_KEY,
    MODEL_LOADS_KEY,
    SECAGG_ACTION,
    WARM_ACTION,
    WARM_SECONDS_KEY,
    WARM_WORKER_KEY,
)

START_TIMEOUT_S = 180.0
IDLE_EXIT_S = 3600.0
_HEADER = struct.Struct("!QQ")
_STATUS = struct.Struct("!BQQ")
OK, FAILED = 0, 1

app = ClientApp()


def worker_dir() -> Path:
    folder = os.environ.get("FEDTUNE_WORKER_DIR") or os.path.join(
        tempfile.gettempdir(), f"fedtune-workers-{os.getuid()}"
    )
    path = Path(folder)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def socket_path(parent: int) -> Path:
    return worker_dir() / f"node-{parent}.sock"


def _parent() -> int:
    """The process whose worker this is: the ClientApp process's parent (Flower's
    SuperExec, one per SuperNode), or ``$FEDTUNE_WORKER_PARENT``."""
    return int(os.environ.get("FEDTUNE_WORKER_PARENT") or os.getppid())


def _wanted(context: Context) -> bool:
    return str(context.node_config.get(WARM_WORKER_KEY, "true")).lower() not in (
        "false",
        "0",
        "off",
    )


def forward(message: Message, context: Context) -> Message:
    """Run ``message`` in this node's worker; here when there is none (reason logged)."""
    if not _wanted(context):
        return _here(message, context)
    try:
        return _in_worker(message, context)
    except WorkerUnavailable as exc:
        log(WARNING, "fedtune warm worker: %s; this message runs in the ClientApp process", exc)
        return _here(message, context)


def _in_worker(message: Message, context: Context) -> Message:
    """The reply of this node's worker (started if absent), its Context state kept."""
    reply, context.state = _ask(socket_path(_parent()), message, context, start=True)
    return reply


app.train()(forward)  # the message types fedtune's ClientApp answers
app.query()(forward)
app.query(SECAGG_ACTION)(forward)


@app.query(WARM_ACTION)
def warm(message: Message, context: Context) -> Message:
    """``fedtune serve``'s warm-up before round 1: start this node's worker and have it
    load the model now, while the server evaluates the initial adapter. A node without
    a worker (``warm-worker=false``) has nothing to keep loaded and answers at once; a
    worker that cannot start is an error reply (the server logs it; round 1 goes on and
    the node's first message tries again)."""
    if not _wanted(context):
        return Message(
            RecordDict({INFO_KEY: ConfigRecord({WARM_SECONDS_KEY: 0.0})}), reply_to=message
        )
    try:
        return _in_worker(message, context)
    except WorkerUnavailable as exc:
        log(WARNING, "fedtune warm worker: %s; nothing warmed", exc)
        return Message(Error(ERROR_REPLY_CODE, f"warm worker: {exc}"), reply_to=message)


class WorkerUnavailable(RuntimeError):
    """No worker could take the message (absent, failed to start, died mid-message)."""


def _here(message: Message, context: Context) -> Message:
    """The message in this process with fedtune's ClientApp: the per-message way."""
    from fedtune.clients.app import app as full

    return _tagged(full(message, context), warm=False)


def _tagged(reply: Message, warm: bool) -> Message:
    """The reply with the model loads of the process that trained it and whether it was
    the worker (train replies only)."""
    if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
        return reply
    from fedtune.clients.app import _model

    record: MetricRecord = reply.content.metric_records[METRICS_KEY]
    record[MODEL_LOADS_KEY] = int(_model.cache_info().misses)
    record[WARM_WORKER_KEY] = int(warm)
    return reply


def _ask(path: Path, message: Message, context: Context, start: bool) -> tuple[Message, RecordDict]:
    """The worker's reply to ``message`` and the Context state after it."""
    from flwr.common.serde import (
        context_to_proto,
        message_from_proto,
        message_to_proto,
        recorddict_from_proto,
    )
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    sock = _connect(path, start)
    with sock:
        body = message_to_proto(message).SerializeToString()
        ctx = context_to_proto(context).SerializeToString()
        try:
            sock.sendall(_HEADER.pack(len(body), len(ctx)) + body + ctx)
            status, first, second = _STATUS.unpack(_read(sock, _STATUS.size))
            a, b = _read(sock, first), _read(sock, second)
        except OSError as exc:
            raise WorkerUnavailable(f"the worker at {path} went away mid-message ({exc})") from exc
    if status != OK:
        raise RuntimeError(f"fedtune warm worker failed: {a.decode(errors='replace')}")
    answer = message_from_proto(ProtoMessage.FromString(a))
    reply = Message(answer.error, reply_to=message) if answer.has_error() else None
    if reply is None:
        reply = Message(answer.content, reply_to=message)
    return reply, recorddict_from_proto(ProtoRecordDict.FromString(b))


def _connect(path: Path, start: bool) -> socket.socket:
    """A connection to the worker at ``path``, starting one if asked and none answers."""
    try:
        return _open(path)
    except OSError as exc:
        if not start:
            raise WorkerUnavailable(f"no worker at {path} ({exc})") from exc
        reason = f"no worker at {path} ({exc.strerror or exc})"
    log(INFO, "fedtune warm worker: %s; starting one", reason)
    proc = _spawn(path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            return _open(path)
        except OSError:
            if proc.poll() is not None and not path.exists():
                raise WorkerUnavailable(
                    f"the worker exited with {proc.returncode} before listening "
                    f"(log: {path.with_suffix('.log')})"
                ) from None
            time.sleep(0.2)
    raise WorkerUnavailable(f"the worker did not listen within {START_TIMEOUT_S:.0f} s")


def _open(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def _spawn(path: Path) -> subprocess.Popen[bytes]:
    log_file = open(path.with_suffix(".log"), "ab")  # noqa: SIM115 - the child keeps it
    cmd = [sys.executable, "-m", "fedtune.clients.warm", "--socket", str(path)]
    cmd += ["--parent", str(_parent())]
    return subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True
    )


def _read(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- the worker ---------------------------------------------------------------------
def serve(path: Path, parent: int, idle_s: float = IDLE_EXIT_S) -> None:
    """Answer hand-offs on ``path`` one at a time until ``parent`` is gone or nothing
    came for ``idle_s`` seconds. One worker per socket (a lock beside it)."""
    with _sole(path):
        from fedtune.clients import app as full  # imports torch once, before listening

        path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        server.listen(8)
        server.settimeout(1.0)
        last = time.monotonic()
        threading.Thread(target=_watch, args=(parent, path), daemon=True).start()
        log(INFO, "fedtune warm worker %d serving %s for process %d", os.getpid(), path, parent)
        while time.monotonic() - last < idle_s:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                if _peer_uid(conn) != os.getuid():
                    log(WARNING, "fedtune warm worker: refused a connection of another user")
                    continue
                _answer(conn, full.app)
            last = time.monotonic()
        path.unlink(missing_ok=True)


def _answer(conn: socket.socket, full: Any) -> None:
    from flwr.common.serde import (
        context_from_proto,
        message_from_proto,
        message_to_proto,
        recorddict_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from fedtune.server.inprocess import task_identity

    try:
        first, second = _HEADER.unpack(_read(conn, _HEADER.size))
        message = message_from_proto(ProtoMessage.FromString(_read(conn, first)))
        context = context_from_proto(ProtoContext.FromString(_read(conn, second)))
        with task_identity():
            reply = _tagged(full(message, context), warm=True)
            a = message_to_proto(reply).SerializeToString()
        b = recorddict_to_proto(context.state).SerializeToString()
        status = OK
    except Exception as exc:  # the ClientApp's own failure goes back as the reason
        status, a, b = FAILED, f"{type(exc).__name__}: {exc}".encode(), b""
    with contextlib.suppress(OSError):
        conn.sendall(_STATUS.pack(status, len(a), len(b)) + a + b)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _watch(parent: int, path: Path) -> None:
    """Exit when the SuperNode's process is gone, even in the middle of a message."""
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            os._exit(0)
        time.sleep(1.0)


@contextlib.contextmanager
def _sole(path: Path) -> Iterator[None]:
    """Hold the socket's lock, or exit: another worker serves it."""
    fd = os.open(str(path.with_suffix(".lock")), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        sys.exit(0)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who serves it, for an operator
    try:
        yield
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description="fedtune's warm ClientApp worker")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--idle", type=float, default=IDLE_EXIT_S)
    args = parser.parse_args()
    serve(args.socket, args.parent, args.idle)


if __name__ == "__main__":
    main()
