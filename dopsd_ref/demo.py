"""Core demonstration: D-OPSD on a tiny 2-D velocity model (torch only, seconds on a CPU).

This is the *core* demo, not the toy-image main job: a small MLP student rolls out its own
4-step Euler trajectory from noise, and a teacher that "knows the target" (the exact
velocity field of a point mass at x* — what an in-context teacher provides in the real
method) grades each visited state. The per-step losses fall and the student's 4-step
samples move to x*.

    python -m dopsd_ref.demo [--steps 300] [--seed 0] [--space x0]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from .dopsd import dopsd_rollout_loss
from .sampling import euler_sample
from .schedules import uniform_sigmas


class TinyVelocityMLP(nn.Module):
    """v_θ(x, σ) for 2-D points: an MLP on [x, σ]."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:  # x [B, 2], sigma [B]
        return self.net(torch.cat([x, sigma[:, None]], dim=1))


def point_mass_teacher(target: Tensor):
    """Exact velocity toward a point mass x*: x0 = x*, so v = (x − x*)/σ."""

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        return (x - target) / sigma[:, None]

    return velocity


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--space", choices=["x0", "velocity"], default="x0")
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)

    print("[dopsd_ref.demo] core demonstration (2-D, analytic teacher) — not the toy-image main job.")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    target = torch.tensor([1.5, -0.5])
    student = TinyVelocityMLP()
    teacher = point_mass_teacher(target)
    sigmas = uniform_sigmas(4).float()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    eval_noise = torch.randn(512, 2, generator=gen)

    def distance() -> float:
        return float((euler_sample(student, eval_noise, sigmas) - target).norm(dim=1).mean())

    print(f"mean distance of 4-step samples to x*: {distance():.3f} (before)")
    for step in range(1, args.steps + 1):
        noise = torch.randn(args.batch, 2, generator=gen)
        out = dopsd_rollout_loss(student, teacher, noise, sigmas, space=args.space)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step == 1 or step % max(1, args.steps // 6) == 0:
            per = " ".join(f"{v:.4f}" for v in out.per_step.tolist())
            print(f"step {step:4d}  loss {out.loss.item():.4f}  per-step [{per}]")
    print(f"mean distance of 4-step samples to x*: {distance():.3f} (after)")


if __name__ == "__main__":
    main()
