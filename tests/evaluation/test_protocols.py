"""fastacl.evaluation.protocols: the published hyper-parameter table and the seeds."""

import pytest
import torch

from fastacl.errors import ConfigError
from fastacl.evaluation import protocols


def test_published_hyper_parameter_table():
    s = protocols.finetune_settings("slf", "acl-air", "cifar10")
    assert (s.epochs, s.batch_size, s.lr, s.milestones) == (25, 512, 0.005, [10, 20])
    assert protocols.finetune_settings("alf", "acl-air", "cifar10").lr == 0.01
    assert protocols.finetune_settings("slf", "acl", "cifar100").lr == 0.05
    assert protocols.finetune_settings("alf", "dynacl-air", "cifar100").lr == 0.1
    assert protocols.finetune_settings("slf", "acl-air", "stl10").lr == 0.01
    aff = protocols.finetune_settings("aff", "acl", "cifar10")
    assert (aff.epochs, aff.batch_size, aff.lr, aff.milestones) == (100, 128, 0.1, [40, 60])
    aff = protocols.finetune_settings("aff", "dynacl-air++", "cifar10")
    assert (aff.epochs, aff.milestones, aff.beta, aff.train_attack_steps) == (25, [15, 20], 6, 10)
    assert (aff.crop_padding, aff.flip) == (4, True)
    cl = protocols.finetune_settings("slf", "cl", "cifar10")
    assert cl.lr == 0.01 and "ACL's" in cl.source
    short = protocols.finetune_settings("slf", "acl", "cifar10", epochs=5)
    assert (short.epochs, short.milestones) == (5, [2, 4])
    demo = protocols.finetune_settings("alf", "acl", "mnist5k", "demo")
    assert (demo.crop_padding, demo.flip) == (2, False) and demo.epochs < 25
    with pytest.raises(ConfigError, match="epochs must be >= 1, got 0"):
        protocols.finetune_settings("slf", "acl", "cifar10", epochs=0)
    with pytest.raises(ConfigError, match="preset must be one of demo, paper, got 'fast'"):
        protocols.post_process_settings("fast")


def test_seeds_are_the_published_results_seeds():
    # Changing any of these changes every recorded evaluation number.
    assert [protocols.mode_seed(3, m) for m in ("slf", "alf", "aff", "post-process")] == [
        310, 320, 330, 340]
    base = protocols.mode_seed(0, "alf")
    assert [protocols.draw_seed(base, d) for d in ("data", "train attack", "test attack")] == [
        20, 21, 22]
    state = torch.get_rng_state()
    with protocols.seeded(3, "aff", torch.device("cpu")) as seed:
        assert seed == 330
        inside = torch.rand(3)
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(330)))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG comes back


def test_subsets_are_fixed_sorted_and_cover_everything_when_large():
    subset = protocols.subset_indices(100, 10)
    assert torch.equal(subset, protocols.subset_indices(100, 10))
    assert torch.equal(subset, subset.sort().values) and subset.unique().numel() == 10
    assert torch.equal(protocols.subset_indices(5, None), torch.arange(5))
    assert torch.equal(protocols.subset_indices(5, 9), torch.arange(5))
