"""Classification fine-tuning: last-token pooling under padding, data reading and its errors, the
stratified split and loader, training a tiny pretrained model to high validation accuracy, the
confusion matrix files, and predicting through the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from scratchlm.cli import main
from scratchlm.config import apply_overrides, get_preset, model_config
from scratchlm.data.labelled import ClassifyLoader, collate, encode_text, read_labelled, stratified_split
from scratchlm.errors import UserError
from scratchlm.model import build_model
from scratchlm.model.classifier import ClassifierLM
from scratchlm.sft.classify import ClassifyResult, load_classifier, predict, train_classifier
from scratchlm.tokenizer import ByteTokenizer
from tests.helpers import tiny_llama_base

POS = ("good", "great", "happy", "love", "nice", "fine", "best")
NEG = ("bad", "awful", "sad", "hate", "poor", "worst", "ugly")
FAST = ["--train.warmup_steps=5", "--train.eval_interval=1000", "--train.tensorboard=false", "--train.batch_size=16",
        "--sft.val_fraction=0.25", "--train.precision=fp32"]  # fp32: "auto" may choose bf16 on some CPUs


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """n texts of 2-6 words, all from the label's word list: separable from any word."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(POS if i % 2 else NEG) for _ in range(rng.randint(2, 6))),
             "label": "pos" if i % 2 else "neg"} for i in range(n)]


def classify_train(data: str, *, base: str | None = None, out: str, preset: str = "sft-tiny",
                   overrides: list[str] | None = None, progress: bool = False) -> ClassifyResult:
    """The stage as `scratchlm classify train` calls it (each test's output folder is new: no run-folder claim)."""
    cfg = apply_overrides(get_preset(preset), overrides or [])
    cfg.out_dir = out
    cfg.sft.base = base or cfg.sft.base
    cfg.sft.data = [data]
    return train_classifier(cfg, data, progress=progress)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return tiny_llama_base(tmp_path_factory.mktemp("clsbase"), 64)


@pytest.fixture(scope="module")
def trained(base_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    data = write_jsonl(root / "sentiment.jsonl", sentiment_rows(160))
    result = classify_train(data, base=str(base_run), out=str(root / "run"), preset="sft-tiny",
                          overrides=["--train.max_steps=50", *FAST], progress=False)
    return root / "run", result


# -- the model ------------------------------------------------------------------------------------


def tiny_body(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = model_config(arch, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=arch == "gpt",
                       **({} if arch == "gpt" else {"n_kv_head": 1}), **({"n_experts": 4} if arch == "moe" else {}))
    return build_model(cfg)


@pytest.mark.parametrize("arch", ["gpt", "llama", "moe"])
def test_last_token_pooling_ignores_padding(arch):
    model = ClassifierLM(tiny_body(arch), 3).eval()
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20]]
    x, _ = collate(rows)  # (3, 7), right-padded with -1
    assert x.shape == (3, 7) and x[1, 3:].eq(-1).all()
    with torch.no_grad():
        batched, _ = model(x)
        alone = torch.cat([model(torch.tensor([r]))[0] for r in rows])
        # The pooled state is the last REAL position's: the body's hidden state there, through the head.
        h, _ = model.body(torch.tensor([rows[1]]))
        by_hand = model.head(h[:, len(rows[1]) - 1])
    assert batched.shape == (3, 1, 3)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, 0], by_hand[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="right-padded"):
        model(torch.tensor([[-1, 5, 6]]))


def test_lm_head_is_dropped_and_accounting_works():
    for arch, head in (("gpt", "lm_head"), ("llama", "output")):
        model = ClassifierLM(tiny_body(arch), 2)
        assert isinstance(getattr(model.body, head), torch.nn.Identity)
        assert not any(n.startswith(f"body.{head}") for n in model.state_dict())
        assert model.num_params() > 0 and model.flops_per_token() > 0 and model.config.n_layer == 2
        x, y = collate([[1, 2, 3], [4]], [0, 1])
        logits, loss = model(x, y)
        assert logits.shape == (2, 1, 2) and loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=0.1)


# -- data -----------------------------------------------------------------------------------------


def test_read_jsonl_csv_and_framing(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('\ufefftext,label,extra\n"hello, world",pos,x\n"multi\nline",neg,y\n', encoding="utf-8")
    rows = read_labelled(csv)
    assert [(r.text, r.label) for r in rows] == [("hello, world", "pos"), ("multi\nline", "neg")]
    assert rows[1].where.endswith("d.csv:4")  # the record's last line
    listed = tmp_path / "d.json"
    listed.write_text(json.dumps([{"text": "a b", "label": 3}, {"text": "c", "label": 10}]))
    assert [r.label for r in read_labelled(listed)] == ["3", "10"]  # integer labels become strings
    tok = ByteTokenizer({"<|endoftext|>": 256})
    assert encode_text(tok, "abc", 8) == ([256, 97, 98, 99, 256], False)
    assert encode_text(tok, "abcdefghij", 6) == ([256, 97, 98, 99, 100, 256], True)  # keeps the start and the EOT
    assert encode_text(tok, "abcdefghij", 6, "drop") == (None, True)


def test_bad_inputs(tmp_path, base_run):
    def fails(content: str, match: str, name: str = "d.jsonl") -> None:
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(UserError, match=match):
            read_labelled(tmp_path / name)

    fails('{"text": "a", "label": "x"}\n{"text": "b"}\n', r"d\.jsonl:2: missing field 'label'")
    fails('{"text": 5, "label": "x"}\n', r"d\.jsonl:1: field 'text' is int")
    fails('{"text": "  ", "label": "x"}\n', r"d\.jsonl:1: field 'text' is empty")
    fails("", "file is empty")
    fails('{"text": "a", "label": "x"}\nnot json\n', r"d\.jsonl:2: not valid JSON")
    fails("text,category\nhi,x\n", r"d\.csv:1: the CSV header has no 'label' column", "d.csv")
    fails("text,label\nhi,x\nthere\n", r"d\.csv:3: missing field 'label'", "d.csv")
    with pytest.raises(UserError, match="no such file"):
        read_labelled(tmp_path / "absent.jsonl")

    one = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "same"} for i in range(5)])
    with pytest.raises(UserError, match="the label 'same'.*at least two labels"):
        classify_train(one, base=str(base_run), out=str(tmp_path / "r"), overrides=FAST, progress=False)
    two = write_jsonl(tmp_path / "two.jsonl", sentiment_rows(20))
    with pytest.raises(UserError, match="no base model"):
        classify_train(two, out=str(tmp_path / "r"), progress=False)
    with pytest.raises(UserError, match="not a classifier run"):
        predict(str(base_run), ["good"])
    with pytest.raises(UserError, match="nothing to classify"):
        predict(str(base_run), [""])


def test_stratified_split_and_loader():
    labels = [0] * 30 + [1] * 10 + [2] * 2
    train, val = stratified_split(labels, 0.25, seed=3)
    assert sorted(train + val) == list(range(42)) and (train, val) == stratified_split(labels, 0.25, seed=3)
    per_class = [sum(labels[i] == c for i in val) for c in range(3)]
    assert per_class == [8, 2, 0] or per_class == [8, 2, 1]  # round(0.25 x 2) keeps the tiny class in training
    assert all(any(labels[i] == c for i in train) for c in range(3))
    with pytest.raises(UserError, match="too few"):
        stratified_split([0, 1], 0.2, seed=0)

    ids = [[i + 1] * (1 + i % 4) for i in range(10)]
    val_loader = ClassifyLoader(ids, list(range(10)), 4, shuffle=False, fill=False)
    sizes = [len(val_loader.next_batch()[1]) for _ in range(3)]
    assert sizes == [4, 4, 2]  # one pass over 10 examples: each seen once
    train_loader = ClassifyLoader(ids, list(range(10)), 4, seed=1)
    for _ in range(3):
        train_loader.next_batch()
    state = train_loader.state_dict()
    expect = [train_loader.next_batch() for _ in range(3)]
    again = ClassifyLoader(ids, list(range(10)), 4, seed=1)
    again.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expect, (again.next_batch() for _ in range(3))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and y1.shape == (4, 1)


# -- end to end -----------------------------------------------------------------------------------


def test_training_reaches_high_validation_accuracy(trained):
    run, result = trained
    assert result.labels == ["neg", "pos"]
    assert result.scores["accuracy"] >= 0.9, result.table
    assert int(result.confusion.sum()) == result.scores["n"] == 40  # 25% of 160, stratified: 20 per label
    assert result.confusion.sum(1).tolist() == [20, 20]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["confusion"] == result.confusion.tolist() and metrics["labels"] == ["neg", "pos"]
    assert (run / "eval" / "confusion.png").stat().st_size > 1000 and "| true \\ predicted |" in result.table
    assert len((run / "eval" / "predictions.jsonl").read_text().splitlines()) == 40
    assert json.loads((run / "labels.json").read_text())["labels"] == ["neg", "pos"]
    # The loop's validation loss is the per-example cross-entropy, well below chance (ln 2) now.
    assert result.run.val_loss < 0.5


def test_predict_through_the_cli(trained, capsys):
    run, _ = trained
    assert main(["classify", "predict", "--ckpt", str(run), "--text", "great love happy best"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "label: pos" and "neg" in out
    # A checkpoint folder finds labels.json in the run folder above it.
    step = sorted((run / "ckpt").glob("step_*"))[-1]
    model, _, _, labels = load_classifier(step)
    assert labels == ["neg", "pos"] and model.head.out_features == 2
    assert main(["classify", "predict", "--ckpt", str(step), "--text", "awful sad hate"]) == 0
    assert capsys.readouterr().out.startswith("label: neg")


def test_lora_trains_adapters_and_head(base_run, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40))
    result = classify_train(data, base=str(base_run), out=str(tmp_path / "lora"),
                          overrides=["--train.max_steps=3", "--sft.lora_r=4", *FAST], progress=False)
    assert result.scores["n"] == 10
    model, _, _, _ = load_classifier(tmp_path / "lora")  # rebuilds the LoRA structure from config.json
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"body", "head"}
    assert all("lora_" in n for n, p in model.body.named_parameters() if p.requires_grad)
