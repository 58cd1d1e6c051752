"""NT-Xent, the SimCLR contrastive loss (spec/acl-air.md section 4).

For views z1, z2 [N, d] (row k of each is a positive pair): rows are L2-normalised, the 2N x 2N
logits are cosine similarities / t, each of the 2N anchors has its other view as the positive and
the 2N - 2 other rows as negatives (itself excluded), and the loss is the mean cross-entropy over
the 2N anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastacl.ops._checks import check_embeddings, check_temperature


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """The plain formulation: materialises the 2N x 2N similarity matrix. The oracle for tests."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positives)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.5,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """NT-Xent of two views; a 0-d tensor, differentiable in z1 and z2."""
    check_embeddings("nt_xent", z1=z1, z2=z2)
    temperature = check_temperature("nt_xent", temperature)
    if gather_distributed:
        raise NotImplementedError("nt_xent(gather_distributed=True) arrives with DDP support")
    return nt_xent_reference(z1, z2, temperature)
