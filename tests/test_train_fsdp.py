"""FSDP (version 2) training.

accelerate turns FSDP on only where there are GPUs. On the CPU, two gloo processes shard a tiny dual encoder with
torch's own `fully_shard`, as accelerate's `prepare` does, and drive the real `Trainer`: sharded checkpoints that
resume exactly, evaluation that calls the model's methods besides `forward`, and the trained weights gathered whole.
Where there is a GPU, `accelerate launch` runs the shipped `adapters/accelerate/fsdp.yaml` on every stage.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from geochat import GeoChat
from geochat.model.assistant import build_assistant
from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
from geochat.train.align import AlignModel
from geochat.train.loop import Trainer, TrainingInterrupted
from geochat.train.recipe import OptimConfig, RunConfig, load_recipe
from tests.test_train import _align, _recipe, data  # noqa: F401  (data: the fixture)
from tests.tiny import TINY_VISION

REPO = Path(__file__).resolve().parent.parent
WORLD = 2
STEPS = 4
BATCH = 4


class FsdpStandIn:
    """What accelerate's `prepare` does under FSDP2 (each transformer block and then the root sharded in place, bf16
    compute, the optimizer moved onto the sharded parameters), for the CPU, where accelerate will not."""

    def __init__(self, rank: int) -> None:
        self.process_index, self.num_processes, self.is_main_process = rank, WORLD, rank == 0
        self.state = SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=SimpleNamespace(fsdp_version=2))

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        names = {id(p): n for n, p in module.named_parameters()}
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in module.tower.layers:  # type: ignore[union-attr]
            fully_shard(layer, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        params = dict(module.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [params[names[id(p)]] for p in group["params"]]
        return module, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def wait_for_everyone(self) -> None:
        dist.barrier()


def _model() -> AlignModel:
    torch.manual_seed(0)
    return AlignModel(GeoHybridVisionModel(GeoHybridVisionConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"})), 0.07)


def _trainer(directory: Path, rank: int) -> Trainer:
    optim = OptimConfig(lr=1e-2, batch_size=BATCH, max_steps=STEPS, warmup_steps=1)
    run = RunConfig(seed=0, log_every=1, eval_every=2, save_every=2)
    return Trainer("align", _model(), optim, run, directory, FsdpStandIn(rank))


def _fit(trainer: Trainer, stop_after: int | None) -> None:
    model = trainer.module

    def loss_fn(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)
        pixels, text = torch.rand(BATCH, 3, 64, 64, generator=g), torch.randn(BATCH, 24, generator=g)
        mine = trainer.shard(list(range(BATCH)))  # data parallel: each process its half of the batch
        return model(pixels[mine], nn.functional.normalize(text[mine], dim=-1))

    def eval_fn() -> dict[str, float]:  # `embed`, not `forward`: only whole weights let it run
        return {"norm": float(model.embed(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9)))
                              .float().norm())}

    trainer.fit(loss_fn, eval_fn, progress=False, stop_after=stop_after)


def _worker(rank: int, root: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        out = Path(root)
        straight = _trainer(out / "straight", rank)
        assert straight.sharded
        _fit(straight, None)
        whole = straight.gathered_state()
        killed = _trainer(out / "killed", rank)
        try:
            _fit(killed, stop_after=2)
        except TrainingInterrupted:
            pass
        resumed = _trainer(out / "killed", rank)
        assert resumed.load_checkpoint() and resumed.step == 2
        _fit(resumed, None)
        again = resumed.gathered_state()
        if rank == 0:
            assert whole is not None and again is not None
            save_file(whole, str(out / "straight.safetensors"))
            save_file(again, str(out / "resumed.safetensors"))
        else:
            assert whole is None and again is None
        dist.barrier()  # both done before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_trainer_checkpoints_resume_evaluates_and_gathers_on_two_processes(tmp_path: Path) -> None:
    with socket.socket() as s:  # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(str(tmp_path), port), nprocs=WORLD, start_method="spawn")
    initial = {k: v.float() for k, v in _model().state_dict().items()}
    straight = load_file(str(tmp_path / "straight.safetensors"))
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    # gathered whole and in full precision: every weight of the unsharded model, its shape and dtype
    assert set(straight) == set(initial)
    assert all(straight[k].shape == v.shape and straight[k].dtype == torch.float32 for k, v in initial.items())
    assert not torch.equal(straight["tower.head.weight"], initial["tower.head.weight"])  # it trained
    # killed after step 2 and resumed from the sharded checkpoint: the same weights as the run that went straight
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)
    checkpoint = load_file(str(tmp_path / "killed" / "checkpoint" / "trainable.safetensors"))
    assert checkpoint["tower.head.weight"].shape == initial["tower.head.weight"].shape  # whole, not a shard
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["sharded"] is True
    evals = [json.loads(line)["eval"] for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
             if "eval" in line]
    assert [e["step"] for e in evals] == [2, 4] and all(e["norm"] > 0 for e in evals)


def test_a_sharded_checkpoint_is_refused_without_fsdp(tmp_path: Path) -> None:
    directory = tmp_path / "stage"
    (directory / "checkpoint").mkdir(parents=True)
    (directory / "checkpoint" / "state.json").write_text(json.dumps({"step": 2, "train": [], "evals": [],
                                                                     "sharded": True}))
    trainer = Trainer("align", _model(), OptimConfig(lr=1e-3, batch_size=2, max_steps=4), RunConfig(), directory)
    with pytest.raises(Exception, match="written with FSDP and this run is without it"):
        trainer.load_checkpoint()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs FSDP on GPUs only")
@pytest.mark.parametrize("config", ["fsdp.yaml", None])
def test_accelerate_launch_trains_the_chat_stages_on_the_gpus(tmp_path: Path, data: Path,  # noqa: F811
                                                              tiny_llm_dir: Path, config: str | None) -> None:
    """The shipped FSDP config, and accelerate's plain data parallelism (no config file)."""
    chat = {"conversations": str(data / "conv.json"), "val_samples": 2, "max_length": 256,
            "optim": {"lr": 1e-3, "batch_size": 2 * torch.cuda.device_count(), "max_steps": STEPS}}
    path = _recipe(tmp_path, data, tiny_llm_dir, {"pretrain": chat, "instruct": chat}, run={"autocast": "bf16"},
                   lora={"r": 4, "alpha": 8, "dropout": 0.0},
                   moe={"num_experts": 3, "top_k": 1, "r": 2, "alpha": 4, "target_modules": ["gate_proj"]})
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher) if launcher.is_file() else "accelerate", "launch",
               *(["--config_file", str(REPO / "adapters" / "accelerate" / config)] if config else []),
               "--num_processes", str(torch.cuda.device_count()), "-m", "geochat.train", str(path), "--quiet"]
    path_env = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONPATH": path_env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "out" / "instruct" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "step" in r and "loss" in r] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)
    trained = load_file(str(tmp_path / "out" / "pretrain" / "assistant" / "projector.safetensors"))
    torch.manual_seed(0)  # the stage's seed: the projector it started from
    untrained = build_assistant(load_recipe(path).assistant_config("pretrain")).llava.model.multi_modal_projector
    untrained = untrained.state_dict()
    assert any(not torch.equal(trained[k], untrained[k].cpu()) for k in trained)
    answer = GeoChat.from_pretrained(tmp_path / "out" / "assistant", max_new_tokens=4).chat(
        (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy(), "what is this?").answer
    assert isinstance(answer, str)
