"""The minilora command end to end (in-process)."""
import pytest

from minilora import cli, train

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4"]


@pytest.mark.parametrize("command", ["gradcheck", "bench", "pretrain", "sample", "eval"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: minilora " + command in capsys.readouterr().out


def test_pretrain_sample_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["pretrain", "--out", str(out), "--steps", "6", "--warmup-steps", "2", "--eval-every", "3",
                     "--checkpoint-every", "3", "--quiet", "--export-to", str(tmp_path / "export"), *TINY])
    assert code == 0
    text = capsys.readouterr().out
    assert "bits/char" in text and "python-email" in text
    assert (out / train.CHECKPOINT_NAME).is_file() and (tmp_path / "export" / "tiny_gpt.safetensors").is_file()
    _, meta = train.load_checkpoint(out / train.CHECKPOINT_NAME)
    assert meta["step"] == 6 and [s for s, _ in meta["history"]["val"]] == [3, 6]

    assert cli.main(["sample", "--checkpoint", str(out / "tiny_gpt.safetensors"), "--prompt", "def ",
                     "--max-new-tokens", "20", "--seed", "1"]) == 0
    sample = capsys.readouterr().out
    assert sample.startswith("def ") and len(sample.rstrip("\n")) == 24

    assert cli.main(["eval", "--checkpoint", str(out / train.CHECKPOINT_NAME), "--corpus", "python-email",
                     "--max-batches", "2"]) == 0
    assert "bits/char" in capsys.readouterr().out


def test_resume_through_the_cli(tmp_path, capsys):
    args = ["pretrain", "--out", str(tmp_path), "--steps", "4", "--warmup-steps", "1", "--eval-every", "0",
            "--checkpoint-every", "2", "--downstream", "", "--quiet", *TINY]
    assert cli.main(args) == 0
    assert cli.main(args + ["--resume"]) == 0     # already at the last step: nothing left to do, still fine


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:       # refused by the parser, before any work
        cli.main(["pretrain", "--out", str(tmp_path), "--corpus", "nope", "--quiet"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
