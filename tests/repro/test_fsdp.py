"""FSDP2 (``fully_shard``) LoRA runs with two CPU processes (gloo), ``paper_repro.fsdp``.

Invariants: FSDP2 averages the ranks' gradients (reduce-scatter) and the EMA runs element-wise
on the shards, so after a few steps on different images and noise both ranks hold identical
full student and teacher LoRA tensors; the parameters really are sharded (each rank's local
shard is a strict part of the full tensor); and a sharded run stopped after 2 steps, checkpointed
with ``torch.distributed.checkpoint`` and resumed in fresh objects (disturbed RNG) ends
bit-identical to an uninterrupted 3-step run; and the sharded run equals the training script's
DDP run (``DOPSDTrainer`` under accelerate, same data, noise and LoRA init) up to the order of
the gradient reduction. The runs read their contexts from a cache.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from .helpers import make_folder, tiny_config


def _worker(rank: int, world: int, port: int, cfg_a, cfg_b, cfg_ddp, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), ACCELERATE_USE_CPU="true")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from torch.distributed.tensor import DTensor

        from paper_repro.fsdp import FSDP2LoraRun

        a = FSDP2LoraRun(cfg_a)
        lora = [p for n, p in a.model.named_parameters() if "lora_A" in n]
        sharded = all(isinstance(p, DTensor) for p in lora) and any(
            p.to_local().numel() < p.full_tensor().numel() for p in lora)
        losses_a = [a.train_step()["loss"] for _ in range(3)]
        torch.save({"lora": a.lora_state(), "losses": losses_a, "sharded": sharded}, f"{out}/a{rank}.pt")
        a.save_lora()
        b = FSDP2LoraRun(cfg_b)
        b.train_step()
        b.train_step()
        b.save_checkpoint()
        del b
        torch.manual_seed(1234 + rank)  # the resume must restore the RNG
        c = FSDP2LoraRun(cfg_b)
        assert c.load_checkpoint() and c.step == 2
        loss_c = c.train_step()["loss"]
        torch.save({"lora": c.lora_state(), "loss": loss_c}, f"{out}/c{rank}.pt")
        from paper_repro.train import DOPSDTrainer  # the training script under DDP (gloo), same data and noise

        d = DOPSDTrainer(cfg_ddp)
        losses_d = [d.train_step()["loss"] for _ in range(3)]
        torch.save({"lora": d._trainable_state(), "losses": losses_d, "type": str(d.acc.distributed_type)},
                   f"{out}/d{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_cpu_ranks_identical_and_resume_exact(tmp_path):
    import torch.multiprocessing as mp

    from paper_repro.cache import build_cache

    data = make_folder(tmp_path / "data")
    cfg = tiny_config("zimage", data, tmp_path / "a", gradient_checkpointing=True)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=str(build_cache(cfg, tmp_path / "cache"))))
    cfg_b = dataclasses.replace(cfg, output_dir=str(tmp_path / "b"))
    cfg_ddp = dataclasses.replace(cfg, output_dir=str(tmp_path / "ddp"))
    mp.spawn(_worker, args=(2, 29000 + os.getpid() % 1000, cfg, cfg_b, cfg_ddp, str(tmp_path)), nprocs=2, join=True)
    a0, a1 = (torch.load(tmp_path / f"a{r}.pt", weights_only=True) for r in (0, 1))
    c0, c1 = (torch.load(tmp_path / f"c{r}.pt", weights_only=True) for r in (0, 1))
    assert a0["sharded"] and a1["sharded"]
    for role in ("student", "teacher"):
        assert a0["lora"][role].keys() == a1["lora"][role].keys() and a0["lora"][role]
        for k, v in a0["lora"][role].items():
            assert torch.equal(v, a1["lora"][role][k]), (role, k)
            assert torch.equal(v, c0["lora"][role][k]) and torch.equal(v, c1["lora"][role][k]), ("resume", role, k)
    assert any(v.abs().max() > 0 for k, v in a0["lora"]["teacher"].items() if "lora_B" in k)
    assert a0["losses"][2] == c0["loss"] and a1["losses"][2] == c1["loss"]
    assert a0["losses"] != a1["losses"]  # the ranks trained on different data/noise
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors"))
    student = {k.replace(".student", ""): v for k, v in a0["lora"]["student"].items()}
    assert {k.removeprefix("transformer.") for k in saved} == set(student)
    assert all(torch.equal(v, student[k.removeprefix("transformer.")]) for k, v in saved.items())
    # The same run under the training script's DDP engine (accelerate, gloo): equal up to the
    # order of the gradient reduction (all-reduce vs reduce-scatter). Adam divides by √v, so an
    # element whose gradient is near zero turns that float32 noise into up to ~3e-6 of weight
    # after three steps (seen on one of 340 elements on one machine): atol 1e-5.
    d0 = torch.load(tmp_path / "d0.pt", weights_only=True)
    assert d0["type"] == "DistributedType.MULTI_CPU"
    assert d0["losses"] == pytest.approx(a0["losses"], rel=1e-5)
    for role in ("student", "teacher"):
        for k, v in a0["lora"][role].items():
            torch.testing.assert_close(v, d0["lora"][role][k], atol=1e-5, rtol=1e-5)
