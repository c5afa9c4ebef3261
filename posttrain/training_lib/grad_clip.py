"""Gradient clipping across parameters that live on different device meshes.

With FSDP2 + tensor parallel, the decoder blocks' projections are DTensors on the 2-D (dp, tp)
mesh while embeddings, norms and the output projection are on the 1-D dp mesh; torch's
clip_grad_norm_ stacks all the norms together and refuses mixed meshes. Here each mesh's norm is
reduced on its own, the results are combined as plain numbers, and every gradient is scaled in
place by the one coefficient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _mesh_key(t: torch.Tensor) -> object:
    mesh = getattr(t, "device_mesh", None)
    return None if mesh is None else (tuple(mesh.mesh.flatten().tolist()), mesh.mesh_dim_names)


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so their global L2 norm is at most `max_norm`; returns the norm before."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(_mesh_key(p.grad), []).append(p.grad)
    squares = 0.0
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        squares += float(norm) ** 2
    total = squares ** 0.5
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        with torch.no_grad():
            for grads in groups.values():
                torch._foreach_mul_(grads, coef)
    return total
