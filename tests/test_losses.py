import pytest
import torch

from fastacl.losses import ACLLoss, ACLLossResult, NTXentLoss
from fastacl.ops.nt_xent import nt_xent_reference
from fastacl.ops.sir_air import air_reference, sir_reference
from tests.conftest import relative_error


def _views(n=8, d=6):
    """z1, z2, z_orig, z1_adv, z2_adv as float64 leaves."""
    return [torch.randn(n, d, dtype=torch.float64, requires_grad=True) for _ in range(5)]


def test_ntxent_loss_is_nt_xent():
    z1, z2 = _views()[:2]
    loss_fn = NTXentLoss(temperature=0.2)
    assert isinstance(loss_fn, torch.nn.Module)
    loss = loss_fn(z1, z2)
    expected = nt_xent_reference(z1, z2, 0.2)
    assert relative_error(loss, expected) <= 1e-6
    grads = torch.autograd.grad(2 * loss, (z1, z2))
    expected_grads = torch.autograd.grad(2 * expected, (z1, z2))
    assert max(relative_error(g, e) for g, e in zip(grads, expected_grads, strict=True)) <= 1e-6


def test_ntxent_loss_takes_only_the_temperature_by_position():
    """lightly's second positional argument is memory_bank_size; here it must not silently
    become gather_distributed."""
    assert NTXentLoss(0.3).temperature == 0.3
    with pytest.raises(TypeError):
        NTXentLoss(0.5, 4096)
    assert NTXentLoss(0.5, gather_distributed=True).gather_distributed is True


def test_ntxent_loss_rejects_a_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        NTXentLoss(temperature=0.0)


@pytest.mark.parametrize("form", ["exact", "reference-code"])
@pytest.mark.parametrize(
    "weight_w, lambda1, lambda2",
    [(0.0, 0.0, 0.0), (0.3, 0.0, 0.0), (0.0, 0.5, 0.5), (0.6, 0.5, 0.5), (0.1, 0.0, 1.5)],
)
def test_acl_loss_is_the_spec_combination_of_reference_terms(weight_w, lambda1, lambda2, form):
    views = _views()
    z1, z2, z_orig, z1_adv, z2_adv = views
    t = 0.5
    result = ACLLoss(weight_w, lambda1, lambda2, temperature=t, form=form)(*views)
    natural = nt_xent_reference(z1, z2, t)
    adversarial = nt_xent_reference(z1_adv, z2_adv, t)
    sir = sir_reference(z1, z2, z_orig, t, form)
    air = air_reference(z1, z2, z_orig, z1_adv, z2_adv, t, form)
    # docs/acl-air.md section 5, not halved; a term whose lambda is 0 is not computed (z_orig
    # gets no grad).
    expected = (1 - weight_w) * natural + (1 + weight_w) * adversarial
    if lambda1:
        expected = expected + lambda1 * sir
    if lambda2:
        expected = expected + lambda2 * air

    assert isinstance(result, ACLLossResult)
    assert relative_error(result.total, expected) <= 1e-6
    assert relative_error(result.natural, natural) <= 1e-6
    assert relative_error(result.adversarial, adversarial) <= 1e-6
    assert (result.sir is None) == (lambda1 == 0) and (result.air is None) == (lambda2 == 0)
    if lambda1:
        assert relative_error(result.sir, sir) <= 1e-6
    if lambda2:
        assert relative_error(result.air, air) <= 1e-6
    terms = [result.natural, result.adversarial, result.sir, result.air]
    assert all(term is None or not term.requires_grad for term in terms)

    grads = torch.autograd.grad(3 * result.total, views, allow_unused=True)
    expected_grads = torch.autograd.grad(3 * expected, views, allow_unused=True)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert (grad is None) == (expected_grad is None)
        if grad is not None:
            assert relative_error(grad, expected_grad) <= 1e-6


def test_acl_loss_without_regularisers_takes_no_originals():
    z1, z2, _, z1_adv, z2_adv = _views()
    result = ACLLoss()(z1, z2, None, z1_adv, z2_adv)
    assert result.sir is None and result.air is None
    with pytest.raises(ValueError, match="z_orig .* is needed when lambda1 or lambda2 > 0"):
        ACLLoss(lambda2=0.5)(z1, z2, None, z1_adv, z2_adv)


def test_acl_loss_weight_w_can_change_per_epoch_and_is_validated():
    views = _views()
    loss_fn = ACLLoss()
    natural, adversarial = loss_fn(*views)[1:3]
    loss_fn.weight_w = 0.5  # DynACL's w(e) for a later epoch
    torch.testing.assert_close(loss_fn(*views).total, 0.5 * natural + 1.5 * adversarial)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"weight_w must be in \[0.0, 1.0\)"):
            loss_fn.weight_w = bad
    assert loss_fn.weight_w == 0.5


def test_acl_loss_validates_its_arguments():
    with pytest.raises(ValueError, match=r"weight_w must be in \[0.0, 1.0\), got 1.5"):
        ACLLoss(weight_w=1.5)
    with pytest.raises(ValueError, match="lambda1 must be >= 0.0, got -0.5"):
        ACLLoss(lambda1=-0.5)
    with pytest.raises(ValueError, match="lambda2 must be >= 0.0, got -1.0"):
        ACLLoss(lambda2=-1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ACLLoss(temperature=-1)
    with pytest.raises(ValueError, match="unknown form 'paper'"):
        ACLLoss(form="paper")
