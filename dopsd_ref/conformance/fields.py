"""The tiny σ-convention velocity fields the golden vectors are computed on.

Both fields map a state ``x [B, C, H, W]`` and a noise level ``σ [B]`` to a velocity of
the same shape, with a context vector ``c`` baked in as a buffer (the student's text-only
context, or the teacher's text + image context). Flattening ``x`` to ``[B, D]``:

    linear:  v = x·Aᵀ + σ·a + c·Uᵀ + b
    mlp:     h = tanh(x·W1ᵀ + σ·w_sigma + c·Wcᵀ + b1),   v = h·W2ᵀ + b2

Weights and noise come from a 64-bit linear congruential generator evaluated in Python
integers, so they are bit-identical on every platform and torch version (torch's RNG is not
promised to be). The teacher is a different network than the student: its weights are the
student's plus a fixed perturbation (as an EMA teacher lags its student) and its context
differs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "FieldKind",
    "DATA_SHAPE",
    "CONTEXT_DIM",
    "HIDDEN_DIM",
    "LinearField",
    "MLPField",
    "build_field",
    "lcg_normal",
    "make_field_tensors",
    "make_noise",
    "param_names",
]

FieldKind = Literal["linear", "mlp"]

DATA_SHAPE: tuple[int, int, int, int] = (3, 4, 2, 2)  # [B, C, H, W]; D = C·H·W = 16
CONTEXT_DIM = 4
HIDDEN_DIM = 32
_D = DATA_SHAPE[1] * DATA_SHAPE[2] * DATA_SHAPE[3]


def lcg_normal(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> Tensor:
    """Approximately N(0, scale²) float64 values from a platform-independent generator.

    Each value is ``scale·√3·(u1 + u2 + u3 + u4 − 2)`` with ``u_i`` the top 53 bits of a
    64-bit LCG (Knuth's MMIX constants), i.e. an Irwin–Hall(4) variable with unit variance.
    """
    n = math.prod(shape)
    state = (seed * 0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D) % (1 << 64)
    vals: list[float] = []
    root3 = math.sqrt(3.0)
    for _ in range(n):
        acc = 0.0
        for _ in range(4):
            state = (6364136223846793005 * state + 1442695040888963407) % (1 << 64)
            acc += (state >> 11) / float(1 << 53)
        vals.append(scale * root3 * (acc - 2.0))
    return torch.tensor(vals, dtype=torch.float64).reshape(shape)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


class LinearField(nn.Module):
    """``v = x·Aᵀ + σ·a + c·Uᵀ + b`` on flattened states (see module docstring)."""

    def __init__(self, A: Tensor, a: Tensor, b: Tensor, U: Tensor, ctx: Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A.clone())  # [D, D]
        self.a = nn.Parameter(a.clone())  # [D]
        self.b = nn.Parameter(b.clone())  # [D]
        self.U = nn.Parameter(U.clone())  # [D, Dc]
        self.register_buffer("ctx", ctx.clone())  # [Dc]

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        xf = _flat(x)  # [B, D]
        v = xf @ self.A.T + sigma.reshape(-1, 1) * self.a + self.ctx @ self.U.T + self.b
        return v.reshape(x.shape)


class MLPField(nn.Module):
    """``v = W2·tanh(W1·x + σ·w_sigma + Wc·c + b1) + b2`` on flattened states."""

    def __init__(
        self, W1: Tensor, w_sigma: Tensor, Wc: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, ctx: Tensor
    ) -> None:
        super().__init__()
        self.W1 = nn.Parameter(W1.clone())  # [H, D]
        self.w_sigma = nn.Parameter(w_sigma.clone())  # [H]
        self.Wc = nn.Parameter(Wc.clone())  # [H, Dc]
        self.b1 = nn.Parameter(b1.clone())  # [H]
        self.W2 = nn.Parameter(W2.clone())  # [D, H]
        self.b2 = nn.Parameter(b2.clone())  # [D]
        self.register_buffer("ctx", ctx.clone())  # [Dc]

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        xf = _flat(x)  # [B, D]
        pre = xf @ self.W1.T + sigma.reshape(-1, 1) * self.w_sigma + self.ctx @ self.Wc.T + self.b1
        v = torch.tanh(pre) @ self.W2.T + self.b2  # [B, D]
        return v.reshape(x.shape)


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "linear": {"A": (_D, _D), "a": (_D,), "b": (_D,), "U": (_D, CONTEXT_DIM)},
    "mlp": {
        "W1": (HIDDEN_DIM, _D),
        "w_sigma": (HIDDEN_DIM,),
        "Wc": (HIDDEN_DIM, CONTEXT_DIM),
        "b1": (HIDDEN_DIM,),
        "W2": (_D, HIDDEN_DIM),
        "b2": (_D,),
    },
}
_SCALES: dict[str, dict[str, float]] = {
    "linear": {"A": 0.6 / math.sqrt(_D), "a": 0.5, "b": 0.3, "U": 0.4},
    "mlp": {
        "W1": 1.2 / math.sqrt(_D),
        "w_sigma": 1.0,
        "Wc": 0.5,
        "b1": 0.2,
        "W2": 1.5 / math.sqrt(HIDDEN_DIM),
        "b2": 0.2,
    },
}


def make_field_tensors(kind: FieldKind) -> dict[str, Tensor]:
    """The float64 weights and contexts of one golden field, keyed ``{role}.{name}``.

    Roles are ``student`` and ``teacher``; names are the parameter names plus ``ctx``.
    Teacher weights = student weights + 0.25 × a fixed perturbation of the same scale.
    """
    if kind not in _SHAPES:
        raise ValueError(f"unknown field kind {kind!r}; expected one of {sorted(_SHAPES)}")
    base = 1000 if kind == "linear" else 2000
    out: dict[str, Tensor] = {}
    for i, (name, shape) in enumerate(sorted(_SHAPES[kind].items())):
        scale = _SCALES[kind][name]
        w = lcg_normal(base + i, shape, scale)
        out[f"student.{name}"] = w
        out[f"teacher.{name}"] = w + 0.25 * lcg_normal(base + 100 + i, shape, scale)
    out["student.ctx"] = lcg_normal(base + 50, (CONTEXT_DIM,))
    out["teacher.ctx"] = lcg_normal(base + 51, (CONTEXT_DIM,))
    return out


def make_noise() -> Tensor:
    """The fixed start state ε at σ = 1, float64 of shape :data:`DATA_SHAPE`."""
    return lcg_normal(7, DATA_SHAPE)


def param_names(kind: FieldKind) -> list[str]:
    """Sorted parameter names of a field kind (the gradient keys of the goldens)."""
    return sorted(_SHAPES[kind])


def build_field(
    kind: FieldKind, tensors: dict[str, Tensor], role: str, dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Instantiate the ``role`` ("student" or "teacher") network of a field from its tensors.

    Args:
        kind: "linear" or "mlp".
        tensors: the dict from :func:`make_field_tensors` (or the golden file).
        role: "student" or "teacher".
        dtype: parameter dtype (the goldens are float64; cast for float32/bf16 runs).
        device: where to put the parameters.
    """
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    kw = {n: tensors[f"{role}.{n}"] for n in param_names(kind)}
    ctx = tensors[f"{role}.ctx"]
    mod: nn.Module = LinearField(ctx=ctx, **kw) if kind == "linear" else MLPField(ctx=ctx, **kw)
    return mod.to(device=device, dtype=dtype)

