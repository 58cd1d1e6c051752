"""benchmarks/attack_strength.py (the gradient-masking check) runs on a real run's checkpoint:
it always includes the run's own attack, and every attack raises the contrastive loss."""

import pytest

import fastacl
from benchmarks.attack_strength import main, parse_attacks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_attacks():
    assert parse_attacks("5x0.05,20x0.0125") == [(5, 0.05), (20, 0.0125)]


def test_attack_strength_on_a_tiny_run(tmp_path, capsys):
    fastacl.train(out_dir=str(tmp_path / "run"), max_train=40, batch_size=16, attack_steps=1,
                  epochs=1, evaluate=False)
    result = main(["--checkpoint", str(tmp_path / "run"), "--batch-size", "8", "--seeds", "2",
                   "--attacks", "3x0.05"])
    assert set(result["attacked"]) == {(1, 0.05), (3, 0.05)}  # the run's own attack first
    for losses in result["attacked"].values():
        assert len(losses) == 2 and all(value > result["clean"] for value in losses)
    assert "| 1 x 0.05 (the run's) |" in capsys.readouterr().out


def test_a_checkpoint_without_a_training_run_is_refused(tmp_path):
    from fastacl.models import save_checkpoint
    from tests.models.test_backbones import tiny_model

    path = save_checkpoint(tmp_path / "bare.pt", tiny_model("resnet18", 1, 28))
    with pytest.raises(SystemExit, match="not a fastacl training checkpoint"):
        main(["--checkpoint", str(path)])
