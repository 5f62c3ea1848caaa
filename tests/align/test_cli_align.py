"""The alignment verbs from the command line: settings and bad input answer in one line, exit 2."""

from __future__ import annotations

from scratchlm.cli import main
from tests.helpers import make_checkpoint


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_alignment_verbs_refuse_bad_settings_and_inputs_in_one_line(capsys, tmp_path):
    one_line(*run(capsys, "rm", "train", "--out", str(tmp_path / "rm")), "no base model", "--base")
    one_line(*run(capsys, "dpo", "--base", "x", "--dpo.beta=0"), "dpo.beta=0.0 must be > 0")
    one_line(*run(capsys, "dpo", "--base", "x", "--dpo.loss=ipo", "--dpo.label_smoothing=0.1"), "sigmoid loss only")
    one_line(*run(capsys, "rm", "train", "--base", "x", "--model.n_layer=2"), "not a setting this verb reads")
    one_line(*run(capsys, "cai", "--base", str(tmp_path / "missing"), "--out", str(tmp_path / "cai")), "missing")
    one_line(*run(capsys, "rm", "score", "--ckpt", str(tmp_path / "rm")), "needs --ckpt, --prompt")
    policy = make_checkpoint(tmp_path / "policy")
    one_line(*run(capsys, "rm", "score", "--ckpt", str(policy), "--prompt", "a", "--response", "b"),
             "holds a language model", "not a reward model")
