"""SFT data: formats and their errors, the template's masks, packing ≡ one by one (sliding windows too),
curriculum, and a held-out split that shares no prompt with training."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.config import GPTConfig, LlamaConfig, model_config
from scratchlm.errors import UserError
from scratchlm.model import build_model, resize_embeddings
from scratchlm.model.layers import DocumentMask
from scratchlm.sft.data import (
    Conversation,
    SFTLoader,
    build_examples,
    order_examples,
    prompt_key,
    read_conversations,
    task_conversations,
)
from scratchlm.sft.train import split
from scratchlm.tasks.families import FAMILIES
from scratchlm.tokenizer import ByteTokenizer, CharTokenizer
from scratchlm.tokenizer.chat import ensure_chat_specials, render
from tests.helpers import shared_file


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
    model = build_model(LlamaConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                    bias=False, tie_embeddings=False))
    ids, labels = render(tok, [("user", "abc"), ("assistant", "xy")])
    x, y = torch.tensor([ids[:-1]]), torch.tensor([labels[1:]])
    # Gradient of the loss w.r.t. the *output* logits of prompt positions is zero: their targets are -1.
    logits, _ = model(x)
    logits.retain_grad()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1).backward()
    masked = (y[0] < 0)
    assert torch.all(logits.grad[0, masked] == 0) and torch.any(logits.grad[0, ~masked] != 0)


@pytest.mark.parametrize("arch_kw", [
    dict(arch="llama", bias=False),
    dict(arch="llama", bias=False, n_kv_head=1, sliding_window=4),  # the window is shorter than every example
    dict(arch="gpt", sliding_window=4),
], ids=["llama", "llama-window4-mqa", "gpt-window4"])
def test_packing_trains_like_one_by_one(tok, arch_kw):
    """A packed row gives each example the logits it gets alone, sliding window included. fp32; the
    packed and single forwards sum in different orders, so logits (magnitude ~1, two layers) agree to
    atol 1e-4 / rtol 1e-5. Weights at std 0.3 (not 0.02) so attention is far from uniform and a window
    lost in packing moves the logits by far more than that."""
    torch.manual_seed(0)
    model = build_model(model_config(vocab_size=320, block_size=160, n_layer=2, n_head=2, n_embd=16, **arch_kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    model.eval()
    examples, _ = build_examples(task_conversations(6, seed=1), tok, 160)
    assert min(len(e.ids) for e in examples) > 4 * 2  # every example spans more than two windows
    loader = SFTLoader(examples, 160, batch_size=1, shuffle=False)
    x, y, docs = loader.next_batch()
    assert len(set(docs[0].tolist()) - {-2}) >= 2  # several examples in one row
    packed_logits = model(x, doc_mask=DocumentMask(docs))[0]
    packed_loss = torch.nn.functional.cross_entropy(packed_logits.flatten(0, 1), y.flatten(), ignore_index=-1,
                                                    reduction="sum")
    alone_loss = torch.zeros(())
    for d in sorted(set(docs[0].tolist()) - {-2}):
        ex = examples[d]
        xi, yi = torch.tensor([ex.ids[:-1]]), torch.tensor([ex.labels[1:]])
        logits = model(xi)[0]
        # packed, the example's last token is also there (it predicts the next example, label -1)
        torch.testing.assert_close(packed_logits[0, docs[0] == d][: xi.size(1)], logits[0], atol=1e-4, rtol=1e-5)
        alone_loss += torch.nn.functional.cross_entropy(logits.flatten(0, 1), yi.flatten(), ignore_index=-1,
                                                        reduction="sum")
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-3, rtol=1e-5)  # a sum of ~100 token losses


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
    model = build_model(GPTConfig(vocab_size=4, block_size=8, n_layer=1, n_head=1, n_embd=8))
    old = model.wte.weight.detach().clone()
    assert resize_embeddings(model, 8)
    assert model.wte.weight.shape == (8, 8) and model.lm_head.weight is model.wte.weight
    torch.testing.assert_close(model.wte.weight[:4], old, atol=0, rtol=0)  # copied
    torch.testing.assert_close(model.wte.weight[4], old.mean(0), atol=1e-8, rtol=1e-6)  # fp32 mean of 4 rows
    assert model(torch.tensor([[7, 1]]))[0].shape == (1, 2, 8)


def overlap(train: list[Conversation], held_out: list[Conversation]) -> int:
    seen = {prompt_key(c) for c in train}
    return sum(prompt_key(c) in seen for c in held_out)


def test_held_out_embedded_tasks_never_appear_in_training():
    """The default embedded set (3000 tasks, 10% held out) used to leak 46 of its 300 held-out prompts."""
    train, held_out, dropped = split(task_conversations(3000, seed=1337), 0.1, seed=1337)
    assert (len(train), len(held_out), dropped) == (2700, 300, 0)
    assert overlap(train, held_out) == 0
    assert {c.meta["family"] for c in held_out} == set(FAMILIES)


def test_user_data_deduplicated_and_split_by_prompt():
    def conv(prompt: str, answer: str, i: int) -> Conversation:
        return Conversation([("user", prompt), ("assistant", answer)], f"x.jsonl:{i}")

    convs = [conv(f"question {i % 30}", "yes", i) for i in range(60)]  # each of 30 prompts twice
    convs += [conv(f"question  {i}", "no", 60 + i) for i in range(10)]  # same prompts (spacing), other answers
    train, held_out, dropped = split(convs, 0.2, seed=3)
    assert dropped == 30  # the exact repeats; the other answers to the same prompts are kept
    assert len(train) + len(held_out) == 40 and overlap(train, held_out) == 0
    assert len({prompt_key(c) for c in held_out}) == 6  # 20% of the 30 distinct prompts
    assert sum(c.turns[-1][1] == "no" for c in train + held_out) == 10
    with pytest.raises(UserError, match="only 1 distinct SFT prompts"):
        split([conv("same", "a", 0), conv("same", "b", 1)], 0.5, seed=0)
