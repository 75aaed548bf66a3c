"""model.task beyond the causal LM: an encoder's sequence classification (BERT-style,
as FwdLLM evaluates) and an encoder-decoder's seq2seq (T5), each federated in-process
on a tiny model with the same engines, strategies and loop; and the combinations that
cannot work, refused with the key to change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedtune.config import LoraConfig, ModelConfig, load_scenario
from fedtune.errors import ConfigError, FedtuneError, ModelError

from ..conftest import engine_config, simulate_here

PETS = "the cat sat on the mat and purred softly by the warm fire".split()
MARKETS = "stock markets fell sharply as investors sold shares and bonds".split()


def save_tiny_as(config_cls: str, auto: str, folder: Path) -> Path:
    """A tiny random model of ``config_cls`` saved by transformers' ``auto`` class, with
    SmolLM2's tokenizer: ``AutoModel`` gives an encoder checkpoint without a task head,
    as the Hub's BERTs come."""
    import transformers

    from fedtune.models.base import smollm2_tokenizer_dir
    from fedtune.models.families import tiny_config

    tokenizer_dir = smollm2_tokenizer_dir()
    vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, auto).from_config(tiny_config(config_cls, vocab))
    model.save_pretrained(folder)
    for item in tokenizer_dir.iterdir():
        if item.is_file() and item.name != ".complete":
            shutil.copy(item, folder / item.name)
    return folder


def write_rows(path: Path, count: int = 96, clients: int = 4) -> Path:
    """Rows of two topics: ``text`` and ``prompt`` are the same words, ``label`` and
    ``response`` the topic's name, ``client`` spreads them over ``clients``."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(count):
        topic, words = ("pets", PETS) if i % 2 == 0 else ("markets", MARKETS)
        picks = torch.randint(len(words), (10,), generator=generator).tolist()
        text = " ".join(words[j] for j in picks)
        rows.append(
            {
                "text": text,
                "label": topic,
                "prompt": text,
                "response": topic,
                "client": f"c{(i // 2) % clients}",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def seq_cls_overrides(folder: Path, rows: Path) -> list[str]:
    return [
        f'model.name="{folder}"',
        "model.task=seq-cls",
        "model.num_labels=2",
        "lora.targets=[]",
        "data.name=files",
        f'data.path="{rows}"',
        "data.client_column=client",
        "data.label_column=label",
        "data.eval_fraction=0.25",
        "data.min_chars=0",
        "data.eval_chunks=16",
        "client.seq_len=16",
        "client.batch_size=4",
        "round.clients_per_round=2",
    ]


def seq2seq_overrides(folder: Path, rows: Path) -> list[str]:
    cls = seq_cls_overrides(folder, rows)
    keep = [o for o in cls if not o.startswith(("model.task", "model.num_labels", "data.label"))]
    return [
        *keep,
        "model.task=seq2seq",
        "data.prompt_column=prompt",
        "data.response_column=response",
    ]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_as("BertConfig", "AutoModel", tmp_path_factory.mktemp("bert") / "bert")


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_as("T5Config", "AutoModelForSeq2SeqLM", tmp_path_factory.mktemp("t5") / "t5")


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rows(tmp_path_factory.mktemp("rows") / "rows.jsonl")


def round_events(run: Path) -> list[dict]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e.get("event") == "round"]


# ------------------------------------------------------------------ whole federations


@pytest.mark.heavy
def test_an_encoder_classifies_after_federated_rounds(encoder, rows, tmp_path):
    # A BERT checkpoint has no classification head: it is initialized from a fixed seed
    # and trains and travels with the adapter; each round event carries its accuracy.
    summary = simulate_here(
        "tiny",
        tmp_path / "run",
        *(
            x
            for o in [
                *seq_cls_overrides(encoder, rows),
                "run.rounds=3",
                "client.lr=2e-2",
                "client.local_steps=4",
            ]
            for x in ("--set", o)
        ),
    )
    events = round_events(tmp_path / "run")
    assert [e["round"] for e in events] == [0, 1, 2, 3]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in events)
    # Two balanced classes: a fresh head scores about chance (exp(ln 2) = 2).
    assert 1.9 < summary["initial_perplexity"] < 2.1
    assert summary["final_perplexity"] < summary["initial_perplexity"] - 0.3
    assert events[-1]["accuracy"] >= 0.9 > events[0]["accuracy"]


@pytest.mark.heavy
def test_t5_learns_responses_after_federated_rounds(t5, rows, tmp_path):
    summary = simulate_here(
        "tiny",
        tmp_path / "run",
        *(
            x
            for o in [*seq2seq_overrides(t5, rows), "run.rounds=2", "client.lr=2e-2"]
            for x in ("--set", o)
        ),
    )
    events = round_events(tmp_path / "run")
    assert [e["round"] for e in events] == [0, 1, 2]
    assert "accuracy" not in events[-1]
    # Perplexity over the target tokens: it falls by orders of magnitude in two rounds.
    assert summary["final_perplexity"] < summary["initial_perplexity"] / 10


# ------------------------------------------------------------- pieces of the federation


def test_the_head_is_seeded_and_travels_with_the_adapter(encoder):
    from fedtune.models import adapter_state, attach_lora, load_base_model

    first = load_base_model(str(encoder), task="seq-cls", num_labels=3)
    again = load_base_model(str(encoder), task="seq-cls", num_labels=3)
    assert type(first).__name__ == "BertForSequenceClassification"
    assert torch.equal(first.classifier.weight, again.classifier.weight)
    assert first.classifier.weight.shape == (3, 64) and first.classifier.weight.std() > 0
    state = adapter_state(attach_lora(first, LoraConfig(r=2, alpha=4), seed=0))
    head = sorted(k for k in state if "lora_" not in k)
    assert head == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]


def test_a_gap_outside_the_head_is_still_refused(encoder, tmp_path):
    from safetensors.torch import load_file, save_file

    from fedtune.models import load_base_model

    folder = tmp_path / "partial"
    shutil.copytree(encoder, folder)
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if "encoder.layer.0.output.dense.weight" in k)
    del weights[key]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lacks 1 weight.*output.dense.weight"):
        load_base_model(str(folder), task="seq-cls", num_labels=2)


@pytest.mark.parametrize("engine", ["backprop", "zeroth", "forward"])
def test_every_engine_trains_a_classifier_from_its_own_loss(encoder, rows, engine):
    from fedtune.data import build_population, client_train_chunks
    from fedtune.engines import get_engine
    from fedtune.models import adapter_state, attach_lora, load_base_model, load_tokenizer

    scenario = load_scenario("tiny", seq_cls_overrides(encoder, rows))
    chunks = client_train_chunks(
        load_tokenizer(str(encoder)),
        build_population(scenario.data).train[0],
        scenario.data,
        16,
        "seq-cls",
    )
    assert chunks.labels.shape == (len(chunks),) and set(chunks.labels.tolist()) == {0, 1}
    model = attach_lora(
        load_base_model(str(encoder), task="seq-cls", num_labels=2), scenario.lora, seed=0
    )
    before = adapter_state(model)
    settings = engine_config(engine, lr=1e-2, local_steps=2, batch_size=4, forward_derivative="fd")
    update = get_engine(engine).train(model, chunks, settings)
    assert 0.3 < update.loss < 1.2  # cross-entropy over two classes, near ln 2
    head = "base_model.model.classifier.weight"
    assert not torch.equal(update.state[head], before[head])  # the head trains too
    lora = next(k for k in before if "lora_B" in k)
    assert not torch.equal(update.state[lora], before[lora])


def test_labels_are_numbered_alike_in_every_process(tmp_path):
    from fedtune.config import DataConfig
    from fedtune.data.tasks import label_ids, num_classes

    names = write_rows(tmp_path / "names.jsonl")
    cfg = DataConfig(name="files", path=str(names), client_column="client", label_column="label")
    assert label_ids(cfg) == {"markets": 0, "pets": 1}  # sorted, whatever the row order
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": "x", "y": y, "c": "a"}) + "\n" for y in (3, 0)))
    cfg = DataConfig(name="files", path=str(numbers), client_column="c", label_column="y")
    assert label_ids(cfg) == {"0": 0, "3": 3} and num_classes(cfg) == 4


def test_seq2seq_rows_keep_the_target_apart(t5, rows):
    from fedtune.data.instruct import batch_parts, predicted_tokens
    from fedtune.data.tasks import seq2seq_rows
    from fedtune.models import load_tokenizer

    tokenizer = load_tokenizer(str(t5))
    example = (("user", "the cat sat"), ("assistant", "pets"))
    batch = seq2seq_rows(tokenizer, [example, example], 16)
    ids, mask, labels = batch_parts(batch)
    target = tokenizer("pets")["input_ids"]
    assert ids.shape == (2, len(tokenizer("the cat sat")["input_ids"]))
    assert labels.tolist() == [target, target] and labels.is_contiguous()
    assert predicted_tokens(batch) == 2 * len(target)


# ------------------------------------------------------------------------- refusals


def test_combinations_that_cannot_work_name_the_key(encoder, rows):
    base = seq_cls_overrides(encoder, rows)
    refusals = {
        "model.num_labels": ["model.num_labels=0"],
        "'seq-cls' classifies": [
            "data.label_column=''",
            "data.partitioner=iid",
            "data.num_clients=2",
        ],
        "quantization": ["model.quantization=int8"],
        r"\[gateway\]": ["gateway.enabled=true", "gateway.token=a-long-secret"],
        "evaluation.metrics": ['evaluation.metrics=["rouge-l"]'],
    }
    for match, extra in refusals.items():
        with pytest.raises(ConfigError, match=match):
            load_scenario("tiny", [*base, *extra])
    with pytest.raises(ConfigError, match="built-in tiny models are causal LMs"):
        load_scenario("tiny", ["model.task=seq-cls", "model.num_labels=2"])
    with pytest.raises(ConfigError, match="leave it 0"):
        ModelConfig(num_labels=2)
    with pytest.raises(ConfigError, match="'seq2seq' maps data.prompt_column"):
        load_scenario("tiny", [*base[:1], "model.task=seq2seq", *base[3:]])


def test_preflight_refuses_a_head_smaller_than_the_classes(encoder, rows):
    from fedtune.server.preflight import preflight

    scenario = load_scenario("tiny", [*seq_cls_overrides(encoder, rows), "model.num_labels=2"])
    assert preflight(scenario) == 4
    three = write_rows(rows.with_name("three.jsonl"))
    text = three.read_text().replace('"label": "pets"', '"label": "birds"', 1)
    three.write_text(text)
    scenario = load_scenario("tiny", [*seq_cls_overrides(encoder, three)])
    with pytest.raises(ConfigError, match="set model.num_labels = 3"):
        preflight(scenario)


def test_task_names_match_the_models_tiny_names():
    from fedtune.models.base import TINY
    from fedtune.tasks import TINY_NAMES

    assert TINY_NAMES == tuple(TINY)


@pytest.mark.heavy
def test_a_classifier_exports_merged_and_onnx_but_not_gguf(encoder, rows, tmp_path):
    from fedtune.models.export import export_run

    run = tmp_path / "run"
    simulate_here(
        "tiny",
        run,
        *(x for o in [*seq_cls_overrides(encoder, rows), "run.rounds=1"] for x in ("--set", o)),
    )
    with pytest.raises(FedtuneError, match="--format gguf cannot hold a model.task = 'seq-cls'"):
        export_run(run, "gguf")
    merged = export_run(run, "merged")
    import onnxruntime
    import transformers

    from fedtune.models.export import load_run

    model = transformers.AutoModelForSequenceClassification.from_pretrained(merged)
    assert model.config.num_labels == 2
    # The ONNX graph gives the trained classifier's logits over the two classes.
    session = onnxruntime.InferenceSession(str(export_run(run, "onnx") / "model.onnx"))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = load_run(run)[1](input_ids=ids, attention_mask=mask).logits.numpy()
    logits = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert logits.shape == (2, 2)
    assert abs(logits - reference).max() < 1e-4
