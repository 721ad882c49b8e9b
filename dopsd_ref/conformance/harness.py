"""Calling an implementation under test: convention wrappers, call probes, one recorded run.

The **adapter signature** every implementation is wrapped into::

    fn(student, teacher, noise, sigmas, space) -> (loss, per_step, states)

* ``student``, ``teacher``: the golden σ-velocity networks, handed over *in the
  implementation's own convention* (contexts are baked in):

  ========== ============================ ====================================
  convention call                         returns
  ========== ============================ ====================================
  sigma      ``model(x, sigma)``          ``v = ε − x0``
  zimage     ``model(x, t)``, t = 1 − σ   ``out = −v`` (Z-Image's negated output)
  flux2      ``model(x, timestep)``, = σ  ``out = v``
  ========== ============================ ====================================

  ``x`` has the shape of ``noise``; the time is a tensor [B] (a scalar is broadcast).
  The student's parameters require grad. So do the teacher's — deliberately, as an unfrozen
  teacher adapter would: a conforming implementation stops gradients at the teacher.
* ``noise``: the start state at σ = 1, [B, C, H, W], in the run dtype.
* ``sigmas``: the float64 CPU σ grid [K] (σ_1 = 1 > … > σ_K > 0, terminal 0 implied) — what the
  schedulers of both Z-Image and FLUX.2 pipelines hold; convert to model time yourself.
* ``space``: ``"x0"`` or ``"velocity"``.

Return the scalar loss (mean over steps), the K per-step losses and the K + 1 states
(``states[0] = noise``), as a tuple or as an object with attributes ``loss``, ``per_step``,
``states``. Either return a differentiable loss (the kit calls ``backward``) or call
``backward`` yourself (e.g. once per step) and return a detached loss; the kit then reads
the gradients accumulated on the student's parameters.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "single_thread",
    "Convention",
    "CONVENTIONS",
    "RolloutFn",
    "EmaFn",
    "AdapterError",
    "Call",
    "OutputLog",
    "Probe",
    "RunRecord",
    "execute",
    "load_callable",
    "model_time",
]

Convention = Literal["sigma", "zimage", "flux2"]
CONVENTIONS: tuple[str, ...] = ("sigma", "zimage", "flux2")
_TIME_ARG = {"sigma": "sigma", "zimage": "t", "flux2": "timestep"}

# fn(student, teacher, noise [B, ...], sigmas [K] float64, space) -> (loss, per_step, states)
RolloutFn = Callable[[Callable[..., Tensor], Callable[..., Tensor], Tensor, Tensor, str], Any]
# ema(teacher_tensors, student_tensors, decay) -> None (in place) or the new teacher tensors
EmaFn = Callable[[list[Tensor], list[Tensor], float], Any]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run with one intra-op CPU thread, restoring the previous setting afterwards.

    The kit's tensors are tiny: on a loaded machine, thread hand-offs cost ~50× the maths.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class AdapterError(RuntimeError):
    """The implementation's output does not follow the adapter signature."""


def model_time(sigma: Tensor, convention: str) -> Tensor:
    """The time a model in ``convention`` receives at noise level σ (zimage: 1 − σ)."""
    if convention == "zimage":
        return 1.0 - sigma
    if convention in ("sigma", "flux2"):
        return sigma
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def load_callable(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (attribute paths like ``mod:Class.method`` work)."""
    if ":" not in spec:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    obj: Any = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return obj


@dataclass(frozen=True)
class Call:
    """One recorded model call.

    Attributes:
        x: float64 copy of the input state [B, ...].
        time: float64 model time as received, [B].
        has_history: the input carried autograd history (``x.grad_fn is not None``).
        grad_enabled: ``torch.is_grad_enabled()`` at call time.
        reaches_earlier_output: the input's autograd history reaches the output of an
            earlier model call (of either role): gradients would flow back across steps.
            History that ends at a fresh leaf (``x.detach().requires_grad_(True)``, then
            ``unbind``/``stack``) does not count.
    """

    x: Tensor
    time: Tensor
    has_history: bool
    grad_enabled: bool
    reaches_earlier_output: bool = False


class OutputLog:
    """The autograd nodes of every model output so far, shared by the two probes of a run."""

    def __init__(self) -> None:
        self._nodes: list[Any] = []  # keeps the node objects alive, so their ids stay unique
        self._ids: set[int] = set()

    def add(self, out: Tensor) -> None:
        if out.grad_fn is not None and id(out.grad_fn) not in self._ids:
            self._nodes.append(out.grad_fn)
            self._ids.add(id(out.grad_fn))

    def reached_from(self, x: Tensor) -> bool:
        """Whether walking ``x``'s autograd graph back from ``x.grad_fn`` meets a logged output."""
        if x.grad_fn is None or not self._ids:
            return False
        seen: set[int] = set()
        stack = [x.grad_fn]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if id(node) in self._ids:
                return True
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
        return False


class Probe:
    """A golden σ-network presented in a convention, recording every call.

    Args:
        module: σ-convention network ``(x, σ [B]) -> v``.
        convention: "sigma", "zimage" or "flux2".
        role: "student" or "teacher" (for error messages).
        data_shape: the shape every ``x`` must have.
        outputs: the log of model outputs shared with the other role's probe (default: own).
    """

    def __init__(self, module: nn.Module, convention: str, role: str, data_shape: Sequence[int],
                 outputs: OutputLog | None = None) -> None:
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.module = module
        self.convention = convention
        self.role = role
        self.data_shape = tuple(data_shape)
        self.calls: list[Call] = []
        self.outputs = outputs if outputs is not None else OutputLog()
        self._param = next(module.parameters())

    def __repr__(self) -> str:
        return f"<conformance {self.role} in {self.convention} convention: model(x, {_TIME_ARG[self.convention]})>"

    def parameters(self):  # noqa: D401 - convenience for implementations that inspect params
        """The underlying network's parameters."""
        return self.module.parameters()

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        name = _TIME_ARG[self.convention]
        if args and name in kwargs:
            raise TypeError(f"{self.role}: time given twice (positional and {name}=)")
        if len(args) > 1 or (set(kwargs) - {name}):
            raise TypeError(
                f"{self.role} takes (x, {name}) only; bind contexts/other inputs in your adapter "
                f"(got {len(args)} extra positional args and keywords {sorted(kwargs)})"
            )
        if not args and name not in kwargs:
            raise TypeError(f"{self.role} requires the time argument {name!r}")
        time = args[0] if args else kwargs[name]
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.role}: x must be a Tensor, got {type(x).__name__}")
        if x.ndim != len(self.data_shape) or tuple(x.shape[1:]) != self.data_shape[1:]:
            raise ValueError(
                f"{self.role}: x has shape {tuple(x.shape)}, expected [B, *{self.data_shape[1:]}] "
                "(unpack/unpatchify latents in your adapter before calling the model)"
            )
        b = x.shape[0]
        tt = torch.as_tensor(time, device=x.device)
        if not tt.is_floating_point():
            tt = tt.to(torch.float64)
        if tt.numel() == 1:
            tt = tt.reshape(1).expand(b)
        elif tt.numel() == b:
            tt = tt.reshape(b)
        else:
            raise ValueError(f"{self.role}: time must be a scalar or have {b} elements, got shape {tuple(tt.shape)}")
        self.calls.append(Call(
            x=x.detach().to(torch.float64).clone(),
            time=tt.detach().to(torch.float64).clone(),
            has_history=x.grad_fn is not None,
            grad_enabled=torch.is_grad_enabled(),
            reaches_earlier_output=self.outputs.reached_from(x),
        ))
        sigma = 1.0 - tt if self.convention == "zimage" else tt
        v = self.module(x.to(self._param.dtype), sigma.to(self._param.dtype))
        v = v.to(x.dtype)
        out = -v if self.convention == "zimage" else v
        self.outputs.add(out)
        return out


@dataclass(frozen=True)
class RunRecord:
    """Everything one call of the implementation produced, in float64 on the CPU.

    Attributes:
        loss: [] the returned loss.
        per_step: [K] per-step losses.
        states: [K+1, B, ...] roll-out states.
        grads: student parameter name -> ∂loss/∂θ (zeros if none arrived).
        teacher_grads: teacher parameter name -> gradient, or None if none arrived.
        student_calls, teacher_calls: the recorded model calls.
        backward_by: "kit" (loss was differentiable), "impl" (gradients were already
            accumulated) or "none" (no gradient reached the student).
        inputs_mutated: the call modified ``noise`` or ``sigmas`` in place.
    """

    loss: Tensor
    per_step: Tensor
    states: Tensor
    grads: dict[str, Tensor]
    teacher_grads: dict[str, Tensor | None]
    student_calls: list[Call] = field(repr=False)
    teacher_calls: list[Call] = field(repr=False)
    backward_by: str
    inputs_mutated: bool


def _as_tensor(v: Any, what: str) -> Tensor:
    if isinstance(v, Tensor):
        return v
    if isinstance(v, (list, tuple)):
        if not v:
            raise AdapterError(f"{what} is empty")
        items = []
        for e in v:
            if isinstance(e, Tensor):
                items.append(e.detach().to("cpu", torch.float64))
            elif isinstance(e, (int, float)):
                items.append(torch.tensor(float(e), dtype=torch.float64))
            else:
                raise AdapterError(f"{what} holds a {type(e).__name__}, expected Tensors or floats")
        try:
            return torch.stack(items)
        except RuntimeError as exc:
            raise AdapterError(f"{what}: elements have different shapes ({exc})") from exc
    raise AdapterError(f"{what} must be a Tensor or a sequence of Tensors, got {type(v).__name__}")


def _unpack(result: Any) -> tuple[Tensor, Tensor, Tensor]:
    if all(hasattr(result, a) for a in ("loss", "per_step", "states")):
        loss, per_step, states = result.loss, result.per_step, result.states
    elif isinstance(result, (tuple, list)) and len(result) == 3:
        loss, per_step, states = result
    else:
        raise AdapterError(
            "the implementation must return (loss, per_step, states) or an object with attributes "
            f"loss, per_step, states; got {type(result).__name__}"
        )
    if not isinstance(loss, Tensor):
        raise AdapterError(f"loss must be a Tensor, got {type(loss).__name__}")
    return loss, _as_tensor(per_step, "per_step"), _as_tensor(states, "states")


def execute(
    fn: RolloutFn,
    convention: str,
    student: nn.Module,
    teacher: nn.Module,
    noise: Tensor,
    sigmas: Tensor,
    space: str,
    *,
    frozen_teacher: bool = False,
) -> RunRecord:
    """Run ``fn`` once on fresh gradients and record what it did.

    Args:
        fn: the implementation, in the adapter signature (module docstring).
        convention: how ``student``/``teacher`` are presented to ``fn``.
        student, teacher: σ-convention networks (the kit's golden fields).
        noise: [B, ...] start state in the run dtype. sigmas: [K] float64 grid.
        space: "x0" or "velocity".
        frozen_teacher: hand the teacher over with ``requires_grad=False`` (default: True,
            so that a missing stop-gradient shows up as teacher gradients).

    Raises:
        AdapterError: the return value has the wrong type, shape or is non-finite.
        Exception: whatever ``fn`` raises is propagated.
    """
    k = sigmas.shape[0]
    student.zero_grad(set_to_none=True)
    teacher.zero_grad(set_to_none=True)
    student.requires_grad_(True)
    teacher.requires_grad_(not frozen_teacher)  # unfrozen by default: fn must stop gradients
    outputs = OutputLog()
    s_probe = Probe(student, convention, "student", noise.shape, outputs)
    t_probe = Probe(teacher, convention, "teacher", noise.shape, outputs)
    noise_in, sigmas_in = noise.clone(), sigmas.clone()

    loss, per_step, states = _unpack(fn(s_probe, t_probe, noise_in, sigmas_in, space))

    if loss.numel() != 1:
        raise AdapterError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
    if per_step.numel() != k:
        raise AdapterError(f"per_step must hold K={k} losses, got shape {tuple(per_step.shape)}")
    want = (k + 1, *noise.shape)
    if tuple(states.shape) != want:
        raise AdapterError(f"states must have shape [K+1, *noise.shape] = {list(want)}, got {list(states.shape)}")

    s_params = dict(student.named_parameters())
    if any(p.grad is not None for p in s_params.values()):
        backward_by = "impl"
    elif loss.requires_grad:
        loss.reshape(()).backward()
        backward_by = "kit"
    else:
        backward_by = "none"
    grads = {
        n: (p.grad.detach().to("cpu", torch.float64).clone() if p.grad is not None
            else torch.zeros(p.shape, dtype=torch.float64))
        for n, p in s_params.items()
    }
    t_grads = {
        n: (p.grad.detach().to("cpu", torch.float64).clone() if p.grad is not None else None)
        for n, p in teacher.named_parameters()
    }
    f64 = dict(device="cpu", dtype=torch.float64)
    rec = RunRecord(
        loss=loss.detach().to(**f64).reshape(()),
        per_step=per_step.detach().to(**f64).reshape(k),
        states=states.detach().to(**f64),
        grads=grads,
        teacher_grads=t_grads,
        student_calls=s_probe.calls,
        teacher_calls=t_probe.calls,
        backward_by=backward_by,
        inputs_mutated=not (torch.equal(noise_in, noise) and torch.equal(sigmas_in, sigmas)),
    )
    student.zero_grad(set_to_none=True)
    teacher.zero_grad(set_to_none=True)
    return rec
