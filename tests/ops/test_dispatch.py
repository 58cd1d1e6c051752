import pytest
import torch

from fastacl.ops import _dispatch, extension_status, requested_backend, use_backend


def test_env_is_read_at_call_time(monkeypatch):
    assert requested_backend() == "auto"
    monkeypatch.setenv("FASTACL_BACKEND", "torch")
    assert requested_backend() == "torch"
    monkeypatch.setenv("FASTACL_BACKEND", "TRITON")
    assert requested_backend() == "triton"


def test_context_manager_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv("FASTACL_BACKEND", "torch")
    with use_backend("triton"):
        assert requested_backend() == "triton"
        with use_backend("cpp"):
            assert requested_backend() == "cpp"
        assert requested_backend() == "triton"
    assert requested_backend() == "torch"


def test_unknown_backend_is_rejected(monkeypatch):
    expected = "unknown fastacl backend 'cuda'.*auto, triton, cpp, torch"
    with pytest.raises(ValueError, match=expected):
        with use_backend("cuda"):
            pass
    monkeypatch.setenv("FASTACL_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        requested_backend()


def test_select_auto_on_cpu_is_reference_for_triton_ops():
    x = torch.zeros(2)
    assert _dispatch.select("op", x, ("triton",)) == "torch"


def test_forcing_a_path_the_op_lacks_uses_the_reference():
    x = torch.zeros(2)
    with use_backend("cpp"):
        assert _dispatch.select("op", x, ("triton",)) == "torch"


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.select("nt_xent", torch.zeros(2), ("triton",))


def test_forced_triton_on_cpu_with_interpreter_runs_triton():
    # conftest sets TRITON_INTERPRET=1 when there is no GPU
    if torch.cuda.is_available():
        pytest.skip("the interpreter is only enabled on machines without CUDA")
    with use_backend("triton"):
        assert _dispatch.select("nt_xent", torch.zeros(2), ("triton",)) == "triton"


def test_extension_status_says_how_it_was_loaded():
    status = extension_status()
    assert status["state"] in ("built", "jit", "unavailable")
    assert status["detail"]
    # The README's install builds it; CI must exercise the compiled extension, not the fallback.
    assert status["state"] != "unavailable", status["detail"]
    with use_backend("cpp"):
        assert _dispatch.select("rcs_project", torch.zeros(2), ("cpp",)) == "cpp"


def test_extension_abi_op():
    from fastacl.ops._extension import ABI_VERSION

    extension_status()
    assert torch.ops.fastacl.abi_version() == ABI_VERSION
