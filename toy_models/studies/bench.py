"""Benchmarks: what a D-OPSD step costs, how it grows with K, batch and resolution.

    python -m toy_models.studies.bench [--out outputs/bench] [--device auto] [--quick]

Measured in one run, on the toy DiT (and on a tiny real Z-Image transformer from
``paper_repro`` when diffusers is installed):

* **time**: one D-OPSD roll-out with per-step backward vs the *ideal*
  ``K·t(student forward+backward) + K·t(teacher forward)``, and vs one SFT step
  (forward+backward of the flow-matching loss) — as ratios measured in the same process;
* **peak memory** of a D-OPSD step with per-step and with single backward, and of an SFT
  step, for K = 1, 2, 4, 8 and several batch sizes and resolutions — each case in a fresh
  subprocess on CPU (peak-RSS growth over the loaded model), in-process on CUDA (``max_memory_allocated``);
* **sampler throughput**: images per second at 4 steps;
* **teacher overhead**: teacher forward through LoRA adapter switching vs a separate EMA copy.

Writes ``bench.md``, ``bench.json`` and ``bench.png`` to ``--out``. No number here is a
target check: the report states measured ratios and where targets are missed.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

import dopsd_ref
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext

# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    model: str = "toy"  # "toy" (toy DiT S) or "zimage" (tiny real Z-Image transformer)
    k: int = 4
    batch: int = 8
    res: int = 16


def _toy(case: Case, device: torch.device):
    from toy_models.models.dit import toy_dit_s

    torch.manual_seed(0)
    model = toy_dit_s(img_size=case.res).to(device)
    with torch.no_grad():  # make every branch do work (zero-initialised gates otherwise skip it)
        for n, p in model.named_parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    caps = [f"large red {V.SHAPE_TOKEN} on white"] * case.batch
    tokens = V.tokenize(caps)
    ref = torch.randn(case.batch, 3, case.res, case.res)
    sctx = ToyContext(tokens).to(device)
    tctx = ToyContext(tokens, ref, "tokens").to(device)
    teacher = dopsd_ref.make_teacher(model, "ema", 0.999).module
    student_fn = lambda x, s: model(x, s, sctx)  # noqa: E731
    teacher_fn = lambda x, s: teacher(x, s, tctx)  # noqa: E731
    return model, student_fn, teacher_fn, (case.batch, 3, case.res, case.res)


def _zimage(case: Case, device: torch.device):
    from paper_repro.adapters import ZImageVelocity
    from paper_repro.tiny import tiny_zimage_transformer

    tr = tiny_zimage_transformer().to(device).train()
    teacher_tr = dopsd_ref.make_teacher(tr, "ema", 0.999).module
    g = torch.Generator().manual_seed(0)
    caps = [torch.randn(8, 32, generator=g).to(device) for _ in range(case.batch)]
    caps_t = [torch.randn(24, 32, generator=g).to(device) for _ in range(case.batch)]  # text + image tokens
    return tr, ZImageVelocity(tr, caps), ZImageVelocity(teacher_tr, caps_t), (case.batch, 16, case.res, case.res)


BUILDERS: dict[str, Callable] = {"toy": _toy, "zimage": _zimage}


def _sync(device: torch.device) -> None:  # noqa: D103
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median wall-clock seconds of ``fn`` over ``repeat`` runs after one warm-up."""
    fn()
    _sync(device)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _case_inputs(case: Case, device: torch.device):
    """Model, student/teacher callables, state shape, seeded x and x0 [B, ...], σ = 0.5 [B]
    and the uniform K-step grid of one benchmark case."""
    model, student, teacher, shape = BUILDERS[case.model](case, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(device)
    x0 = torch.randn(shape, generator=g).to(device)
    sig = torch.full((shape[0],), 0.5, device=device)
    return model, student, teacher, shape, x, x0, sig, dopsd_ref.uniform_sigmas(case.k)


def time_case(case: Case, device: torch.device, repeat: int = 5) -> dict[str, float]:
    """Times of the parts and of the whole D-OPSD step, and the ratios to the ideal and SFT."""
    model, student, teacher, shape, x, x0, sig, sigmas = _case_inputs(case, device)

    def student_fb():
        student(x, sig).pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    def teacher_f():
        with torch.no_grad():
            teacher(x, sig)

    def dopsd_step():
        dopsd_ref.dopsd_rollout_loss(student, teacher, x, sigmas, per_step_backward=True)
        model.zero_grad(set_to_none=True)

    def sft_step():
        dopsd_ref.flow_matching_loss(student, x0, x, sig).backward()
        model.zero_grad(set_to_none=True)

    t_s, t_t = _time(student_fb, device, repeat), _time(teacher_f, device, repeat)
    t_d, t_sft = _time(dopsd_step, device, repeat), _time(sft_step, device, repeat)
    ideal = case.k * (t_s + t_t)
    return {"student_fwd_bwd_s": t_s, "teacher_fwd_s": t_t, "dopsd_step_s": t_d, "ideal_s": ideal,
            "sft_step_s": t_sft, "ratio_to_ideal": t_d / ideal, "ratio_to_sft": t_d / t_sft}


# ----------------------------------------------------------------------------- memory


class _RSSSampler:
    """Peak resident memory of this process during a block, sampled every 0.2 ms.

    The subprocess runs with glibc's mmap threshold lowered, so freed tensors go back to
    the OS and RSS tracks live tensor bytes; torch kernels release the GIL, so the sampler
    thread keeps running during forward and backward.
    """

    def __init__(self) -> None:
        import threading

        self.page = resource.getpagesize()
        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.0002)

    def __enter__(self) -> "_RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def memory_case(case: Case, mode: str, device_name: str) -> dict[str, float]:
    """Run in a fresh process: peak memory growth of one step in ``mode`` over the loaded model."""
    import ctypes
    import gc

    device = torch.device(device_name)
    model, student, teacher, shape, x, x0, sig, sigmas = _case_inputs(case, device)

    def step() -> None:
        if mode == "sft":
            dopsd_ref.flow_matching_loss(student, x0, x, sig).backward()
        else:
            out = dopsd_ref.dopsd_rollout_loss(student, teacher, x, sigmas, per_step_backward=(mode == "per_step"))
            if mode == "single":
                out.loss.backward()

    if device.type == "cuda":
        step()  # warm-up: cuDNN/cuBLAS workspaces and .grad buffers are not activations
        model.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
    step()  # warm-up: allocate .grad buffers and one-off workspaces outside the measurement
    model.zero_grad(set_to_none=False)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with _RSSSampler() as rss:
        before = rss.current()
        step()
    return {"peak_mib": (rss.peak - before) / 2**20}


def _memory_subprocess(case: Case, mode: str, device: str) -> float:
    import os

    code = (
        "import json, sys; from toy_models.studies.bench import Case, memory_case; "
        f"print(json.dumps(memory_case(Case(**{asdict(case)!r}), {mode!r}, {device!r})))"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory case {case} {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def _memory(case: Case, mode: str, device: torch.device) -> float:
    """CUDA: in this process (``max_memory_allocated`` resets per case; a subprocess per case
    would spend ~15 s on CUDA start-up); CPU: in a fresh subprocess (peak RSS)."""
    if device.type != "cuda":
        return _memory_subprocess(case, mode, str(device))
    import gc

    peak = memory_case(case, mode, str(device))["peak_mib"]
    gc.collect()
    torch.cuda.empty_cache()
    return peak


# ----------------------------------------------------------------------------- sampler / teacher


@torch.no_grad()
def sampler_throughput(device: torch.device, n: int = 256, steps: int = 4, repeat: int = 3) -> float:
    """Toy images per second at ``steps`` Euler steps, batch ``n``."""
    from toy_models.models.dit import toy_dit_s

    model = toy_dit_s().to(device).eval()
    ctx = ToyContext(V.tokenize(["large red circle on white"] * n)).to(device)
    noise = torch.randn(n, 3, 16, 16, device=device)
    t = _time(lambda: dopsd_ref.euler_sample(lambda x, s: model(x, s, ctx), noise, dopsd_ref.uniform_sigmas(steps)),
              device, repeat)
    return n / t


def teacher_overhead(device: torch.device, batch: int = 8, repeat: int = 5) -> dict[str, float]:
    """Teacher forward: LoRA adapter switching on the student's network vs a separate copy."""
    from toy_models.models.dit import toy_dit_s
    from toy_models.finetune.adapters import add_local_adapters
    from toy_models.finetune.train import RARE_IDS

    torch.manual_seed(0)
    base = toy_dit_s().to(device)
    copy_teacher = dopsd_ref.make_teacher(base, "ema", 0.999).module
    lora = add_local_adapters(toy_dit_s().to(device), RARE_IDS, rank=4)
    tokens = V.tokenize([f"large red {V.SHAPE_TOKEN} on white"] * batch)
    ctx = ToyContext(tokens, torch.randn(batch, 3, 16, 16), "tokens").to(device)
    x, s = torch.randn(batch, 3, 16, 16, device=device), torch.full((batch,), 0.5, device=device)
    with torch.no_grad():
        t_copy = _time(lambda: copy_teacher(x, s, ctx), device, repeat)
    t_lora = _time(lambda: lora.teacher_forward(x, s, ctx), device, repeat)
    return {"separate_copy_s": t_copy, "lora_switch_s": t_lora, "lora_over_copy": t_lora / t_copy,
            "copy_extra_params_M": sum(p.numel() for p in copy_teacher.parameters()) / 1e6,
            "lora_extra_params_M": sum(p.numel() for n, p in lora.named_parameters() if ".teacher" in n) / 1e6}


def profile_report(device: torch.device, rows: int = 15) -> str:
    """torch.profiler tables (top ops by self CPU time) of toy sampling and one D-OPSD step."""
    from torch.profiler import ProfilerActivity, profile

    from toy_models.models.dit import toy_dit_s

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    model = toy_dit_s().to(device)
    n = 256
    ctx = ToyContext(V.tokenize(["large red circle on white"] * n)).to(device)
    noise = torch.randn(n, 3, 16, 16, device=device)
    sigmas = dopsd_ref.uniform_sigmas(4)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    with torch.no_grad():
        dopsd_ref.euler_sample(lambda x, s: model(x, s, ctx), noise, sigmas)
        with profile(activities=acts) as prof:
            dopsd_ref.euler_sample(lambda x, s: model(x, s, ctx), noise, sigmas)
    out += [f"## toy sampling, batch {n}, 4 steps", "", "```", prof.key_averages().table(sort_by=sort, row_limit=rows), "```"]
    case = Case("toy", 4, 8, 16)
    model, student, teacher, shape = _toy(case, device)
    x = torch.randn(shape, device=device)
    dopsd_ref.dopsd_rollout_loss(student, teacher, x, sigmas, per_step_backward=True)
    with profile(activities=acts) as prof:
        dopsd_ref.dopsd_rollout_loss(student, teacher, x, sigmas, per_step_backward=True)
    out += ["", "## one D-OPSD roll-out (K = 4, batch 8, per-step backward)", "", "```",
            prof.key_averages().table(sort_by=sort, row_limit=rows), "```"]
    return "\n".join(out)


# ----------------------------------------------------------------------------- report


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    tk = [r for r in report["time"] if r["model"] == "toy" and r["batch"] == report["batch_default"]]
    ks = [r["k"] for r in tk]
    axes[0].plot(ks, [r["dopsd_step_s"] for r in tk], "o-", label="D-OPSD step (per-step backward)")
    axes[0].plot(ks, [r["ideal_s"] for r in tk], "s--", label="ideal K·(fwd+bwd) + K·teacher fwd")
    axes[0].plot(ks, [r["sft_step_s"] for r in tk], "^:", label="SFT step")
    axes[0].set(xlabel="K", ylabel="seconds", title="time per step (toy DiT)")
    mk = [r for r in report["memory"] if r["model"] == "toy" and r["batch"] == report["mem_batch_default"] and r["res"] == 16]
    for mode, style in (("per_step", "o-"), ("single", "s--"), ("sft", "^:")):
        rows = [r for r in mk if r["mode"] == mode]
        axes[1].plot([r["k"] for r in rows], [r["peak_mib"] for r in rows], style, label=mode)
    axes[1].set(xlabel="K", ylabel="peak MiB over model", title="peak memory vs K")
    mb = [r for r in report["memory"] if r["model"] == "toy" and r["k"] == 4 and r["res"] == 16]
    for mode, style in (("per_step", "o-"), ("single", "s--"), ("sft", "^:")):
        rows = sorted((r for r in mb if r["mode"] == mode), key=lambda r: r["batch"])
        axes[2].plot([r["batch"] for r in rows], [r["peak_mib"] for r in rows], style, label=mode)
    axes[2].set(xlabel="batch", ylabel="peak MiB over model", title="peak memory vs batch (K = 4)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Machine: {report['machine']}; torch {report['torch']}; device {report['device']}; {report['date']}.", "",
             "| model | K | batch | res | student fwd+bwd (ms) | teacher fwd (ms) | D-OPSD step (ms) | ideal (ms) | step / ideal | step / SFT |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["time"]:
        lines.append(f"| {r['model']} | {r['k']} | {r['batch']} | {r['res']} | {1e3 * r['student_fwd_bwd_s']:.1f} | "
                     f"{1e3 * r['teacher_fwd_s']:.1f} | {1e3 * r['dopsd_step_s']:.1f} | {1e3 * r['ideal_s']:.1f} | "
                     f"{r['ratio_to_ideal']:.2f} | {r['ratio_to_sft']:.2f} |")
    lines += ["", "| model | K | batch | res | per-step backward (MiB) | single backward (MiB) | SFT (MiB) |",
              "|---|---|---|---|---|---|---|"]
    keyed: dict[tuple, dict[str, float]] = {}
    for r in report["memory"]:
        keyed.setdefault((r["model"], r["k"], r["batch"], r["res"]), {})[r["mode"]] = r["peak_mib"]
    for (m, k, b, res), v in keyed.items():
        lines.append(f"| {m} | {k} | {b} | {res} | {v.get('per_step', float('nan')):.1f} | "
                     f"{v.get('single', float('nan')):.1f} | {v.get('sft', float('nan')):.1f} |")
    s = report["summary"]
    lines += ["", f"- toy sampler: {report['sampler_images_per_s']:.0f} images/s at 4 steps (batch 256)",
              f"- teacher forward via LoRA switching / separate EMA copy: {report['teacher']['lora_over_copy']:.2f}× time, "
              f"{report['teacher']['lora_extra_params_M']:.3f}M vs {report['teacher']['copy_extra_params_M']:.2f}M extra parameters",
              f"- per-step backward peak memory, K = 8 over K = 1: {s['per_step_k8_over_k1']:.2f}× "
              f"(single backward: {s['single_k8_over_k1']:.2f}×)",
              f"- per-step D-OPSD peak memory over an SFT step (K = 4, batch {report['mem_batch_default']}): {s['per_step_over_sft']:.2f}×",
              f"- D-OPSD step time over ideal (toy, K = 4): {s['toy_k4_ratio_to_ideal']:.2f}×"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="fewer cases and repeats (smoke run)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--profile", action="store_true", help="also write torch.profiler tables to profile.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [1, 2, 4, 8] if not args.quick else [1, 4]
    batches = [4, 8, 16] if not args.quick else [8]
    b0 = 8
    repeat = 5 if not args.quick else 2
    models = ["toy"]
    try:
        import diffusers  # noqa: F401

        models.append("zimage")
    except ImportError:
        pass
    from tqdm.auto import tqdm

    time_cases = [Case(m, k, b0, 16) for m in models for k in ks]
    time_cases += [Case("toy", 4, b, 16) for b in batches if b != b0] + ([Case("toy", 4, b0, 32)] if not args.quick else [])
    mb0 = 32  # memory cases use a larger batch so activations dominate allocator noise
    mem_batches = [8, 32, 64] if not args.quick else [32]
    mem_cases = [Case("toy", k, mb0, 16) for k in ks] + [Case("toy", 4, b, 16) for b in mem_batches if b != mb0]
    mem_cases += [Case("toy", 4, mb0, 32)] if not args.quick else []
    mem_cases += [Case(m, k, mb0, 16) for m in models[1:] for k in ks]
    report: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                              "torch": torch.__version__, "device": str(device),
                              "date": time.strftime("%Y-%m-%d"), "batch_default": b0, "mem_batch_default": mb0, "time": [], "memory": []}
    for c in tqdm(time_cases, desc="time"):
        report["time"].append({**asdict(c), **time_case(c, device, repeat)})
    for c in tqdm(mem_cases, desc="memory"):
        for mode in ("per_step", "single", "sft"):
            report["memory"].append({**asdict(c), "mode": mode, "peak_mib": _memory(c, mode, device)})
    report["sampler_images_per_s"] = sampler_throughput(device, repeat=repeat)
    report["teacher"] = teacher_overhead(device, repeat=repeat)

    def mem(mode: str, k: int) -> float:
        return next(r["peak_mib"] for r in report["memory"]
                    if r["model"] == "toy" and r["mode"] == mode and r["k"] == k and r["batch"] == mb0 and r["res"] == 16)

    k_hi = max(ks)
    report["summary"] = {
        "per_step_k8_over_k1": mem("per_step", k_hi) / max(mem("per_step", 1), 1e-9),
        "single_k8_over_k1": mem("single", k_hi) / max(mem("single", 1), 1e-9),
        "per_step_over_sft": mem("per_step", 4) / max(mem("sft", 4), 1e-9),
        "toy_k4_ratio_to_ideal": next(r["ratio_to_ideal"] for r in report["time"]
                                      if r["model"] == "toy" and r["k"] == 4 and r["batch"] == b0 and r["res"] == 16),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "bench.md").write_text(md + "\n")
    plot(report, out / "bench.png")
    if args.profile:
        (out / "profile.md").write_text(profile_report(device) + "\n")
    print(md)
    print(f"\nwrote {out}/bench.md, bench.json, bench.png")
    return report


if __name__ == "__main__":
    main()
