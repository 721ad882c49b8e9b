"""Tiny velocity fields, grids and reference (deliberately naive) implementations for the core tests.

Reference implementations here are written for clarity, not speed, and are what the
optimized paths in dopsd_ref are checked against.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from dopsd_ref.conformance.invariants import Evidence, Problem, Subject, gather
from dopsd_ref.conventions import euler_step, x0_from_velocity


class LinearField(nn.Module):
    """v(x, σ) = x·Wᵀ + σ·b + c on flattened x — linear in its parameters and in x."""

    def __init__(self, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.5 * torch.randn(dim, dim, generator=g, dtype=dtype))
        self.b = nn.Parameter(torch.randn(dim, generator=g, dtype=dtype))
        self.c = nn.Parameter(torch.randn(dim, generator=g, dtype=dtype))

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        flat = x.flatten(1)  # [B, D]
        return (flat @ self.w.T + sigma[:, None] * self.b + self.c).reshape(x.shape)


class MLPField(nn.Module):
    """A small nonlinear velocity field on [x, σ]."""

    def __init__(self, dim: int, seed: int, hidden: int = 16, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(dtype)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        flat = torch.cat([x.flatten(1), sigma[:, None].to(x.dtype)], dim=1)
        return self.net(flat).reshape(x.shape)


class CtxField(nn.Module):
    """v(x, σ, c) = MLP([x, σ, c]) with a per-sample context vector c (float64), seeded by ``seed``."""

    def __init__(self, dim: int = 4, ctx: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 1 + ctx, 16), nn.Tanh(), nn.Linear(16, dim)).double()

    def forward(self, x: Tensor, sigma: Tensor, context: Tensor) -> Tensor:
        return self.net(torch.cat([x, sigma[:, None], context], dim=1))  # [B, dim]


def make_field(kind: str, dim: int, seed: int) -> nn.Module:
    return LinearField(dim, seed) if kind == "linear" else MLPField(dim, seed)


@st.composite
def sigma_grids(draw, max_steps: int = 6) -> Tensor:
    """Valid grids: 1 followed by distinct values in (0.02, 0.98), sorted descending."""
    k = draw(st.integers(1, max_steps))
    rest = draw(st.lists(st.floats(0.02, 0.98), min_size=k - 1, max_size=k - 1, unique=True))
    rest = sorted({round(r, 6) for r in rest}, reverse=True)
    return torch.tensor([1.0] + rest, dtype=torch.float64)


# A roll-out case: (field kind, batch, dim, seed).
cases = st.tuples(st.sampled_from(["linear", "mlp"]), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**16))


def reference_rollout(student, teacher, noise: Tensor, sigmas: Tensor, space: str):
    """Naive D-OPSD: per-step losses as a list of graphs, written straight from the notes."""
    nxt = list(sigmas[1:].tolist()) + [0.0]
    x, losses, states = noise, [], [noise]
    for k, s in enumerate(sigmas.tolist()):
        x = x.detach()
        sb = torch.full((x.shape[0],), s, dtype=x.dtype)
        u_s = student(x, sb)
        with torch.no_grad():
            u_t = teacher(x, sb)
        if space == "x0":
            d = x0_from_velocity(x, s, u_s) - x0_from_velocity(x, s, u_t)
        else:
            d = u_s - u_t
        losses.append(d.pow(2).mean())
        x = euler_step(x, u_s.detach(), s, nxt[k])
        states.append(x)
    return torch.stack(losses), torch.stack(states)


def grads(module: nn.Module) -> list[Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


# Float64 tolerances of the conformance invariants on the core problems (relative max-abs
# errors against the naive reference; model time absolute).
CORE_TOLERANCES: dict[str, float] = {
    "loss": 1e-10, "per_step": 1e-10, "states": 1e-10, "final_sample": 1e-10, "gradients": 1e-9, "time": 1e-12,
}


def _expected(build, noise: Tensor, sigmas: Tensor, space: str) -> dict[str, Tensor]:
    """What a correct implementation returns on one problem, from :func:`reference_rollout`."""
    student = build("student", torch.float64, torch.device("cpu"))
    teacher = build("teacher", torch.float64, torch.device("cpu"))
    losses, states = reference_rollout(student, teacher, noise, sigmas, space)
    loss = losses.mean()
    loss.backward()
    out = {"loss": loss.detach(), "per_step": losses.detach(), "states": states.detach(),
           "final_sample": states[-1].detach()}
    for n, g in zip((n for n, _ in student.named_parameters()), grads(student)):
        out[f"grad.{n}"] = g
    return out


def core_problems(case: tuple[str, int, int, int], sigmas: Tensor) -> list[Problem]:
    """The velocity- and x0-space problems of one roll-out case, with reference expectations."""
    kind, batch, dim, seed = case
    noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)

    def build(role: str, dtype: torch.dtype, device: Any) -> nn.Module:
        return make_field(kind, dim, seed if role == "student" else seed + 1).to(device=device, dtype=dtype)

    name = f"{kind}/B{batch}/D{dim}/seed{seed}/K{len(sigmas)}"
    return [Problem(name, space, sigmas, noise, build, _expected(build, noise, sigmas, space))
            for space in ("velocity", "x0")]


def core_evidence(impl: Any, convention: str, case: tuple[str, int, int, int], sigmas: Tensor) -> Evidence:
    """Run an implementation (kit adapter signature) on one case in both spaces, in float64."""
    problems = core_problems(case, sigmas)
    return gather(Subject(impl, convention, torch.float64), problems, problems[1], CORE_TOLERANCES)
