"""Shipped toy weights: HF-style folders (config.json + model.safetensors + README.md).

Loaded with ``huggingface_hub.PyTorchModelHubMixin.from_pretrained`` from the local folder,
which makes no network call (a hub id would download as usual).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from toy_models.models.dit import ToyDiT
from toy_models.eval.evaluator import ToyEvaluator

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
BASE = "toy-dit-base"
TURBO = "toy-dit-turbo4"
EVALUATOR = "toy-evaluator"


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / name


def weights_available(*names: str) -> bool:
    """True when every named folder holds config.json and model.safetensors."""
    names = names or (BASE, TURBO, EVALUATOR)
    return all((WEIGHTS_DIR / n / "model.safetensors").is_file() and (WEIGHTS_DIR / n / "config.json").is_file() for n in names)


def _check(path: Path) -> None:
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors; train it with the recipe named in toy_models/README.md")


def load_base(path: Union[str, Path, None] = None) -> ToyDiT:
    """The base flow-matching model (sample with ≥ 32 steps for its best quality)."""
    p = Path(path) if path else weights_path(BASE)
    _check(p)
    return ToyDiT.from_pretrained(p).eval()


def load_turbo(path: Union[str, Path, None] = None) -> ToyDiT:
    """The 4-step distilled model: the few-step "turbo" model D-OPSD fine-tunes."""
    p = Path(path) if path else weights_path(TURBO)
    _check(p)
    return ToyDiT.from_pretrained(p).eval()


def load_evaluator(path: Union[str, Path, None] = None) -> ToyEvaluator:
    """The attribute classifier / toy-FID feature extractor."""
    p = Path(path) if path else weights_path(EVALUATOR)
    _check(p)
    return ToyEvaluator.from_pretrained(p).eval()
