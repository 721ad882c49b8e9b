"""EMA teachers: full-parameter copies and the student/teacher LoRA adapters."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dopsd_ref import LiveTeacherWarning, TeacherConfig, ema_update_, make_teacher


def _pair(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(n)]
    s = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(n)]
    return t, s


@given(st.integers(0, 2**16), st.floats(0.0, 1.0))
def test_ema_is_convex_combination(seed, decay):
    """ema_update_ sets teacher ← d·teacher + (1−d)·student in place; d = 1 leaves the
    teacher unchanged, d = 0 copies the student; the student is never modified."""
    t, s = _pair(seed)
    t0, s0 = [x.clone() for x in t], [x.clone() for x in s]
    ema_update_(t, s, decay)
    for a, a0, b, b0 in zip(t, t0, s, s0):
        assert torch.equal(b, b0), "student changed"
        assert torch.allclose(a, decay * a0 + (1 - decay) * b0, atol=1e-12)
    t, s = _pair(seed)
    t0 = [x.clone() for x in t]
    ema_update_(t, s, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(t, t0))
    ema_update_(t, s, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(t, s))


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan")])
def test_ema_rejects_bad_decay(decay):
    """A decay outside [0, 1] is an error."""
    t, s = _pair(0)
    with pytest.raises(ValueError, match="decay"):
        ema_update_(t, s, decay)


def test_ema_rejects_mismatched_tensors():
    """Teacher and student lists must match in count and shapes."""
    t, s = _pair(0)
    with pytest.raises(ValueError, match="tensors"):
        ema_update_(t[:2], s, 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)


def test_teacher_modes():
    """ema copies and follows the student slowly; frozen never moves; live is the student
    (and warns); the teacher copy has no trainable parameters."""
    student = nn.Linear(3, 3).double()
    ema = make_teacher(student, "ema", 0.9)
    frozen = make_teacher(student, "frozen")
    with pytest.warns(LiveTeacherWarning, match="collapses"):
        live = make_teacher(student, "live")
    assert live.module is student
    assert not any(p.requires_grad for p in ema.module.parameters())
    w0 = student.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    ema.update(student)
    frozen.update(student)
    assert torch.allclose(ema.module.weight, 0.9 * w0 + 0.1 * student.weight)
    assert torch.equal(frozen.module.weight, w0)
    assert TeacherConfig("frozen").effective_decay == 1.0 and TeacherConfig("live").effective_decay == 0.0
    with pytest.raises(ValueError, match="mode"):
        TeacherConfig("swa")  # type: ignore[arg-type]


def test_ema_teacher_without_warning_for_ema_modes():
    """Only the live mode warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_teacher(nn.Linear(2, 2), "ema", 0.99)
        make_teacher(nn.Linear(2, 2), "frozen")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_q = nn.Linear(6, 6)
        self.to_v = nn.Linear(6, 6)
        self.ff = nn.Linear(6, 6)

    def forward(self, x, sigma=None):
        return self.ff(self.to_q(x) + self.to_v(x))


def test_lora_student_teacher_ema():
    """peft LoRA: student adapter trainable, teacher frozen, base frozen; both start equal
    to the base; the EMA moves each teacher LoRA tensor (A and B separately) by (1−d)·Δ
    and changes no other tensor; use_adapter switches without touching requires_grad."""
    peft = pytest.importorskip("peft")
    from dopsd_ref.lora import (
        add_student_teacher_lora,
        check_lora_targets,
        lora_ema_update_,
        lora_parameters,
        use_adapter,
    )

    model = Tiny()
    x = torch.randn(5, 6)
    base_out = model(x).detach()
    add_student_teacher_lora(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=True))
    assert check_lora_targets(model, ["to_q", "to_v"]) == []
    assert check_lora_targets(model, ["to_q", "to_v", "ff"]) == ["ff"]
    nested = nn.Sequential(Tiny())
    add_student_teacher_lora(nested, peft.LoraConfig(r=2, target_modules=["0.to_q"]), adapter_dtype=torch.float64)
    assert check_lora_targets(nested, ["0.to_q"]) == [] and check_lora_targets(nested, ["0.to_v"]) == ["0.to_v"]
    assert all(p.dtype == torch.float64 for p in lora_parameters(nested, "teacher").values())
    stu, tea = lora_parameters(model, "student"), lora_parameters(model, "teacher")
    assert stu and all(p.requires_grad for p in stu.values()) and not any(p.requires_grad for p in tea.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(stu)
    torch.testing.assert_close(model(x), base_out)
    with use_adapter(model, "teacher"):
        torch.testing.assert_close(model(x), base_out)
    # a training step on the student
    opt = torch.optim.SGD(list(stu.values()), lr=0.1)
    model(x).pow(2).mean().backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_ema_update_(model, 0.75)
    for n, p in model.named_parameters():
        if n in tea:
            sn = n.replace(".teacher.", ".student.")
            torch.testing.assert_close(p, 0.75 * before[n] + 0.25 * before[sn])
        else:
            assert torch.equal(p, before[n]), f"{n} changed"
    with use_adapter(model, "teacher"):
        assert not any(p.requires_grad for p in tea.values())
    assert all(p.requires_grad for p in stu.values())


def _lora_model(seed: int):
    peft = pytest.importorskip("peft")
    from dopsd_ref.lora import add_student_teacher_lora

    torch.manual_seed(seed)  # peft's A initialisation draws from the global generator
    model = Tiny().double()
    return add_student_teacher_lora(model, peft.LoraConfig(r=2, target_modules=["to_q", "to_v", "ff"]),
                                    adapter_dtype=torch.float64)


@settings(max_examples=8)
@given(st.integers(0, 2**16))
def test_lora_teacher_starts_as_exact_copy_of_student(seed):
    """Right after the two adapters are created, every teacher LoRA tensor (A and B of every
    adapted layer) equals its student counterpart exactly, and no LoRA tensor is missing on
    either side."""
    from dopsd_ref.lora import lora_parameters

    model = _lora_model(seed)
    stu, tea = lora_parameters(model, "student"), lora_parameters(model, "teacher")
    assert len(stu) == 6 and sorted(n.replace(".student.", ".teacher.") for n in stu) == sorted(tea)
    for n, p in stu.items():
        assert torch.equal(tea[n.replace(".student.", ".teacher.")], p), n
    assert any(p.abs().sum() > 0 for n, p in stu.items() if "lora_A" in n)  # A is not trivially 0


@settings(max_examples=8)
@given(st.integers(0, 2**16), st.floats(0.0, 1.0))
def test_lora_ema_moves_every_tensor(seed, decay):
    """After every student LoRA tensor (A and B) is perturbed, lora_ema_update_ sets each
    teacher tensor t to d·t + (1 − d)·s with s its own student counterpart, and leaves the
    student and the base weights untouched."""
    from dopsd_ref.lora import lora_ema_update_, lora_parameters

    model = _lora_model(seed)
    stu, tea = lora_parameters(model, "student"), lora_parameters(model, "teacher")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in stu.values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_ema_update_(model, decay)
    for n, p in model.named_parameters():
        if n in tea:
            s = before[n.replace(".teacher.", ".student.")]
            torch.testing.assert_close(p, decay * before[n] + (1 - decay) * s, atol=1e-12, rtol=1e-12)
        else:
            assert torch.equal(p, before[n]), f"{n} changed"
