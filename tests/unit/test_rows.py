"""Row data through Hugging Face ``datasets``: every local format, the column mapping,
and the errors that name the key and the file."""

from __future__ import annotations

import json

import pytest

from fedtune.config import DataConfig, load_scenario
from fedtune.data import build_population, client_train_chunks
from fedtune.data.rows import load_rows
from fedtune.errors import ConfigError, DataError

ROWS = {
    "q": [f"question {i}?" for i in range(12)],
    "a": [f"answer number {i}." for i in range(12)],
    "who": ["alice", "bob", "carol"] * 4,
    "topic": ["x", "y"] * 6,
}


def write(tmp_path, fmt: str):
    """ROWS written in ``fmt`` by ``datasets`` (or by hand for json lists)."""
    import datasets

    table = datasets.Dataset.from_dict(ROWS)
    if fmt == "saved":
        table.save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved"
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        table.to_json(str(path), lines=True)
    elif fmt == "json":  # one JSON array, as people write them by hand
        path.write_text(
            json.dumps([dict(zip(ROWS, v, strict=True)) for v in zip(*ROWS.values(), strict=True)])
        )
    elif fmt == "parquet":
        table.to_parquet(str(path))
    elif fmt == "csv":
        table.to_csv(str(path), index=False)
    elif fmt == "arrow":
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.data.schema) as out:
            out.write_table(table.data.table)
    return path


def files(path, **kw) -> DataConfig:
    base = dict(
        name="files",
        path=str(path),
        prompt_column="q",
        response_column="a",
        client_column="who",
        min_chars=0,
        eval_clients=1,
    )
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv", "arrow", "saved"])
def test_every_local_format_gives_the_same_natural_clients(tmp_path, fmt):
    population = build_population(files(write(tmp_path, fmt)))
    clients = {c.client_id: c for c in (*population.train, *population.evaluation)}
    assert sorted(clients) == ["alice", "bob", "carol"]
    alice = clients["alice"]
    assert alice.examples[0] == (("user", "question 0?"), ("assistant", "answer number 0."))
    assert len(alice.examples) == 4


def test_a_folder_of_files_is_one_table(tmp_path):
    import datasets

    folder = tmp_path / "parts"
    folder.mkdir()
    table = datasets.Dataset.from_dict(ROWS)
    table.select(range(6)).to_json(str(folder / "a.jsonl"), lines=True)
    table.select(range(6, 12)).to_json(str(folder / "b.jsonl"), lines=True)
    assert len(load_rows(files(folder))) == 12


def test_text_column_makes_raw_text_clients(tmp_path):
    path = write(tmp_path, "jsonl")
    population = build_population(
        files(path, prompt_column="", response_column="", text_column="a")
    )
    client = population.train[0]
    assert not client.examples and "answer number" in client.text


def test_a_missing_column_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "parquet")
    with pytest.raises(
        DataError, match=rf"data.response_column = 'answer' is not a column of {path}"
    ):
        load_rows(files(path, response_column="answer"))


def test_an_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=rf"data.path {path} cannot be read as 'parquet'"):
        load_rows(files(path))


def test_an_unknown_extension_asks_for_data_format(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match="set data.format"):
        load_rows(files(path))


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('name = "files"\npath = "x.jsonl"\nprompt_colum = "q"', "data.prompt_colum"),
        (
            'name = "files"\npath = "x.jsonl"\nclient_column = "c"\nprompt_column = "q"',
            "data.response_column",
        ),
        ('name = "chatterbot"\npartitioner = "dirichlet"\nnum_clients = 4', "data.label_column"),
        ('name = "chatterbot"\npartitioner = "iid"', "data.num_clients"),
        ('name = "shakespeare"\npartitioner = "iid"\nnum_clients = 4', "data.partitioner"),
        ('name = "chatterbot"\nclient_column = "topic"\nalpha = 0', "data.alpha"),
    ],
)
def test_wrong_data_keys_name_the_key_and_the_file(tmp_path, body, key):
    path = tmp_path / "s.toml"
    path.write_text(f"[data]\n{body}\n")
    with pytest.raises(ConfigError, match=rf"{path}.*'{key}'"):
        load_scenario(path)


def test_chatterbot_topics_are_natural_instruction_clients(tokenizer):
    cfg = DataConfig(
        name="chatterbot",
        prompt_column="prompt",
        response_column="response",
        client_column="topic",
        min_chars=2000,
        eval_clients=2,
    )
    population = build_population(cfg)
    ids = {c.client_id for c in (*population.train, *population.evaluation)}
    assert {"science", "ai", "trivia"} <= ids
    chunks = client_train_chunks(tokenizer, population.train[0], cfg, 96)
    assert chunks.labels.shape == chunks.input_ids.shape == (len(chunks), 96)


def test_a_messages_column_gives_chat_examples(tmp_path, tokenizer):
    path = tmp_path / "chats.jsonl"
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}]
    lines = [json.dumps({"messages": talk, "who": w}) for w in ("a", "a", "b", "c")]
    path.write_text("\n".join(lines) + "\n")
    cfg = files(path, prompt_column="", response_column="", messages_column="messages")
    population = build_population(cfg)
    client = next(c for c in (*population.train, *population.evaluation) if c.client_id == "a")
    assert client.examples[0] == (("user", "hi"), ("assistant", "hello."))
    chunks = client_train_chunks(
        tokenizer, client, DataConfig(**{**vars(cfg), "local_holdout": 0.0}), 64
    )
    kept = chunks.labels[0][chunks.labels[0] != -100]
    assert tokenizer.decode(kept) == "hello.<|im_end|>\n"


def test_a_conversation_without_an_answer_is_refused(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "who": "a"}) + "\n"
    )
    cfg = files(
        path, prompt_column="", response_column="", messages_column="messages", eval_clients=1
    )
    with pytest.raises(DataError, match="without an assistant turn"):
        build_population(cfg)
