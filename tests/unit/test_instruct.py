"""Instruction tuning: chat-template rows whose loss is on the responses alone."""

from __future__ import annotations

import pytest
import torch

from fedtune.data.instruct import (
    IGNORE,
    LabelledChunks,
    batch_parts,
    encode_example,
    instruction_chunks,
    prompt_and_reference,
    split_examples,
)
from fedtune.engines import LocalTraining, get_engine
from fedtune.engines.loss import causal_lm_loss, chunked_loss, decoder_and_head
from fedtune.evaluation import perplexity

EXAMPLE = (("user", "what is h2o"), ("assistant", "water, mostly."))
TWO_TURNS = (
    ("system", "be brief"),
    ("user", "hi"),
    ("assistant", "hello."),
    ("user", "what is h2o"),
    ("assistant", "water."),
)


def test_labels_are_the_assistant_turns_only(tokenizer):
    ids, labels = encode_example(tokenizer, EXAMPLE)
    rendered = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in EXAMPLE], tokenize=False
    )
    assert tokenizer.decode(ids) == rendered  # the model's own chat template
    kept = [t for t in labels if t != IGNORE]
    assert tokenizer.decode(kept) == "water, mostly.<|im_end|>\n"  # and learns to stop
    assert labels[: labels.index(kept[0])] == [IGNORE] * labels.index(kept[0])


def test_every_assistant_turn_of_a_conversation_is_trained(tokenizer):
    ids, labels = encode_example(tokenizer, TWO_TURNS)
    kept = tokenizer.decode([t for t in labels if t != IGNORE])
    assert kept == "hello.<|im_end|>\nwater.<|im_end|>\n"
    prompt, reference = prompt_and_reference(tokenizer, TWO_TURNS)
    assert reference == "water."
    assert tokenizer.decode(prompt).endswith("what is h2o<|im_end|>\n<|im_start|>assistant\n")
    assert ids[: len(prompt)] == prompt


def test_padding_and_packing(tokenizer):
    examples = [EXAMPLE, TWO_TURNS, EXAMPLE]
    padded = instruction_chunks(tokenizer, examples, 80, packing=False)
    lengths = [len(encode_example(tokenizer, e)[0]) for e in examples]
    assert padded.attention_mask.sum(dim=1).tolist() == [min(n, 80) for n in lengths]
    assert bool((padded.labels[padded.attention_mask == 0] == IGNORE).all())
    packed = instruction_chunks(tokenizer, examples, 32, packing=True)
    # Full rows only; a row of prompt tokens alone (nothing to learn) is dropped.
    assert 1 <= len(packed) <= sum(lengths) // 32 and bool(packed.attention_mask.all())
    assert bool(((packed.labels[:, 1:] != IGNORE).sum(dim=1) > 0).all())
    # A batch is cut to its longest row: padding costs no compute past it.
    ids, mask, labels = batch_parts(padded[[0, 2]])
    assert ids.shape[1] == lengths[0] and mask is not None and labels.shape == ids.shape


def test_examples_without_a_response_token_after_truncation_are_dropped(tokenizer):
    assert len(instruction_chunks(tokenizer, [EXAMPLE], 8, packing=False)) == 0


def test_split_examples_keeps_a_tail():
    examples = tuple((("user", str(i)), ("assistant", str(i))) for i in range(10))
    train, held = split_examples(examples, 0.2)
    assert (len(train), len(held)) == (8, 2) and held[-1] == examples[-1]
    assert split_examples(examples[:1], 0.2) == (examples[:1], ())


def test_masked_tokens_carry_zero_loss_weight(tiny_peft, tokenizer):
    """The chunked loss's gradient at every position whose next token is masked (the
    prompt, the template's markup, the padding) is exactly zero, and changing what the
    model predicts there changes neither the loss nor any gradient of the adapter."""
    rows = instruction_chunks(tokenizer, [EXAMPLE, TWO_TURNS], 96, packing=False)
    ids, mask, labels = batch_parts(rows)
    decoder, head = decoder_and_head(tiny_peft)
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state.detach()
    hidden.requires_grad_(True)
    loss = chunked_loss(head, hidden, labels)
    loss.backward()
    masked = torch.zeros_like(labels, dtype=torch.bool)
    masked[:, :-1] = labels[:, 1:] == IGNORE  # position t predicts token t+1
    assert masked.sum() > 0 and (~masked[:, :-1]).sum() > 0
    assert hidden.grad is not None
    assert float(hidden.grad[masked].abs().max()) == 0.0
    assert float(hidden.grad[~masked].abs().sum()) > 0.0
    # Scramble what the model says at masked positions: same loss, bit for bit.
    scrambled = hidden.detach().clone()
    scrambled[masked] = torch.randn(int(masked.sum()), hidden.shape[-1])
    assert chunked_loss(head, scrambled, labels).item() == loss.item()
    # The loss is the mean cross-entropy over response tokens alone.
    logits = head(hidden.detach()).float()[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_padding_tokens_change_no_loss_and_no_gradient(tiny_peft, tokenizer):
    """Through the whole model: other token ids in the padding leave the loss and every
    LoRA gradient bit for bit the same; unmasking the prompts changes the loss."""
    rows = instruction_chunks(tokenizer, [EXAMPLE, TWO_TURNS], 96, packing=False)
    ids, mask, labels = batch_parts(rows)

    def grads(inputs: torch.Tensor, target: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        tiny_peft.zero_grad()
        for n, p in tiny_peft.named_parameters():
            p.requires_grad_("lora_" in n)
        loss = causal_lm_loss(tiny_peft, inputs, mask, target)
        loss.backward()
        out = [p.grad.clone() for n, p in tiny_peft.named_parameters() if "lora_B" in n]
        return loss.item(), out

    loss, grad = grads(ids, labels)
    noise = torch.randint(0, len(tokenizer), ids.shape, generator=torch.Generator().manual_seed(1))
    padded_other = torch.where(mask.bool(), ids, noise)
    assert not torch.equal(padded_other, ids)
    again, grad_again = grads(padded_other, labels)
    assert loss == again and all(torch.equal(a, b) for a, b in zip(grad, grad_again, strict=True))
    unmasked, _ = grads(ids, torch.where(mask.bool(), ids, IGNORE))
    assert unmasked != loss


def test_engines_and_perplexity_take_labelled_rows(tiny_peft, tokenizer):
    rows = instruction_chunks(tokenizer, [EXAMPLE, TWO_TURNS] * 2, 96, packing=False)
    before = perplexity(tiny_peft, rows, batch_size=3)
    config = LocalTraining(lr=1e-2, local_steps=3, batch_size=2, seed=0)
    update = get_engine("backprop").train(tiny_peft, rows, config)
    assert update.num_examples == 6
    assert perplexity(tiny_peft, rows, batch_size=3) < before
    # Plain chunks and the same chunks as labelled rows (labels = ids) train the same.
    plain = rows.input_ids[:, :32]
    same = LabelledChunks(plain, plain.clone(), torch.ones_like(plain))
    assert perplexity(tiny_peft, plain) == pytest.approx(perplexity(tiny_peft, same), rel=1e-6)


@pytest.mark.parametrize("engine", ["zeroth", "forward"])
def test_gradient_free_engines_take_labelled_rows(tiny_peft, tokenizer, engine):
    from ..conftest import engine_config

    rows = instruction_chunks(tokenizer, [EXAMPLE, TWO_TURNS] * 2, 96, packing=False)
    extra = (
        {"forward_derivative": "fd", "perturbations": 2, "max_perturbations": 2}
        if engine == "forward"
        else {}
    )
    config = engine_config(engine, lr=1e-3, local_steps=2, batch_size=2, seed=0, **extra)
    update = get_engine(engine).train(tiny_peft, rows, config)
    assert update.num_examples == 4 and 0 < update.loss < 100
