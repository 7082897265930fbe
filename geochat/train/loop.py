"""The training loop every stage shares: steps, schedule, checkpoints that resume, logs, loss plot.

Determinism is what makes resuming exact: the batch of step `s` is a pure function of (seed, s) (a
seeded permutation per epoch), and the torch RNG is re-seeded from (seed, s) before each step, so a
run killed after step k and resumed from its checkpoint computes the same steps k+1.. as an
uninterrupted run, and ends with the same weights.

A checkpoint (`checkpoint/` in the stage directory) holds the trainable tensors (safetensors), the
optimizer state, the step and the loss history; it is written to a temporary directory and renamed,
so a kill during a save leaves the previous checkpoint intact (as `.checkpoint.old` if the kill falls between
the two renames; resuming reads it then). Distributed runs go through
`accelerate` (one CPU process is the degenerate case); only the main process writes.

Under FSDP (version 2: `adapters/accelerate/fsdp.yaml`) `accelerate` shards the module in place: each process
holds a slice of every weight. Checkpoints then gather the trainable weights whole through
`torch.distributed.checkpoint` (keyed by parameter name, so they resume under any number of processes),
evaluations run inside `Trainer.whole()`, and a stage saves from `Trainer.gathered_state()` put into a fresh,
unsharded copy of its model.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from geochat.errors import GeoChatError
from geochat.train.recipe import OptimConfig, RunConfig

CHECKPOINT = "checkpoint"
SHARDED = "sharded"  # state.json's flag: the optimizer state is keyed by parameter name (FSDP)
DONE = "done.json"


class TrainingInterrupted(Exception):
    """Raised by `stop_after` (tests simulate a kill with it); the checkpoint of that step exists."""


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of step `step` (0-based): consecutive slices of a per-epoch seeded permutation."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.RandomState((seed * 1_000_003 + epoch) % 2**32).permutation(n)
    return perm[i * batch_size : (i + 1) * batch_size].tolist() if n >= batch_size else perm.tolist()


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _step_of(log_line: str) -> int | None:
    """The step a log.jsonl row belongs to (`{"step": …}` or `{"eval": {"step": …}}`); None for a row a kill
    cut in half."""
    try:
        record = json.loads(log_line)
    except json.JSONDecodeError:
        return None
    return int(record.get("step", record.get("eval", {}).get("step", 0)))


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone().contiguous() for k, p in module.named_parameters() if p.requires_grad}


@dataclass
class History:
    train: list[tuple[int, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Runs `loss_fn(step) -> loss` for `optim.max_steps` steps over `module`'s trainable parameters."""

    def __init__(self, name: str, module: nn.Module, optim: OptimConfig, run: RunConfig, directory: Path,
                 accelerator: Any | None = None, lr_scales: dict[str, float] | None = None) -> None:
        """`lr_scales` maps a parameter-name prefix to a multiplier of the schedule's learning rate."""
        self.name, self.module, self.optim_cfg, self.run_cfg, self.directory = name, module, optim, run, directory
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        if not self.params:
            raise ValueError(f"stage {name}: nothing to train (no parameter requires grad)")
        scales = lr_scales or {}

        def scale_of(param_name: str) -> float:
            return next((v for prefix, v in scales.items() if param_name.startswith(prefix)), 1.0)

        groups = [{"params": [p for n, p in named if scale_of(n) == v], "lr_scale": v}
                  for v in sorted({scale_of(n) for n, _ in named})]
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
        self.accelerator = accelerator
        if accelerator is not None:
            deepspeed = accelerator.state.deepspeed_plugin
            if deepspeed is not None:  # DeepSpeed sizes its engine from a micro batch: no DataLoader tells it here
                if optim.grad_accum > 1:
                    raise GeoChatError(f"stage {name}: grad_accum > 1 is not supported under DeepSpeed (its engine "
                                       "accumulates on its own); raise optim.batch_size instead")
                deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = max(
                    1, optim.batch_size // accelerator.num_processes)
            fsdp = getattr(accelerator.state, "fsdp_plugin", None)
            if fsdp is not None and fsdp.fsdp_version != 2:
                raise GeoChatError(f"stage {name}: FSDP version {fsdp.fsdp_version} is not supported; set "
                                   "fsdp_version: 2 in the accelerate config (adapters/accelerate/fsdp.yaml)")
            self.module, self.optimizer = accelerator.prepare(self.module, self.optimizer)
        self.sharded = _is_sharded(self.module)
        if self.sharded:  # FSDP swapped every parameter for a sharded one: clip those the optimizer now holds
            self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.history = History()
        self.step = 0
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def shard(self, indices: list[int]) -> list[int]:
        """This process's share of a global batch (data parallel: every process a different slice)."""
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return indices
        return indices[self.accelerator.process_index :: self.accelerator.num_processes]

    # -- checkpoints -------------------------------------------------------------------------------

    def _checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(trainable weights, optimizer state), whole, on the main process. Every process must call it."""
        if not self.sharded:
            return trainable_state(_unwrap(self.module)), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        weights, optimizer = get_state_dict(self.module, self.optimizer, options=options)
        return {k: torch.as_tensor(v).contiguous() for k, v in weights.items()}, dict(optimizer)

    def gathered_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP: the whole module's weights gathered whole, in full precision, on the main process (None on
        the others); every process must call it. Without sharding: None, as the module holds them whole."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: torch.as_tensor(v) for k, v in state.items()} if self.is_main else None

    @contextmanager
    def whole(self) -> Iterator[None]:
        """Inside, every weight is whole on every process, so code may call the module's parts and methods
        besides `forward` (evaluation); every process must enter it. Under FSDP the weights are gathered in
        its compute precision, with autocast to match; without sharding, nothing changes."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.module.modules() if isinstance(m, FSDPModule)] if self.sharded else []
        for unit in units:
            unit.unshard()
        try:
            low = next((p.dtype for p in self.module.parameters() if p.dtype != torch.float32), None) if units else None
            device = next(self.module.parameters()).device
            with torch.autocast(device.type, dtype=low) if low is not None else nullcontext():
                yield
        finally:
            for unit in units:
                unit.reshard()

    def save_checkpoint(self) -> None:
        """Write the checkpoint (the main process writes, every process takes part in gathering FSDP state); every
        process returns once it is whole on disk, so none can act on a step whose checkpoint is still being written
        (a process killed just after would otherwise resume, with the others, from an older one)."""
        weights, optimizer = self._checkpoint_state()
        if self.is_main:
            self._write_checkpoint(weights, optimizer)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, weights: dict[str, torch.Tensor], optimizer: Any) -> None:
        final = self.directory / CHECKPOINT
        tmp = self.directory / f".{CHECKPOINT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "train": self.history.train,
                                                    "evals": self.history.evals, SHARDED: self.sharded}))
        old = self.directory / f".{CHECKPOINT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        ckpt = self.directory / CHECKPOINT
        old = self.directory / f".{CHECKPOINT}.old"
        if not (ckpt / "state.json").is_file() and (old / "state.json").is_file():
            ckpt = old  # killed between save_checkpoint's two renames: the previous checkpoint is whole
        if not (ckpt / "state.json").is_file():
            return False
        state = json.loads((ckpt / "state.json").read_text())
        if bool(state.get(SHARDED, False)) != self.sharded:
            written, now = ("without", "with") if self.sharded else ("with", "without")
            raise GeoChatError(f"checkpoint {ckpt} was written {written} FSDP and this run is {now} it: resume it "
                               "under the accelerate config that wrote it")
        weights = load_file(str(ckpt / "trainable.safetensors"))
        optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.module, self.optimizer, model_state_dict=dict(weights), optim_state_dict=optimizer,
                           options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            result = _unwrap(self.module).load_state_dict(weights, strict=False)
            if result.unexpected_keys:
                raise ValueError(f"checkpoint {ckpt} does not fit this model: {result.unexpected_keys[:5]}")
            self.optimizer.load_state_dict(optimizer)
        self.step = int(state["step"])
        self.history = History([tuple(x) for x in state["train"]], state["evals"])  # type: ignore[misc]
        self._forget_log_after(self.step)
        return True

    def _forget_log_after(self, step: int) -> None:
        """Drop log.jsonl's rows of the steps after the checkpoint: the resumed run logs them again."""
        log = self.directory / "log.jsonl"
        if not self.is_main or not log.is_file():
            return
        kept = [line for line in log.read_text(encoding="utf-8").splitlines()
                if line.strip() and (n := _step_of(line)) is not None and n <= step]
        tmp = log.with_name(f".{log.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        tmp.replace(log)

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self, loss_fn: Callable[[int], torch.Tensor], eval_fn: Callable[[], dict[str, float]] | None = None,
            progress: bool = True, stop_after: int | None = None) -> History:
        cfg, run = self.optim_cfg, self.run_cfg
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.name, disable=not (progress and self.is_main))
        window: list[float] = []
        start = time.perf_counter()
        while self.step < cfg.max_steps:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, cfg) * group.get("lr_scale", 1.0)
            self.module.train()
            total = 0.0
            for micro in range(cfg.grad_accum):
                torch.manual_seed(run.seed * 1_000_003 + self.step * 97 + micro)
                loss = loss_fn(self.step * cfg.grad_accum + micro) / cfg.grad_accum
                if self.accelerator is not None:
                    self.accelerator.backward(loss)
                else:
                    loss.backward()
                total += float(loss.detach())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)  # DTensor-aware under FSDP
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.history.train.append((self.step, total))
            window.append(total)
            bar.update(1)
            if self.step % run.log_every == 0 or self.step == cfg.max_steps:
                bar.set_postfix(loss=f"{np.mean(window):.4f}", lr=f"{lr_at(self.step - 1, cfg):.2e}")
                self._log({"step": self.step, "loss": float(np.mean(window)), "s": round(time.perf_counter() - start, 1)})
                window = []
            if eval_fn is not None and (self.step % run.eval_every == 0 or self.step == cfg.max_steps):
                self.module.eval()
                with torch.no_grad(), self.whole():
                    metrics = {"step": self.step, **eval_fn()}
                self.history.evals.append(metrics)
                self._log({"eval": metrics})
            if self.step % run.save_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
                self.plot()
            if stop_after is not None and self.step >= stop_after and self.step < cfg.max_steps:
                bar.close()
                raise TrainingInterrupted(f"stopped after step {self.step}")
        bar.close()
        return self.history

    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.directory / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self) -> Path | None:
        """`loss.png`: training loss per step (and a moving average), eval metrics on a second axis."""
        if not self.is_main or not self.history.train:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, losses = zip(*self.history.train, strict=False)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, lw=0.6, alpha=0.5, label="train loss")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.name)
        evals = [e for e in self.history.evals if len(e) > 1]
        if evals:
            ax2 = ax.twinx()
            for key in [k for k in evals[-1] if k != "step"]:
                ax2.plot([e["step"] for e in evals], [e.get(key, np.nan) for e in evals], "o--", ms=3, label=f"val {key}")
            ax2.legend(loc="upper right", fontsize=7)
        ax.legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        path = self.directory / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DDP / accelerate wrappers keep the model in .module
