"""Pretrain and instruct stages: next-token loss on the answers of LLaVA-format conversations.

Samples are tokenised by the engine's own prompt path (`geochat.engine.prompt_ids`: system prompt, the
image placeholder ×N + "\\n" opening the first user turn, the tokenizer's chat template), so the
model is trained on exactly the token layout it sees at inference. Labels are -100 everywhere
except each answer and the end-of-turn token that closes it, so only answers carry loss:

    [system][user: <image>×N \\n question][assistant:] answer <|im_end|> ...
     -100 ……………………………………………………………………………………………    answer ids + eos

pretrain: LLM frozen; the projector (and with `train_tower` the tower's blocks and head) learn.
instruct: LoRA (or QLoRA on a 4-bit base, or MoE-LoRA) on the LLM, plus the projector.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from geochat.answer import Turn
from geochat.errors import GeoChatError
from geochat.model.assistant import PROJECTOR_FILE, VISION_DIR, Assistant, build_assistant, save_assistant
from geochat.model.moe_lora import collect_aux_loss
from geochat.model.processor import to_pixel_values
from geochat.train.features import read_rgb
from geochat.train.loop import Trainer, batch_indices
from geochat.train.recipe import ChatStageConfig, Recipe

IGNORE = -100
IMAGE_PREFIX = "<image>"


@dataclass(frozen=True)
class Encoded:
    image: Path | None
    input_ids: list[int]
    labels: list[int]


def _prompt_ids(assistant: Assistant, turns: list[Turn], user: str, with_image: bool) -> list[int]:
    from geochat.generation import prompt_ids

    # The engine's one prompt path (system prompt, image placeholder, chat template).
    return prompt_ids(assistant, turns, user, with_image)


def split_turns(conversations: list[dict[str, str]]) -> tuple[list[Turn], bool]:
    """LLaVA `conversations` → (user, assistant) turns; the image placeholder leaves the first turn."""
    if not isinstance(conversations, list) or len(conversations) < 2 or len(conversations) % 2:
        raise ValueError("'conversations' needs a list of human/gpt pairs")
    turns, with_image = [], False
    for k in range(0, len(conversations), 2):
        human, gpt = conversations[k], conversations[k + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)):
            raise ValueError(f"turn {k + 1}: each turn is an object {{'from': ..., 'value': ...}}")
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ValueError("turns must alternate human, gpt")
        for j, turn in ((k, human), (k + 1, gpt)):
            if not isinstance(turn.get("value"), str):
                raise ValueError(f"turn {j + 1}: 'value' must be text, got {turn.get('value')!r:.40}")
        user = human["value"]
        if k == 0 and user.startswith(IMAGE_PREFIX):
            user, with_image = user[len(IMAGE_PREFIX):].lstrip("\n"), True
        if IMAGE_PREFIX in user:
            raise ValueError("<image> may only open the first human turn")
        turns.append(Turn(user, gpt["value"]))
    return turns, with_image


def encode_conversation(assistant: Assistant, conversations: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels keep only answer tokens and their end-of-turn."""
    turns, with_image = split_turns(conversations)
    eos = assistant.tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-turn (eos) token")
    full = _prompt_ids(assistant, turns, "?", with_image)
    labels = [IGNORE] * len(full)
    end = 0
    for k, turn in enumerate(turns):
        prefix = _prompt_ids(assistant, turns[:k], turn.user, with_image)
        if full[: len(prefix)] != prefix:
            raise ValueError("the chat template does not render earlier turns as a prefix of later ones")
        try:
            stop = full.index(eos, len(prefix))
        except ValueError as exc:
            raise ValueError("no end-of-turn token after an answer") from exc
        labels[len(prefix) : stop + 1] = full[len(prefix) : stop + 1]
        end = stop + 1
    return full[:end], labels[:end]


def load_conversations(path: Path, cfg: ChatStageConfig, assistant: Assistant, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """(train, val) samples of a LLaVA JSON file, tokenised; over-long samples are skipped."""
    if not path.is_file():
        raise GeoChatError(f"conversation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GeoChatError(f"{path} is not valid JSON ({exc}); it should be a LLaVA-format list") from exc
    if not isinstance(data, list):
        raise GeoChatError(f"{path}: expected a JSON list of LLaVA samples")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    want = (cfg.max_samples or len(data)) + cfg.val_samples
    out: list[Encoded] = []
    for i in order:
        sample = data[i]
        if not isinstance(sample, dict):
            raise GeoChatError(f"{path}: sample {i} is a {type(sample).__name__}, not a LLaVA object "
                               '{"image": ..., "conversations": [...]}')
        if "conversations" not in sample:
            raise GeoChatError(f"{path}: sample {sample.get('id', i)!r} has no 'conversations' list")
        try:
            ids, labels = encode_conversation(assistant, sample["conversations"])
        except (KeyError, ValueError) as exc:
            raise GeoChatError(f"{path}: sample {sample.get('id', i)!r}: {exc}") from exc
        if len(ids) > cfg.max_length:
            continue
        image = (path.parent / sample["image"]) if sample.get("image") else None
        out.append(Encoded(image, ids, labels))
        if len(out) >= want:
            break
    val, train = out[: cfg.val_samples], out[cfg.val_samples :]
    if not data:
        raise GeoChatError(f"{path} holds no samples")
    if not train:
        raise GeoChatError(f"{path}: no sample fits max_length={cfg.max_length}")
    return train, val


def collate(samples: list[Encoded], assistant: Assistant, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch (answers end every row, so logits are needed only for the tail; see `answer_loss`)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, width - n :], labels[i, width - n :], mask[i, width - n :] = torch.tensor(s.input_ids), torch.tensor(s.labels), 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # padding on the left must not shift real positions
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}
    with_image = [s.image is not None for s in samples]
    if any(with_image) and not all(with_image):
        raise ValueError("a batch mixes samples with and without images")
    if all(with_image):
        cfg = assistant.config
        batch["pixel_values"] = torch.cat([to_pixel_values(read_rgb(s.image), assistant.image_size, cfg.image_mean,
                                                           cfg.image_std) for s in samples if s.image is not None])
    return batch


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss on the labelled tokens, computing logits only from the first labelled position on.

    The LM head (vocabulary × hidden) over every prompt position is a fifth of a small model's
    compute; with left padding the answers sit at the end of every row, so `logits_to_keep` skips it.
    """
    batch = dict(batch)
    labels = batch.pop("labels")
    labelled = (labels != IGNORE).any(0).nonzero()
    if len(labelled) == 0:
        raise ValueError("a batch without any answer token")
    keep = labels.shape[1] - int(labelled[0]) + 1  # the logit before the first answer token predicts it
    logits = model(**batch, logits_to_keep=keep).logits[:, :-1].float()
    target = labels[:, labels.shape[1] - keep + 1 :]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE)


def _parts(assistant: Assistant) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(tower, projector), also under a peft wrapper (`Assistant.vision_tower` misses them there)."""
    llava = assistant.llava
    return llava.model.vision_tower, llava.model.multi_modal_projector


def init_from(assistant: Assistant, previous: Path | None) -> None:
    """Put the previous stage's tower (align or pretrain) and projector (pretrain) in place."""
    if previous is None:
        return
    tower, projector = _parts(assistant)
    vision = previous / VISION_DIR / "model.safetensors"
    if vision.is_file():
        result = tower.load_state_dict(load_file(str(vision)), strict=False)
        if result.unexpected_keys:
            raise GeoChatError(f"{vision} does not fit the recipe's tower: {result.unexpected_keys[:5]}")
    if (previous / PROJECTOR_FILE).is_file():
        projector.load_state_dict(load_file(str(previous / PROJECTOR_FILE)))


def set_trainable(assistant: Assistant, stage: str, cfg: ChatStageConfig) -> None:
    tower, projector = _parts(assistant)
    projector.requires_grad_(True)
    for name, p in tower.named_parameters():
        p.requires_grad_(cfg.train_tower and not (getattr(tower, "stem_is_frozen", False) and name.startswith("stem.")))
    if stage == "pretrain":
        return
    # instruct: LoRA / MoE parameters are trainable already (peft + build_assistant); nothing else.


def run_chat_stage(recipe: Recipe, stage: str, cfg: ChatStageConfig, directory: Path, previous: Path | None,
                   accelerator: Any | None = None, resume: bool = False, progress: bool = True,
                   stop_after: int | None = None) -> Path:
    seed = recipe.run.seed
    torch.manual_seed(seed)
    assistant = build_assistant(recipe.assistant_config(stage))
    init_from(assistant, previous)
    set_trainable(assistant, stage, cfg)
    train, val = load_conversations(recipe.path(cfg.conversations), cfg, assistant, seed)
    pad_id = assistant.pad_token_id
    model = assistant.model
    moe_weight = recipe.model.moe.aux_loss_weight if (stage == "instruct" and recipe.model.moe) else 0.0
    trainer = Trainer(stage, model, cfg.optim, recipe.run, directory, accelerator)
    if resume:
        trainer.load_checkpoint()

    device, bf16 = next(model.parameters()).device, recipe.run.autocast == "bf16"  # after the accelerator moved it

    def forward(samples: list[Encoded]) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in collate(samples, assistant, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = answer_loss(trainer.module, batch)
        if moe_weight:
            aux = collect_aux_loss(model)
            if aux is not None:
                loss = loss + moe_weight * aux
        return loss

    def loss_fn(micro_step: int) -> torch.Tensor:
        idx = trainer.shard(batch_indices(len(train), cfg.optim.batch_size, micro_step, seed))
        return forward([train[i] for i in idx])

    def eval_fn() -> dict[str, float]:
        losses = [float(forward(val[i : i + cfg.optim.batch_size])) for i in range(0, len(val), cfg.optim.batch_size)]
        return {"val_loss": float(np.mean(losses))}

    trainer.fit(loss_fn, eval_fn if val else None, progress, stop_after)
    gathered = trainer.gathered_state()  # every process: under FSDP the weights are gathered whole
    if trainer.is_main:
        if gathered is not None:  # FSDP sharded the model in place: a fresh copy takes the trained weights
            assistant = build_assistant(recipe.assistant_config(stage))
            assistant.model.load_state_dict(gathered)
        trained = replace(assistant, config=assistant.config.with_changes(projector_trained=True))
        save_assistant(trained, directory / "assistant")
    return directory / "assistant"
