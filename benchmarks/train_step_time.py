"""Seconds per training step of each stage on the real shipped models (no data needed: random inputs).

- align: the hybrid tower's blocks + head on cached stem features (B × 49 × 1280), CLIP loss;
- retrieval_pixels: the whole tower trained from pixels (`trainable_stem_blocks: 16`): B augmented
  224-px images through every EfficientNet block, blocks + head, CLIP loss (bf16 autocast);
- pretrain / instruct: SmolLM2-135M-Instruct (+LoRA r 16 on every linear layer for instruct) on B
  sequences of L tokens with the image tokens spliced in, loss on the last 32 tokens;
- instruct_moe: the MoE-LoRA ablation arm (`adapters/ablation-moe-lora.yaml`): LoRA on attention, 4 LoRA
  experts (r 8, top-2) on the MLP projections.

These numbers size a recipe's `max_steps` for a time budget.

    .venv/bin/python benchmarks/train_step_time.py [--json] [--batch 128] [--chat-batch 4] [--length 160]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chat-batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from geochat.model.assistant import build_assistant
    from geochat.model.config import LoraSettings, offline_default_config
    from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
    from geochat.model.moe_lora import MoELoraSettings
    from geochat.train.align import AlignModel

    results: dict[str, float] = {"threads": torch.get_num_threads()}
    tower = GeoHybridVisionModel(GeoHybridVisionConfig())
    align = AlignModel(tower, 0.07).train()
    feats, text = torch.randn(args.batch, 49, 1280), torch.nn.functional.normalize(torch.randn(args.batch, 384), dim=-1)
    results["align_s_per_step"] = _time(lambda: align(feats, text).backward(), args.repeats)

    from geochat.train.align import augment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = GeoHybridVisionModel(GeoHybridVisionConfig(trainable_stem_blocks=16))
    full.load_stem_weights()
    whole = AlignModel(full, 0.07).to(device).train()
    images = torch.randint(0, 256, (args.batch, 224, 224, 3), dtype=torch.uint8, device=device)

    def pixel_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = whole(augment(images, [0, 1, 2, 3], (0.5,) * 3, (0.5,) * 3, 0.5), text.to(device))
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    results["retrieval_pixels_s_per_step"] = _time(pixel_step, args.repeats)

    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp = ("gate_proj", "up_proj", "down_proj")
    arms = (  # instruct = geochat-mini's LoRA (r 16 on every linear layer); instruct_moe = the MoE-LoRA arm
        ("pretrain", None, None),
        ("instruct", LoraSettings(r=16, alpha=32, target_modules=attention + mlp), None),
        ("instruct_moe", LoraSettings(r=16, alpha=32, target_modules=attention), MoELoraSettings(target_modules=mlp)),
    )
    for stage, lora, moe in arms:
        a = build_assistant(offline_default_config().with_changes(lora=lora, moe=moe))
        if lora is None:  # pretrain: the projector learns, the LLM is frozen
            a.model.model.multi_modal_projector.requires_grad_(True)
        n = a.num_image_tokens
        ids = torch.randint(0, 1000, (args.chat_batch, args.length))
        ids[:, 5 : 5 + n] = a.image_token_id
        labels = torch.full_like(ids, -100)
        labels[:, -32:] = ids[:, -32:]
        pixels = torch.randn(args.chat_batch, 3, a.image_size, a.image_size)
        a.model.train()
        results[f"{stage}_s_per_step"] = _time(
            lambda a=a, ids=ids, labels=labels, pixels=pixels: a.model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward(),
            args.repeats,
        )
    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in results.items()}))
    else:
        for k, v in results.items():
            print(f"{k:<24} {v:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
