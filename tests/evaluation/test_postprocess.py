"""fastacl.evaluation.postprocess: k-means and the "++" post-processing."""

import pytest
import torch

from fastacl.evaluation import postprocess
from fastacl.evaluation.protocols import PostProcessSettings
from tests.evaluation.tiny import EPS, tiny_data, tiny_model


def test_kmeans_recovers_separated_clusters_reproducibly():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centres[truth] + 0.5 * torch.randn(60, 2, generator=generator)
    labels, centroids = postprocess.kmeans(x, 3, seed=1)
    # The same partition up to a renaming of the clusters.
    mapping = {int(t): int(lab) for t, lab in zip(truth, labels, strict=True)}
    assert len(set(mapping.values())) == 3
    assert torch.equal(labels, torch.tensor([mapping[int(t)] for t in truth]))
    assert torch.equal(postprocess.kmeans(x, 3, seed=1)[0], labels)
    with pytest.raises(ValueError, match="k <= N"):
        postprocess.kmeans(x[:2], 3)


def test_post_process_fine_tunes_the_backbone_on_pseudo_labels():
    model = tiny_model()
    images, _ = tiny_data(n=16)
    options = PostProcessSettings(probe_epochs=2, epochs=1, milestones=[], batch_size=8,
                                  attack_steps=1)
    processed, info = postprocess.post_process(model, images, 3, EPS, options, seed=0)
    assert sum(info["cluster_sizes"]) == 16 and len(info["cluster_sizes"]) == 3
    assert 0 <= info["probe_agreement"] <= 1 and info["train_images"] == 16
    before, after = model.state_dict(), processed.state_dict()
    assert set(before) == set(after)
    assert not torch.equal(after["backbone.conv1.weight"], before["backbone.conv1.weight"])
    assert torch.equal(after["head.fc1.weight"], before["head.fc1.weight"])
