"""The golden-vector catalogue (what is computed) and its loader (what is shipped).

A *case* is (field, schedule, space): the D-OPSD roll-out of the golden student against the
golden teacher from the golden noise on one σ grid, in one loss space, computed in float64 by
:func:`dopsd_ref.dopsd_rollout_loss`. For each case the goldens hold

    loss [] · per_step [K] · states [K+1, B, C, H, W] · final_sample [B, C, H, W]
    grad.<param> (∂loss/∂θ_student for every student parameter)

plus an EMA case (``ema.safetensors``). ``manifest.json`` lists the files with their
SHA-256, the schedules, the cases and the per-dtype tolerances (see :mod:`.make_golden`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .. import flux2_sigmas, uniform_sigmas, zimage_turbo_sigmas
from ._io import read_safetensors
from .fields import FieldKind, build_field, param_names

__all__ = [
    "GOLDEN_DIR",
    "FIELDS",
    "SCHEDULES",
    "SPACES",
    "QUANTITIES",
    "DTYPES",
    "PROPERTY_CASE",
    "FLUX2_IMAGE_SEQ_LEN",
    "EMA_DECAY",
    "EMA_SLOW_DECAY",
    "CaseId",
    "Golden",
    "load_golden",
    "dtype_from_name",
    "dtype_name",
    "all_cases",
]

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
FIELDS: tuple[FieldKind, ...] = ("linear", "mlp")
SPACES: tuple[str, ...] = ("velocity", "x0")
QUANTITIES: tuple[str, ...] = ("loss", "per_step", "states", "final_sample", "gradients")
DTYPES: tuple[str, ...] = ("float64", "float32", "bfloat16")
FLUX2_IMAGE_SEQ_LEN = 4096  # a 1024×1024 image: H·W/256 packed latent tokens
EMA_DECAY = 0.9
EMA_SLOW_DECAY = 0.9999

# name -> (description, grid constructor)
SCHEDULES: dict[str, tuple[str, Callable[[], Tensor]]] = {
    "uniform4": ("uniform K=4: linspace(1, 1/4, 4)", lambda: uniform_sigmas(4)),
    "zimage4": ("Z-Image-Turbo released training grid, K=4", lambda: zimage_turbo_sigmas(4)),
    "zimage8": ("Z-Image-Turbo native 8-NFE grid", lambda: zimage_turbo_sigmas(8)),
    "flux2_4": (
        f"FLUX.2 K=4, exponential shift with empirical mu at image_seq_len={FLUX2_IMAGE_SEQ_LEN}",
        lambda: flux2_sigmas(4, FLUX2_IMAGE_SEQ_LEN),
    ),
}

# The case the property suite runs on (non-uniform grid, nonlinear field).
PROPERTY_CASE: tuple[FieldKind, str] = ("mlp", "zimage4")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float64" | "float32" | "bfloat16"`` (also ``bf16``, ``fp32``, ``fp64``) → torch dtype."""
    aliases = {"float64": torch.float64, "fp64": torch.float64, "float32": torch.float32,
               "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in aliases:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return aliases[name]


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical manifest name of a dtype."""
    return {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]



@dataclass(frozen=True)
class CaseId:
    """One golden roll-out case."""

    field: FieldKind
    schedule: str
    space: str

    def __str__(self) -> str:
        return f"{self.field}/{self.schedule}/{self.space}"

    @property
    def prefix(self) -> str:
        return f"case.{self.schedule}.{self.space}"


def all_cases() -> list[CaseId]:
    """Every golden roll-out case, in a fixed order."""
    return [CaseId(f, s, sp) for f in FIELDS for s in SCHEDULES for sp in SPACES]



@dataclass(frozen=True)
class Golden:
    """The shipped golden vectors.

    Attributes:
        root: the directory read from.
        manifest: the parsed ``manifest.json``.
        files: file stem ("linear", "mlp", "ema") -> name -> float64 tensor.
    """

    root: Path
    manifest: dict
    files: dict[str, dict[str, Tensor]] = field(repr=False)

    def sigmas(self, schedule: str) -> Tensor:
        """The σ grid [K] of a schedule, float64."""
        return self.files["linear"][f"sigmas.{schedule}"].clone()

    def noise(self) -> Tensor:
        """The start state ε [B, C, H, W], float64."""
        return self.files["linear"]["noise"].clone()

    def build(self, kind: FieldKind, role: str, dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> nn.Module:
        """A fresh student or teacher network of a golden field."""
        return build_field(kind, self.files[kind], role, dtype=dtype, device=device)

    def expected(self, case: CaseId) -> dict[str, Tensor]:
        """``loss, per_step, states, final_sample`` and ``grad.<param>`` of one case."""
        t = self.files[case.field]
        out = {q: t[f"{case.prefix}.{q}"] for q in ("loss", "per_step", "states", "final_sample")}
        for n in param_names(case.field):
            out[f"grad.{n}"] = t[f"{case.prefix}.grad.{n}"]
        return out

    def tolerance(self, dtype: str, quantity: str) -> float:
        """The manifest tolerance for a quantity at a dtype (relative max-abs error)."""
        try:
            return float(self.manifest["tolerances"][dtype][quantity])
        except KeyError as exc:
            raise KeyError(f"manifest has no tolerance for dtype={dtype!r} quantity={quantity!r}") from exc


@lru_cache(maxsize=4)
def _load(root: str) -> Golden:
    p = Path(root)
    manifest_path = p / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"no golden vectors at {p}: run `python -m dopsd_ref.conformance.make_golden` to create them"
        )
    manifest = json.loads(manifest_path.read_text())
    files = {Path(name).stem: read_safetensors(p / name) for name in sorted(manifest["files"])}
    return Golden(root=p, manifest=manifest, files=files)


def load_golden(root: str | Path | None = None) -> Golden:
    """Load (and cache) the golden vectors; default: the ones shipped with the package."""
    return _load(str(Path(root) if root is not None else GOLDEN_DIR))
