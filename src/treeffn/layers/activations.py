"""Node and MLP nonlinearities: defined in :mod:`treeffn.ops.activations` (shared with the kernels)."""

from ..ops.activations import ACT_CODE, ACTIVATIONS, activation_fn, activation_grad  # noqa: F401
