"""A FlowerTune-style ClientApp: what a user would pick instead of fedtune's client.

As Flower's LLM example (FlowerTune) does it, every round the client loads the base
model and its tokenizer afresh, wraps it with PEFT's LoRA, sets the global adapter, and
builds a Hugging Face ``Trainer`` to run the local steps; nothing is kept between
rounds. It answers fedtune's server (the same messages, replies and report), and does
the same work as fedtune's backprop client: the same chunks of the same client, the same
batches in the same order (fedtune's seeded sampler, fed to the Trainer without its own
shuffle), AdamW at the same learning rate and weight decay, a constant schedule and no
gradient clipping. Only plain causal-LM text scenarios with backprop are supported.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune.protocol import (
    ARRAYS_KEY,
    CLIENT_INDEX_KEY,
    INFO_KEY,
    METRICS_KEY,
    PARTITION_KEY,
    TrainInstructions,
    TrainReport,
)

app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    index = int(context.node_config[PARTITION_KEY])
    return Message(
        RecordDict({INFO_KEY: ConfigRecord({CLIENT_INDEX_KEY: index})}), reply_to=message
    )


@app.train()
def train(message: Message, context: Context) -> Message:
    import torch
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import Trainer, TrainingArguments

    from fedtune.data import build_population, client_train_chunks
    from fedtune.engines.base import sample_batches
    from fedtune.metrics import peak_rss_mb, reset_peak_rss
    from fedtune.models import (
        adapter_state,
        load_adapter_state,
        load_lora_model,
        load_tokenizer,
    )
    from fedtune.wire import encode_update, from_record

    reset_peak_rss()
    started, cpu_started = time.perf_counter(), time.process_time()
    index = int(context.node_config[PARTITION_KEY])
    asked = TrainInstructions.of(message)
    scenario = asked.scenario
    if asked.engine_name != "backprop" or scenario.data.instruction:
        raise ValueError("the FlowerTune-style client trains plain text with backprop only")
    # Everything from scratch, every round (FlowerTune's client_fn).
    tokenizer = load_tokenizer(scenario.model.name)
    population = build_population(scenario.data)
    chunks = client_train_chunks(
        tokenizer, population.train[index], scenario.data, scenario.client.seq_len
    )
    model = load_lora_model(scenario.model, scenario.lora, seed=scenario.run.seed)
    load_adapter_state(model, from_record(message.content.array_records[ARRAYS_KEY]))
    client = scenario.client
    seed = asked.client_seed(index)
    order = torch.cat(sample_batches(len(chunks), client.batch_size, client.local_steps, seed))

    class Rows(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(order)

        def __getitem__(self, i: int) -> dict[str, Any]:
            row = chunks[int(order[i])]
            return {"input_ids": row, "labels": row}

    class InOrder(Trainer):  # fedtune's batches, not the Trainer's shuffle
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=client.local_steps,
            per_device_train_batch_size=client.batch_size,
            learning_rate=client.lr,
            weight_decay=client.weight_decay,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            warmup_steps=0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = InOrder(model=model, args=args, train_dataset=Rows())
        result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    state = adapter_state(model)
    report = TrainReport(
        num_examples=client.local_steps * client.batch_size,
        loss=float(sum(losses) / len(losses)) if losses else float(result.training_loss),
        compute_seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
        peak_rss_mb=peak_rss_mb(),
        client_index=index,
        round=asked.round,
        extra={},
    )
    return Message(
        RecordDict(
            {
                ARRAYS_KEY: encode_update(state, client.wire_dtype),
                METRICS_KEY: report.to_metrics(),
            }
        ),
        reply_to=message,
    )
