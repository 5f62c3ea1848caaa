"""SFT data: formats and their errors, the template's masks, packing ≡ one by one, curriculum."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import UserError
from scratchlm.model import build_model
from scratchlm.model.layers import DocumentMask
from scratchlm.sft.data import (
    SFTLoader,
    build_examples,
    ensure_chat_specials,
    order_examples,
    read_conversations,
    render,
    resize_embeddings,
    task_conversations,
)
from scratchlm.sft.tasks import FAMILIES, check, generate_tasks
from scratchlm.tokenizer import ByteTokenizer, CharTokenizer
from tests.conftest import shared_file


@pytest.fixture
def tok():
    return ensure_chat_specials(ByteTokenizer({"<|endoftext|>": 256}))[0]


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return str(p)


def test_the_three_formats(tmp_path):
    a = write(tmp_path, "a.jsonl", [{"instruction": "Say hi", "input": "to Bob", "output": "hi Bob"}])
    turns = [("system", "be brief"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]
    m = write(tmp_path, "m.jsonl", [{"messages": [{"role": r, "content": c} for r, c in turns]}])
    p = write(tmp_path, "p.jsonl", [{"prompt": "2+2", "completion": "4"}])
    convs = read_conversations([a, m, p])
    assert convs[0].turns == [("user", "Say hi\n\nto Bob"), ("assistant", "hi Bob")]
    assert [r for r, _ in convs[1].turns] == ["system", "user", "assistant", "user", "assistant"]
    assert convs[2].turns == [("user", "2+2"), ("assistant", "4")]


def test_the_real_instruction_data_reads():
    convs = read_conversations([str(shared_file("instruction-data.json"))])
    assert len(convs) == 1100 and all(c.turns[-1][0] == "assistant" for c in convs)


@pytest.mark.parametrize("lines, message", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"x.jsonl:1: conversation has no assistant turn"),
    ([{"instruction": "x", "input": "", "output": 3}], r"x.jsonl:1: field 'output' is int"),
    ([{"instruction": "x"}], r"x.jsonl:1: missing field 'output'"),
    (['{"prompt": "a", "completion": "b"}', "{oops"], r"x.jsonl:2: not valid JSON"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"}]}], r"a system turn may only come first"),
    ([{"text": "x"}], r"unknown record format"),
])
def test_bad_records_name_file_line_and_field(tmp_path, lines, message):
    with pytest.raises(UserError, match=message):
        read_conversations([write(tmp_path, "x.jsonl", lines)])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="file is empty"):
        read_conversations([str(tmp_path / "empty.jsonl")])


def test_only_assistant_tokens_and_their_end_are_trained(tok):
    ids, labels = render(tok, [("user", "hi"), ("assistant", "yo"), ("user", "ok"), ("assistant", "!")])
    end = tok.special_tokens["<|end|>"]
    trained = [tok.decode([i]) for i, lab in zip(ids, labels) if lab >= 0]
    assert trained == ["y", "o", "<|end|>", "!", "<|end|>"]
    assert all(lab in (i, -1) for i, lab in zip(ids, labels))
    assert labels.count(end) == 2  # the user's <|end|> is not trained


def test_prompt_tokens_receive_zero_gradient(tok):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="llama", vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                    bias=False, tie_embeddings=False))
    ids, labels = render(tok, [("user", "abc"), ("assistant", "xy")])
    x, y = torch.tensor([ids[:-1]]), torch.tensor([labels[1:]])
    # Gradient of the loss w.r.t. the *output* logits of prompt positions is zero: their targets are -1.
    logits, _ = model(x)
    logits.retain_grad()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1).backward()
    masked = (y[0] < 0)
    assert torch.all(logits.grad[0, masked] == 0) and torch.any(logits.grad[0, ~masked] != 0)


def test_packing_trains_like_one_by_one(tok):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="llama", vocab_size=320, block_size=160, n_layer=2, n_head=2, n_embd=16,
                                    bias=False)).eval()
    examples, _ = build_examples(task_conversations(6, seed=1), tok, 160)
    loader = SFTLoader(examples, 160, batch_size=1, shuffle=False)
    x, y, docs = loader.next_batch()
    assert len(set(docs[0].tolist()) - {-2}) >= 2  # several examples in one row
    packed_loss = torch.nn.functional.cross_entropy(model(x, cache=DocumentMask(docs))[0].flatten(0, 1), y.flatten(),
                                                    ignore_index=-1, reduction="sum")
    alone = 0.0
    for d in sorted(set(docs[0].tolist()) - {-2}):
        ex = examples[d]
        xi, yi = torch.tensor([ex.ids[:-1]]), torch.tensor([ex.labels[1:]])
        alone += torch.nn.functional.cross_entropy(model(xi)[0].flatten(0, 1), yi.flatten(), ignore_index=-1,
                                                   reduction="sum").item()
    assert packed_loss.item() == pytest.approx(alone, rel=1e-5)


def test_overlong_examples_truncated_or_dropped(tok):
    convs = task_conversations(20, seed=2)
    _, counts = build_examples(convs, tok, 24, "truncate")
    assert counts["truncated"] > 0
    kept, counts = build_examples(convs, tok, 24, "drop")
    assert counts["dropped"] > 0 and all(len(e.ids) <= 25 for e in kept)
    with pytest.raises(UserError, match="no SFT example fits"):
        build_examples(convs, tok, 4, "drop")


def test_curriculum_orders(tok):
    examples, _ = build_examples(task_conversations(50, seed=3), tok, 128)
    by_len = order_examples(examples, "length", 0)
    assert [len(e.ids) for e in by_len] == sorted(len(e.ids) for e in examples)
    by_diff = order_examples(examples, "difficulty", 0)
    assert [e.meta["difficulty"] for e in by_diff] == sorted(e.meta["difficulty"] for e in examples)
    with pytest.raises(UserError, match="sft.curriculum"):
        order_examples(examples, "random", 0)


def test_loader_resumes_exactly(tok):
    examples, _ = build_examples(task_conversations(40, seed=4), tok, 64)
    a = SFTLoader(examples, 64, batch_size=3, seed=5)
    for _ in range(4):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(5)]
    b = SFTLoader(examples, 64, batch_size=3, seed=5)
    b.load_state_dict(state)
    for e, g in zip(expected, (b.next_batch() for _ in range(5))):
        assert all(torch.equal(u, v) for u, v in zip(e, g))


def test_specials_added_and_embeddings_grown():
    tok = CharTokenizer(sorted(set("abc ")))
    grown, added = ensure_chat_specials(tok)
    assert added == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"] and grown.vocab_size == 8
    assert grown.encode("ab") == tok.encode("ab")
    model = build_model(ModelConfig(vocab_size=4, block_size=8, n_layer=1, n_head=1, n_embd=8))
    old = model.wte.weight.detach().clone()
    assert resize_embeddings(model, 8)
    assert model.wte.weight.shape == (8, 8) and model.lm_head.weight is model.wte.weight
    torch.testing.assert_close(model.wte.weight[:4], old)
    torch.testing.assert_close(model.wte.weight[4], old.mean(0))
    assert model(torch.tensor([[7, 1]]))[0].shape == (1, 2, 8)


def test_tasks_are_checkable_and_seeded():
    tasks = generate_tasks(50, seed=9)
    assert tasks == generate_tasks(50, seed=9) and {t.family for t in tasks} == set(FAMILIES)
    assert all(check(t.family, t.answer, t.answer + ".") for t in tasks)
    add = next(t for t in tasks if t.family == "add")
    a, b = (int(v) for v in add.instruction.removeprefix("Add: ").split(" + "))
    assert int(add.answer) == a + b
