"""Triton kernels of fastacl (installed as fastacl.kernels): @triton.jit functions and their
launchers, nothing else. Autograd, dispatch and registration live in fastacl/ops.

Importing a kernel module compiles nothing; under TRITON_INTERPRET=1 (set before this package is
imported) the kernels run on CPU tensors through Triton's interpreter.
"""
