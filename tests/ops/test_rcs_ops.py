"""fastacl.ops.rcs_project and greedy_pick: both paths (the C++ extension, the PyTorch reference)
against the definitions of docs/rcs.md sections 2-3 written out per row in float64, against
explicit per-sample gradients of a head, and against a reference loop for the greedy pick."""

import pytest
import torch
import torch.nn.functional as F

from fastacl import ops
from fastacl.ops import rcs
from fastacl.ops.nt_xent import nt_xent_reference
from tests.conftest import relative_error

BACKENDS = ("cpp", "torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Odd widths on purpose (no SIMD-friendly sizes); (in, out) per layer.
LAYERS = [(13, 7), (7, 5), (5, 11)]
# Both paths accumulate in fp32; the definitions are evaluated in float64 on the same (rounded)
# values, so the only error left is fp32 accumulation.
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core CPU
    yield
    torch.set_num_threads(threads)


def make_layers(n, layers=LAYERS, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(n, i, generator=generator).to(dtype) for i, _ in layers]
    grad_outputs = [torch.randn(n, o, generator=generator).to(dtype) for _, o in layers]
    return inputs, grad_outputs


def make_projections(layers=LAYERS, k1=3, k2=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(k1, o, generator=generator) / k1**0.5,
         torch.randn(k2, i, generator=generator) / k2**0.5)
        for i, o in layers
    ]


def definition(inputs, grad_outputs, mode, bias, projections=None, segment_ids=None,
               num_segments=None):
    """docs/rcs.md section 2 written out row by row in float64 (the oracle)."""
    n = inputs[0].shape[0]
    rows = []
    for i in range(n):
        blocks = []
        for layer, (h, delta) in enumerate(zip(inputs, grad_outputs, strict=True)):
            h_i, delta_i = h[i].double(), delta[i].double()
            out = delta_i.shape[0]
            if mode == "rowmean":
                blocks.append(delta_i.sum() / out * h_i)
                if bias[layer]:
                    blocks.append((delta_i.sum() / out).view(1))
            else:
                p, q = (t.double() for t in projections[layer])
                blocks.append(torch.outer(p @ delta_i, q @ h_i).flatten())
                if bias[layer]:
                    blocks.append(p @ delta_i)
        rows.append(torch.cat(blocks))
    rows = torch.stack(rows)
    if segment_ids is None:
        return rows
    summed = torch.zeros(num_segments, rows.shape[1], dtype=torch.float64)
    for i in range(n):
        summed[segment_ids[i]] += rows[i]
    return summed


# --------------------------------------------------------------------------------------------
# rcs_project against the definitions


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode, bias", [("rowmean", (False, False, False)),
                                        ("rowmean", (True, False, True)),
                                        ("kronecker", (False, False, False)),
                                        ("kronecker", (True, False, True))])
@pytest.mark.parametrize("segmented", [False, True], ids=["rows", "segments"])
def test_rcs_project_matches_definition(backend, dtype, mode, bias, segmented):
    n = 37
    inputs, grad_outputs = make_layers(n, dtype=DTYPES[dtype])
    projections = make_projections() if mode == "kronecker" else None
    # Unsorted ids with an empty segment (5) and one of a single row.
    segment_ids = torch.tensor([i % 4 if i < 36 else 6 for i in range(n)]) if segmented else None
    num_segments = 7 if segmented else None
    with ops.use_backend(backend):
        got = ops.rcs_project(inputs, grad_outputs, mode, list(bias), projections, segment_ids,
                              num_segments)
    expected = definition(inputs, grad_outputs, mode, bias, projections, segment_ids, num_segments)
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    assert relative_error(got, expected) < TOLERANCE
    if segmented:
        assert torch.all(got[5] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resnet18_head_width_is_1537(backend):
    inputs, grad_outputs = make_layers(3, layers=[(512, 512)] * 3)
    with ops.use_backend(backend):
        out = ops.rcs_project(inputs, grad_outputs, bias=[True, False, False])
    assert out.shape == (3, 512 + 1 + 512 + 512)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rowmean_is_kronecker_with_mean_and_identity(backend):
    inputs, grad_outputs = make_layers(9)
    projections = [(torch.full((1, o), 1.0 / o), torch.eye(i)) for i, o in LAYERS]
    bias = [True, True, False]
    with ops.use_backend(backend):
        rowmean = ops.rcs_project(inputs, grad_outputs, "rowmean", bias)
        kronecker = ops.rcs_project(inputs, grad_outputs, "kronecker", bias, projections)
    assert relative_error(rowmean, kronecker) < TOLERANCE


def test_segment_count_defaults_to_largest_id_plus_one():
    inputs, grad_outputs = make_layers(6)
    out = ops.rcs_project(inputs, grad_outputs, segment_ids=torch.tensor([2, 2, 0, 0, 2, 0]))
    assert out.shape[0] == 3 and torch.all(out[1] == 0)


def test_float64_runs_the_reference_in_float64():
    inputs, grad_outputs = make_layers(5, dtype=torch.float64)
    with ops.use_backend("cpp"):
        out = ops.rcs_project(inputs, grad_outputs, bias=[True, False, True])
    assert out.dtype == torch.float64
    expected = definition(inputs, grad_outputs, "rowmean", [True, False, True])
    assert relative_error(out, expected) < 1e-12


def test_empty_batch():
    inputs, grad_outputs = make_layers(0)
    for backend in BACKENDS:
        with ops.use_backend(backend):
            assert ops.rcs_project(inputs, grad_outputs).shape == (0, 25)
            no_ids = torch.zeros(0, dtype=torch.long)
            out = ops.rcs_project(inputs, grad_outputs, segment_ids=no_ids, num_segments=2)
            assert out.shape == (2, 25) and torch.all(out == 0)


# --------------------------------------------------------------------------------------------
# rcs_project against explicit per-sample gradients of a head under a coupled (NT-Xent) loss


class Head(torch.nn.Module):
    """Three Linear layers as the ResNet-18 head (fc1 with bias, fc2 / fc3 without), small."""

    def __init__(self, sizes=(12, 10, 9, 6)):
        super().__init__()
        self.fc1 = torch.nn.Linear(sizes[0], sizes[1], bias=True)
        self.fc2 = torch.nn.Linear(sizes[1], sizes[2], bias=False)
        self.fc3 = torch.nn.Linear(sizes[2], sizes[3], bias=False)
        self.layers = [self.fc1, self.fc2, self.fc3]

    def forward(self, h, per_row_weights=None):
        """With per_row_weights [(W [n, out, in], b [n, out] | None)], row i uses its own copy,
        so the gradient of copy i is exactly row i's contribution (an explicit per-row gradient)."""
        for index, layer in enumerate(self.layers):
            if per_row_weights is None:
                h = layer(h)
            else:
                weight, bias = per_row_weights[index]
                h = torch.einsum("noi,ni->no", weight, h) + (0 if bias is None else bias)
            if index < 2:
                h = F.relu(h)
        return h


def acl_loss(z, batch):
    """ACL's loss on rows [view1 natural, view2 natural, view1 adv, view2 adv], B rows each."""
    z1, z2, z1_adv, z2_adv = z.split(batch)
    return 0.5 * (nt_xent_reference(z1, z2) + nt_xent_reference(z1_adv, z2_adv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["rowmean", "kronecker"])
def test_rcs_project_is_the_projected_per_sample_gradient(backend, mode):
    batch = 5
    torch.manual_seed(3)
    head = Head().double()
    features = torch.randn(4 * batch, 12, dtype=torch.float64)
    sample_ids = torch.arange(batch).repeat(4)  # a sample's 4 rows

    # Explicit: per-row weight copies; a sample's gradient is the sum over its rows, times B.
    copies = [
        (layer.weight.detach().expand(4 * batch, -1, -1).clone().requires_grad_(),
         None if layer.bias is None
         else layer.bias.detach().expand(4 * batch, -1).clone().requires_grad_())
        for layer in head.layers
    ]
    acl_loss(head(features, copies), batch).backward()
    per_sample = [
        (batch * torch.zeros(batch, *w.shape[1:], dtype=torch.float64).index_add_(0, sample_ids,
                                                                                  w.grad),
         None if b is None
         else batch * torch.zeros(batch, b.shape[1], dtype=torch.float64).index_add_(
             0, sample_ids, b.grad))
        for w, b in copies
    ]

    # What fastacl caches: H and Delta per layer (hooks), then the op on them.
    cache = {}

    def keep(index):
        def hook(module, args, output):
            cache[("H", index)] = args[0].detach()
            output.register_hook(lambda grad: cache.__setitem__(("Delta", index), grad))

        return hook

    handles = [layer.register_forward_hook(keep(index)) for index, layer in enumerate(head.layers)]
    acl_loss(head(features), batch).backward()
    for handle in handles:
        handle.remove()
    inputs = [cache[("H", index)].float() for index in range(3)]
    # Scaling Delta by B puts every sample's gradient on the scale of a one-sample loss.
    grad_outputs = [(batch * cache[("Delta", index)]).float() for index in range(3)]
    bias = [layer.bias is not None for layer in head.layers]
    sizes = [(layer.in_features, layer.out_features) for layer in head.layers]
    projections = make_projections(sizes, k1=2, k2=3) if mode == "kronecker" else None

    with ops.use_backend(backend):
        got = ops.rcs_project(inputs, grad_outputs, mode, bias, projections,
                              segment_ids=sample_ids, num_segments=batch)

    expected_blocks = []
    for index, (weight_grad, bias_grad) in enumerate(per_sample):
        if mode == "rowmean":  # the mean over output units of each per-sample gradient
            expected_blocks.append(weight_grad.mean(dim=1))
            if bias_grad is not None:
                expected_blocks.append(bias_grad.mean(dim=1, keepdim=True))
        else:  # P G Q^T, and P g for the bias
            p, q = (t.double() for t in projections[index])
            expected_blocks.append((p @ weight_grad @ q.T).flatten(1))
            if bias_grad is not None:
                expected_blocks.append(bias_grad @ p.T)
    expected = torch.cat(expected_blocks, dim=1)
    assert got.shape == expected.shape
    assert relative_error(got, expected) < TOLERANCE


# --------------------------------------------------------------------------------------------
# greedy_pick against a reference loop


def reference_pick(R, v, taken):
    """The definition as a loop: largest R[i] . v over untaken rows, first index on ties."""
    best, best_score = -1, None
    for i in range(R.shape[0]):
        if taken[i]:
            continue
        score = float(R[i].double() @ v.double())
        if best < 0 or score > best_score:
            best, best_score = i, score
    if best >= 0:
        taken[best] = True
    return best


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_greedy_pick_matches_reference_loop(backend, dtype):
    N, D, picks = 203, 67, 60
    generator = torch.Generator().manual_seed(0)
    R = torch.randn(N, D, generator=generator).to(DTYPES[dtype])
    v = torch.randn(D, generator=generator)
    taken = torch.zeros(N, dtype=torch.bool)
    taken[::7] = True  # some rows start taken
    expected_taken = taken.clone()
    with ops.use_backend(backend):
        for _ in range(picks):
            expected = reference_pick(R, v, expected_taken)
            got = ops.greedy_pick(R, v, taken)
            assert got.dtype == torch.int64 and got.dim() == 0
            assert int(got) == expected
            assert torch.equal(taken, expected_taken)
            v = torch.tanh(1.5 * v + 0.1 * R[expected].float())  # the v refresh after a pick


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [1, 2, 3, 5, 9])
def test_greedy_pick_tiny_pools_until_exhausted(backend, N):
    R, v = torch.randn(N, 6), torch.randn(6)
    taken, expected_taken = torch.zeros(N, dtype=torch.bool), torch.zeros(N, dtype=torch.bool)
    with ops.use_backend(backend):
        for _ in range(N + 1):
            assert int(ops.greedy_pick(R, v, taken)) == reference_pick(R, v, expected_taken)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_pick_ties_go_to_the_lowest_index(backend):
    R = torch.randn(40, 17)
    R[[9, 23, 31]] = torch.full((17,), 3.0)  # three equal best rows
    v = torch.ones(17)
    taken = torch.zeros(40, dtype=torch.bool)
    with ops.use_backend(backend):
        assert [int(ops.greedy_pick(R, v, taken)) for _ in range(3)] == [9, 23, 31]


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_pick_when_everything_is_taken_or_minus_infinity(backend):
    R = torch.full((6, 3), float("-inf"))
    R[:, 1] = 1.0
    v = torch.tensor([1.0, 0.0, 0.0])  # every score is -inf
    taken = torch.tensor([True, True, False, True, False, False])
    with ops.use_backend(backend):
        assert int(ops.greedy_pick(R, v, taken)) == 2
        assert int(ops.greedy_pick(R, v, taken)) == 4
        assert int(ops.greedy_pick(R, v, taken)) == 5
        before = taken.clone()
        assert int(ops.greedy_pick(R, v, taken)) == -1
    assert torch.equal(taken, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_pick_nan_ranks_first_and_strided_inputs(backend):
    big = torch.randn(50, 30)
    R = big[::2, 3:20]  # strided rows, a column slice
    R[7, 0] = float("nan")
    v = torch.randn(17)
    taken = torch.zeros(50, dtype=torch.bool)[::2]  # a strided mask, updated in place
    with ops.use_backend(backend):
        assert int(ops.greedy_pick(R, v, taken)) == 7
        second = int(ops.greedy_pick(R, v, taken))
    scores = R.double() @ v.double()
    scores[7] = float("-inf")
    assert second == int(scores.argmax())
    assert taken[7] and taken[second] and int(taken.sum()) == 2


# --------------------------------------------------------------------------------------------
# Which path runs; registration


def test_the_extension_is_what_runs(monkeypatch):
    status = ops.extension_status()
    assert status["state"] in ("built", "jit"), status["detail"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("the reference ran instead of the extension")

    monkeypatch.setattr(rcs, "rcs_project_reference", must_not_run)
    monkeypatch.setattr(rcs, "greedy_pick_reference", must_not_run)
    inputs, grad_outputs = make_layers(4)
    ops.rcs_project(inputs, grad_outputs)  # auto
    ops.greedy_pick(torch.randn(4, 3), torch.randn(3), torch.zeros(4, dtype=torch.bool))
    monkeypatch.setenv("FASTACL_BACKEND", "cpp")
    ops.rcs_project(inputs, grad_outputs)


def test_fastacl_backend_torch_runs_the_reference(monkeypatch):
    calls = []
    original = rcs.rcs_project_reference
    monkeypatch.setattr(rcs, "rcs_project_reference",
                        lambda *args: calls.append(1) or original(*args))
    monkeypatch.setenv("FASTACL_BACKEND", "torch")
    inputs, grad_outputs = make_layers(4)
    ops.rcs_project(inputs, grad_outputs)
    assert calls == [1]


def _require_extension():
    if ops.extension_status()["state"] == "unavailable":
        pytest.skip("the C++ extension is not loaded: " + ops.extension_status()["detail"])
    assert rcs._register_fakes()


def test_opcheck_rcs_project():
    _require_extension()
    inputs, grad_outputs = make_layers(6)
    p, q = zip(*make_projections(), strict=True)
    segment_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    for args in [
        (inputs, grad_outputs, "rowmean", [True, False, True], [], [], None, -1),
        ([t.bfloat16() for t in inputs], [t.bfloat16() for t in grad_outputs], "rowmean",
         [False, True, False], [], [], segment_ids, 3),
        (inputs, grad_outputs, "kronecker", [True, False, True], list(p), list(q), segment_ids, 4),
    ]:
        torch.library.opcheck(torch.ops.fastacl.rcs_project.default, args)


def test_opcheck_greedy_pick():
    _require_extension()
    for dtype in DTYPES.values():
        R, v = torch.randn(10, 7).to(dtype), torch.randn(7)
        torch.library.opcheck(torch.ops.fastacl.greedy_pick.default,
                              (R, v, torch.zeros(10, dtype=torch.bool)))


def test_greedy_loop_compiles_without_graph_breaks():
    _require_extension()
    R, v = torch.randn(20, 5), torch.randn(5)
    taken = torch.zeros(20, dtype=torch.bool)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(R, v, taken):
        index = ops.greedy_pick(R, v, taken)
        return index, torch.tanh(v + R.index_select(0, index.view(1))[0])

    expected_taken = taken.clone()
    index, _ = step(R, v, taken)
    assert int(index) == reference_pick(R, v, expected_taken)
    assert torch.equal(taken, expected_taken)


# --------------------------------------------------------------------------------------------
# Checks


@pytest.mark.parametrize("call, match", [
    (lambda i, g: ops.rcs_project(i[0], g[0]), "sequences of tensors"),
    (lambda i, g: ops.rcs_project(i, g[:2]), "3 inputs but 2 grad_outputs"),
    (lambda i, g: ops.rcs_project(i, g, mode="sum"), "unknown mode 'sum'"),
    (lambda i, g: ops.rcs_project(i, g, bias=[True]), "sequence of 3 bools"),
    (lambda i, g: ops.rcs_project(i, g, mode="kronecker"), "needs projections"),
    (lambda i, g: ops.rcs_project(i, g, projections=make_projections()), "takes no projections"),
    (lambda i, g: ops.rcs_project(i, g, "kronecker", projections=make_projections()[::-1]),
     r"projections\[0\] P has shape \(3, 11\): expected \[k, 7\]"),
    (lambda i, g: ops.rcs_project([i[0][:3]] + i[1:], g), r"has 5 rows but inputs\[0\] has 3"),
    (lambda i, g: ops.rcs_project([i[0].long()] + i[1:], g), "must be floating point"),
    (lambda i, g: ops.rcs_project(i, g, segment_ids=torch.tensor([0, 1, 2, 3])),
     "segment_ids must be an int64 tensor of shape"),
    (lambda i, g: ops.rcs_project(i, g, segment_ids=torch.tensor([0, 1, 2, 3, 4]),
                                  num_segments=3), "segment_ids holds 4, outside"),
])
def test_rcs_project_rejects_bad_arguments(call, match):
    inputs, grad_outputs = make_layers(5)
    with pytest.raises(ValueError, match=match):
        call(inputs, grad_outputs)


@pytest.mark.parametrize("R, v, taken, match", [
    (torch.randn(4), torch.randn(4), torch.zeros(4, dtype=torch.bool), "R must be a 2-D"),
    (torch.randn(4, 3), torch.randn(4), torch.zeros(4, dtype=torch.bool), "length D = 3"),
    (torch.randn(4, 3), torch.randn(3), torch.zeros(4), "taken must be a bool vector"),
    (torch.randn(4, 3), torch.randn(3), torch.zeros(3, dtype=torch.bool), "length N = 4"),
])
def test_greedy_pick_rejects_bad_arguments(R, v, taken, match):
    with pytest.raises(ValueError, match=match):
        ops.greedy_pick(R, v, taken)


def test_cpp_kernels_check_their_arguments_too():
    _require_extension()
    inputs, grad_outputs = make_layers(5)
    with pytest.raises(RuntimeError, match="outside \\[0, num_segments = 2\\)"):
        torch.ops.fastacl.rcs_project(inputs, grad_outputs, "rowmean", [False] * 3, [], [],
                                      torch.tensor([0, 1, 2, 0, 1]), 2)
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.fastacl.rcs_project(inputs, grad_outputs, "sum", [False] * 3, [], [], None, -1)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.fastacl.greedy_pick(torch.randn(3, 2).double(), torch.randn(2),
                                      torch.zeros(3, dtype=torch.bool))
