from __future__ import annotations

import pytest

from fedtune.config import DataConfig
from fedtune.data import (
    build_population,
    chunk_tokens,
    client_train_chunks,
    eval_chunks,
    load_jsonl,
    load_shakespeare,
    parse_play,
    split_holdout,
)
from fedtune.data.sources import ClientText
from fedtune.errors import DataError

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter HAMLET and HORATIO_

**HAMLET**  
To be, or not to be:  
that is the question.

**HORATIO**  
My lord.

_Exit HAMLET_

**HAMLET**  
Words, words, words.
"""


def test_parse_play_groups_lines_by_role():
    roles = parse_play(PLAY)
    assert roles == {
        "HAMLET": ["To be, or not to be:", "that is the question.", "Words, words, words."],
        "HORATIO": ["My lord."],
    }


def test_shakespeare_has_one_client_per_play_and_role():
    clients = load_shakespeare()
    assert len(clients) > 1000
    ids = [c.client_id for c in clients]
    assert len(ids) == len(set(ids))
    hamlet = next(c for c in clients if c.client_id == "hamlet/HAMLET")
    assert "To be, or not to be" in hamlet.text
    assert "**" not in hamlet.text and "_Enter" not in hamlet.text
    assert hamlet.group == "tragedies"


def test_population_split_is_fixed_and_disjoint():
    cfg = DataConfig(min_chars=20000, num_clients=10, eval_clients=3)
    a = build_population(cfg)
    build_population.cache_clear()
    b = build_population(cfg)
    assert a == b
    assert len(a.train) == 10 and len(a.evaluation) == 3
    train_ids = {c.client_id for c in a.train}
    assert train_ids.isdisjoint(c.client_id for c in a.evaluation)
    assert all(len(c.text) >= 20000 for c in a.train + a.evaluation)


def test_population_too_small_is_a_clear_error():
    with pytest.raises(DataError, match="data.min_chars"):
        build_population(DataConfig(min_chars=10**8))
    with pytest.raises(DataError, match="data.num_clients = 5000"):
        build_population(DataConfig(min_chars=10000, num_clients=5000))


def test_jsonl_groups_lines_by_client(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"client_id": "a", "text": "one"}\n\n{"client_id": 7, "text": "x"}\n'
        '{"client_id": "a", "text": "two"}\n'
    )
    clients = load_jsonl(path)
    assert [(c.client_id, c.text) for c in clients] == [("7", "x\n"), ("a", "one\ntwo\n")]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a", "b"]', "expected an object"),
        ('{"client_id": "a"}', "'text' must be a string"),
        ('{"text": "a"}', "'client_id' must be"),
    ],
)
def test_corrupt_jsonl_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"client_id": "a", "text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"d\.jsonl:2: {message}"):
        load_jsonl(path)


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path / "none.jsonl")


def test_split_holdout_cuts_at_a_line():
    text = "".join(f"line {i}\n" for i in range(10))
    train, held = split_holdout(text, 0.25)
    assert train + held == text
    assert held.startswith("line ") and train.endswith("\n")
    assert 0 < len(held) < len(text) / 2
    assert split_holdout(text, 0.0) == (text, "")


def test_chunks_are_full_length(tokenizer):
    chunks = chunk_tokens(tokenizer, "hello world " * 100, 16)
    assert chunks.dtype.is_floating_point is False
    assert chunks.shape[1] == 16 and chunks.shape[0] >= 10
    assert chunk_tokens(tokenizer, "hi", 16).shape == (0, 16)


def test_too_small_partition_is_a_clear_error(tokenizer):
    cfg = DataConfig(min_chars=0)
    with pytest.raises(DataError, match="raise data.min_chars or lower client.seq_len"):
        client_train_chunks(tokenizer, ClientText("tiny", "a few words\n"), cfg, 128)


def test_eval_chunks_interleave_eval_clients(tokenizer):
    cfg = DataConfig(min_chars=20000, num_clients=4, eval_clients=3, eval_chunks=6)
    population = build_population(cfg)
    chunks = eval_chunks(tokenizer, population, cfg, 32)
    assert chunks.shape == (6, 32)
    first = [chunk_tokens(tokenizer, c.text, 32)[0] for c in population.evaluation]
    assert all((chunks[i] == first[i]).all() for i in range(3))


def test_chunks_start_with_the_tokenizers_own_bos(tokenizer):
    # Gemma's tokenizer puts <bos> before any text and the model goes astray without
    # it; a tokenizer built here the same way (a template adding <bos>) must get it on
    # every chunk, and a tokenizer without one (SmolLM2's) nothing.
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from fedtune.data.population import leading_special

    vocab = {"<bos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate("to be or not".split())}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 0)]
    )
    with_bos = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", unk_token="<unk>")
    assert leading_special(with_bos) == [0]
    chunks = chunk_tokens(with_bos, "to be or not to be " * 10, 4)
    assert chunks.shape == (20, 4)  # 60 words, 3 a chunk after <bos>
    assert (chunks[:, 0] == 0).all() and (chunks[:, 1:] != 0).all()
    assert chunks[0].tolist() == [0, 2, 3, 4]
    assert leading_special(tokenizer) == []  # SmolLM2's: chunks are plain text
