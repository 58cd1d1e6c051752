"""fastacl.ops: functional, autograd-capable ops with Triton / C++ / PyTorch paths.

See fastacl/ops/_dispatch.py for how a path is chosen (FASTACL_BACKEND, use_backend).
"""

from fastacl.ops._dispatch import BACKENDS, requested_backend, use_backend
from fastacl.ops._extension import extension_status
from fastacl.ops.nt_xent import nt_xent
from fastacl.ops.pgd_step import pgd_step_
from fastacl.ops.rcs import greedy_pick, rcs_project
from fastacl.ops.sir_air import air, sir

__all__ = [
    "BACKENDS",
    "air",
    "extension_status",
    "greedy_pick",
    "nt_xent",
    "pgd_step_",
    "rcs_project",
    "requested_backend",
    "sir",
    "use_backend",
]
