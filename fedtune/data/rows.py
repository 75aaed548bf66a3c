"""Row data through Hugging Face ``datasets``: local files, a saved dataset, chatterbot.

``data.name = "files"`` reads ``data.path`` — a json, jsonl, parquet, csv or arrow
file, a folder of such files, or a folder written by ``Dataset.save_to_disk`` — with
``datasets``' own builders, offline (nothing is fetched from a hub). ``chatterbot``
reads the YAML conversations of the chatterbot-corpus wheel into the same kind of
table. The ``data.*_column`` keys map the table's columns onto fedtune's roles; a
column that is not there is an error naming the key, the column and the file.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from fedtune.config import DataConfig
from fedtune.errors import DataError

CHATTERBOT_INSTALL = "pip install chatterbot-corpus==1.3.3"
EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
"""File extension -> the ``datasets`` builder that reads it (``data.format = "auto"``)."""
BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow"}
"""``data.format`` -> the ``datasets`` builder."""
ROLE_KEYS = (
    "text_column",
    "prompt_column",
    "response_column",
    "messages_column",
    "label_column",
    "client_column",
)


@functools.lru_cache(maxsize=4)
def load_rows(cfg: DataConfig) -> Any:
    """The table of ``cfg`` (a ``datasets.Dataset``), its mapped columns checked."""
    import datasets

    datasets.disable_progress_bars()  # a run's progress display is its own
    table = load_chatterbot(cfg.languages) if cfg.name == "chatterbot" else load_files(cfg)
    where = cfg.path if cfg.name == "files" else "the chatterbot corpus"
    for key in _used_keys(cfg):
        column = getattr(cfg, key)
        if column not in table.column_names:
            raise DataError(
                f"data.{key} = {column!r} is not a column of {where} "
                f"(columns: {', '.join(table.column_names)})"
            )
    if len(table) == 0:
        raise DataError(f"{where} holds no rows")
    return table


def _used_keys(cfg: DataConfig) -> list[str]:
    """The ``*_column`` keys ``cfg`` uses (text only when no instruction column is set)."""
    keys = [k for k in ROLE_KEYS if k != "text_column" and getattr(cfg, k)]
    return keys if cfg.instruction else ["text_column", *keys]


def load_files(cfg: DataConfig) -> Any:
    """``data.path`` read by ``datasets`` (a ``Dataset``, one split, nothing cached)."""
    import datasets

    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path {path} does not exist (data.name = 'files')")
    fmt = cfg.format
    if fmt == "auto":
        fmt = _detect_format(path)
    try:
        if fmt == "saved":
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if len(loaded) != 1:
                    raise DataError(
                        f"{path} is a saved DatasetDict with splits {', '.join(loaded)}: "
                        "point data.path at one split's folder"
                    )
                loaded = next(iter(loaded.values()))
            return loaded
        files = (
            sorted(str(p) for p in path.iterdir() if p.is_file()) if path.is_dir() else [str(path)]
        )
        if not files:
            raise DataError(f"data.path {path} is an empty folder")
        # keep_in_memory: a run's copy lives in memory; nothing is written to HF's cache.
        return datasets.load_dataset(
            BUILDERS[fmt], data_files=files, split="train", keep_in_memory=True
        )
    except DataError:
        raise
    except Exception as exc:  # datasets' and pyarrow's parse errors have many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data.path {path} cannot be read as {fmt!r} data: {first}") from None


def _detect_format(path: Path) -> str:
    """``data.format = "auto"``: a saved dataset folder, or the files' one extension."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "saved"
        suffixes = {p.suffix.lower() for p in path.iterdir() if p.is_file()}
    else:
        suffixes = {path.suffix.lower()}
    known = {EXTENSIONS[s] for s in suffixes if s in EXTENSIONS}
    if len(known) != 1 or len(suffixes) != 1:
        raise DataError(
            f"data.path {path}: cannot tell the format from {sorted(suffixes) or 'no files'}; "
            f"set data.format to one of json, jsonl, parquet, csv, arrow, saved"
        )
    return known.pop()


def chatterbot_dir() -> Path:
    """The YAML folder of the chatterbot-corpus wheel (found without importing it)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise DataError(f"data package for 'chatterbot' is missing: {CHATTERBOT_INSTALL}")
    return Path(spec.origin).parent / "data"


def load_chatterbot(languages: tuple[str, ...]) -> Any:
    """Q->A pairs of the chatterbot corpus: one row per consecutive pair of turns.

    Columns: ``prompt``, ``response``, ``topic`` (the YAML file, e.g. ``science``) and
    ``language`` (its folder). Files in file-name order, pairs in file order.
    """
    import datasets
    import yaml

    root = chatterbot_dir()
    rows: dict[str, list[str]] = {"prompt": [], "response": [], "topic": [], "language": []}
    for language in languages:
        folder = root / language
        if not folder.is_dir():
            known = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataError(
                f"data.languages: {language!r} is not in the chatterbot corpus "
                f"(known: {', '.join(known)})"
            )
        for path in sorted(folder.glob("*.yml")):
            try:
                # The C loader when libyaml is there: the pure-Python one takes seconds.
                loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
                body = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
            except yaml.YAMLError as exc:
                raise DataError(f"{path} is not valid YAML: {exc}") from None
            for talk in body.get("conversations") or []:
                turns = [str(t).strip() for t in talk if isinstance(t, str | int | float)]
                for prompt, response in zip(turns, turns[1:], strict=False):
                    if prompt and response:
                        rows["prompt"].append(prompt)
                        rows["response"].append(response)
                        rows["topic"].append(path.stem)
                        rows["language"].append(language)
    return datasets.Dataset.from_dict(rows)
