"""No host synchronisation in the training loop's steady state: nothing a step produces is read
back to the host (Tensor.item / __float__ / __int__ / __bool__ / tolist) between the loop's
displays. On a GPU each such read stalls the launch queue and defeats CUDA-graph capture; on the
CPU the same calls are counted, so the test runs here."""

import pytest
import torch

import fastacl
from fastacl import coreset
from fastacl.data import DeviceDataset
from fastacl.models import build_model
from fastacl.ops import rcs as rcs_ops
from fastacl.pretrain import loop

READS = ("item", "__float__", "__int__", "__bool__", "tolist")


def _count_reads(monkeypatch) -> tuple[list[bool], list[str]]:
    """Patch the read-back methods of torch.Tensor; they are recorded while the flag is on."""
    counting, reads = [False], []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if counting[0]:
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counting, reads


@pytest.mark.slow
@pytest.mark.parametrize("method", ["acl-air", "cl"])
def test_steady_state_steps_read_nothing_back(method, monkeypatch, tmp_path):
    counting, reads = _count_reads(monkeypatch)
    real_views = loop.rank_views

    def views(*args):  # the augmentation's parameters are drawn on the host: not a read-back
        was, counting[0] = counting[0], False
        try:
            return real_views(*args)
        finally:
            counting[0] = was

    monkeypatch.setattr(loop, "rank_views", views)

    def on_step(epoch, step, terms):
        # Count from the end of step 2 to the end of step 7 (steady state, no display: the
        # loss is shown every 20 steps and at the end of the epoch's 9).
        counting[0] = 2 <= step < 7
        return step >= 7

    fastacl.train(out_dir=str(tmp_path / "run"), method=method, epochs=1, max_train=80,
                  batch_size=8, attack_steps=1, evaluate=False, on_step=on_step)
    assert reads == [], f"{len(reads)} read-backs in 5 steps: {sorted(set(reads))}"


def test_the_rcs_greedy_loop_reads_its_picks_back_once(monkeypatch):
    """Sample granularity (every element one image): 11 picks, each with a simulated step and
    a refresh of v, and one read-back of the picks when the round ends."""
    counting, reads = _count_reads(monkeypatch)
    real_greedy = coreset._greedy

    def greedy(*args, **kwargs):
        counting[0] = True
        try:
            return real_greedy(*args, **kwargs)
        finally:
            counting[0] = False

    monkeypatch.setattr(coreset, "_greedy", greedy)
    # rcs_project checks segment ids on the host for CPU tensors only ("free on the CPU"; for
    # CUDA tensors the check is skipped): not counted here.
    real_check = rcs_ops._check_segments

    def check_segments(*args, **kwargs):
        was, counting[0] = counting[0], False
        try:
            return real_check(*args, **kwargs)
        finally:
            counting[0] = was

    monkeypatch.setattr(rcs_ops, "_check_segments", check_segments)
    torch.manual_seed(0)
    images = (torch.rand(44, 1, 12, 12) * 255).to(torch.uint8)
    model = build_model("resnet18-small", width=4, head_dim=16, in_channels=1)
    pool, validation = coreset.validation_split(44, 0.1, seed=0)
    selection = coreset.select_coreset(
        model, DeviceDataset(images), pool, validation, 0.3, batch_size=8, eps=0.1,
        step_size=0.05, attack_steps=1, granularity="sample", refresh="cached",
        refresh_every=4, progress=False)
    assert len(selection.picks) == 11  # round(0.3 x 36): U holds 8 of the 44 images
    assert reads == ["tolist"], reads
