"""`scratchlm sft --resume` continues with the run's own config.json, as `pretrain --resume` does."""

from __future__ import annotations

from scratchlm import cli
from scratchlm.config import Config, get_preset
from scratchlm.sft import train as sft_train


def test_sft_resume_reads_the_runs_config_then_overrides(tmp_path, monkeypatch, capsys):
    """Regression: --resume rebuilt the config from the preset, so a run started with other settings
    (here LoRA r=4, 7 steps, its own base) resumed as a different run."""
    run = tmp_path / "run"
    run.mkdir()
    saved = Config(name="mine", out_dir=str(run))
    saved.sft.base, saved.sft.lora_r, saved.train.max_steps, saved.train.lr = str(tmp_path / "base"), 4, 7, 3e-4
    saved.save(run / "config.json")
    seen = {}

    def fake_sft(cfg, *, progress, resume):
        seen.update(cfg=cfg, resume=resume)

    monkeypatch.setattr(sft_train, "sft", fake_sft)
    assert cli.main(["sft", "--out", str(run), "--resume", "--quiet", "--train.max_steps=9"]) == 0
    cfg = seen["cfg"]
    assert seen["resume"] and cfg.name == "mine" and cfg.out_dir == str(run)
    assert cfg.sft.lora_r == 4 and cfg.sft.base == str(tmp_path / "base") and cfg.train.lr == 3e-4
    assert cfg.train.max_steps == 9  # the override still applies on top
    assert get_preset("sft-tiny").sft.lora_r == 0  # what the old code resumed with instead

    assert cli.main(["sft", "--out", str(tmp_path / "none"), "--resume", "--quiet"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
