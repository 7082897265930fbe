"""The assembled LLaVA model: tower, projector, adapters, quantization, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from geochat.errors import ModelLoadError
from geochat.model.assistant import build_assistant, load_assistant, save_assistant
from geochat.model.config import AssistantConfig
from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
from geochat.model.moe_lora import MoELoraLinear, MoELoraSettings, apply_moe_lora, collect_aux_loss
from tests.tiny import TINY_VISION, tiny_config


def _inputs(assistant):  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 64, 64)
    ids = torch.tensor([[5, 6] + [assistant.image_token_id] * assistant.num_image_tokens + [7, 8, 9]])
    return pixels, ids


def test_hybrid_tower_registered_with_auto_classes(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(**TINY_VISION)
    tower = AutoModel.from_config(config)
    assert isinstance(tower, GeoHybridVisionModel)
    out = tower(torch.randn(2, 3, 64, 64))
    assert out.last_hidden_state.shape == (2, 4, 32)  # 64 px / stride 32 = 2×2 patches
    assert out.pooler_output.shape == (2, 24)
    assert len(out.hidden_states) == 2  # embeddings + 1 block
    tower.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(torch.ones(1, 3, 64, 64)).pooler_output, tower(torch.ones(1, 3, 64, 64)).pooler_output)


def test_tower_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        GeoHybridVisionConfig(image_size=100)
    with pytest.raises(ValueError, match="unknown stem"):
        GeoHybridVisionConfig(stem="resnet")


def test_tower_rejects_wrong_band_count() -> None:
    tower = GeoHybridVisionModel(GeoHybridVisionConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"}))
    with pytest.raises(ValueError, match="expects 3 channels"):
        tower(torch.randn(1, 4, 64, 64))


def test_image_tokens_must_match_features(tiny_llm_dir: Path) -> None:
    a = build_assistant(tiny_config(tiny_llm_dir))
    pixels, ids = _inputs(a)
    short = ids[:, :-6]  # drops image tokens
    with pytest.raises(ValueError, match="do not match"):
        a.model(input_ids=short, pixel_values=pixels)


@pytest.mark.parametrize("variant", [{}, {"lora": True}, {"moe": True}, {"lora": True, "moe": True}, {"lora": True, "quantization": "4bit"}, {"quantization": "8bit"}])
def test_forward_backward_and_round_trip(tiny_llm_dir: Path, tmp_path: Path, variant: dict) -> None:
    a = build_assistant(tiny_config(tiny_llm_dir, **variant))
    pixels, ids = _inputs(a)
    a.model.train()
    out = a.model(input_ids=ids, pixel_values=pixels, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n for n, p in a.model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in a.model.named_parameters() if p.grad is not None}
    assert trainable, "something must be trainable"
    assert with_grad <= trainable
    llm_base = [n for n in trainable if "language_model" in n and "lora" not in n and "expert" not in n and "router" not in n]
    assert not llm_base, f"base LLM weights must stay frozen: {llm_base[:3]}"
    if variant.get("lora"):
        assert any("lora_A" in n for n in with_grad)
    if variant.get("moe"):
        assert any(n.endswith("expert_A") for n in with_grad)
        assert collect_aux_loss(a.model) is not None

    a.model.eval()
    save_assistant(a, tmp_path / "saved")
    assert not list((tmp_path / "saved").rglob("*.bin")) and not list((tmp_path / "saved").rglob("*.pt*"))
    b = load_assistant(tmp_path / "saved")
    with torch.no_grad():
        before = a.model(input_ids=ids, pixel_values=pixels).logits
        after = b.model(input_ids=ids, pixel_values=pixels).logits
        again = b.model(input_ids=ids, pixel_values=pixels).logits
    if variant.get("quantization") == "4bit":
        # bitsandbytes repacks 4-bit weights for the CPU kernel on first use; both paths are NF4.
        torch.testing.assert_close(after, again)
        torch.testing.assert_close(before, after, atol=1e-2, rtol=0)
    else:
        assert torch.equal(before, after)


def test_moe_lora_starts_as_identity_and_balances() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    model = torch.nn.Module()
    model.language_model = torch.nn.Module()
    model.language_model.layer = torch.nn.Module()
    model.language_model.layer.up_proj = base
    names = apply_moe_lora(model, MoELoraSettings(num_experts=4, top_k=2, r=2, target_modules=("up_proj",)))
    assert names == ["language_model.layer.up_proj"]
    layer = model.language_model.layer.up_proj
    assert isinstance(layer, MoELoraLinear)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), base(x))  # experts' B start at zero
    layer.train()
    layer(x)
    aux = collect_aux_loss(model)
    assert aux is not None and aux.item() >= 1.0 - 1e-5  # 1 only for perfectly balanced routing
    with pytest.raises(ValueError, match="top_k"):
        MoELoraSettings(num_experts=2, top_k=3)


def test_moe_lora_equals_per_token_top_k_definition() -> None:
    """y = W x + (alpha/r) Σ_{e∈topk} g_e B_e A_e x, token by token, with the same gradients."""
    torch.manual_seed(0)
    layer = MoELoraLinear(torch.nn.Linear(12, 10), MoELoraSettings(num_experts=4, top_k=2, r=3, alpha=6))
    torch.nn.init.normal_(layer.expert_B)  # B starts at zero; make the experts matter
    x = torch.randn(2, 7, 12)
    fast = layer(x)
    flat = x.reshape(-1, 12)
    probs = torch.softmax(layer.router(flat), -1)
    rows = []
    for t in range(flat.shape[0]):
        p, e = probs[t].topk(2)
        g = p / p.sum()
        rows.append(layer.base(flat[t]) + 2.0 * sum(
            g[j] * (flat[t] @ layer.expert_A[e[j]] @ layer.expert_B[e[j]]) for j in range(2)))
    slow = torch.stack(rows).reshape(2, 7, 10)
    torch.testing.assert_close(fast, slow)
    grads = [torch.autograd.grad(y.square().sum(), [layer.expert_A, layer.expert_B, layer.router.weight])
             for y in (fast, slow)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_config_json_round_trip_and_errors(tmp_path: Path) -> None:
    cfg = tiny_config(Path("/nonexistent"), lora=True, moe=True)
    assert AssistantConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ModelLoadError, match="not a geochat assistant directory"):
        load_assistant(tmp_path)
    (tmp_path / "geochat_config.json").write_text('{"format_version": 99}')
    with pytest.raises(ModelLoadError, match="unsupported"):
        load_assistant(tmp_path)
    with pytest.raises(ValueError, match="quantization"):
        cfg.with_changes(quantization="3bit")


def test_unloadable_llm_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load the language model"):
        build_assistant(tiny_config(tmp_path / "missing-llm"))


def test_hf_vision_tower_and_llava_checkpoint_path(tiny_llm_dir: Path, tmp_path: Path) -> None:
    """Any HF vision config plugs in (a tiny CLIP here), and a transformers LLaVA checkpoint loads."""
    from transformers import CLIPImageProcessor

    clip = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    cfg = AssistantConfig(name="tiny-clip", llm=str(tiny_llm_dir), vision=clip, vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
    a = build_assistant(cfg)
    assert a.num_image_tokens == 16  # (32/8)², CLS dropped by the "default" strategy
    assert a.encode_images(torch.randn(1, 3, 32, 32)).shape == (1, 16, 64)

    # Write it out the way llava-hf checkpoints are laid out, then load it through that path.
    ckpt = tmp_path / "llava-ckpt"
    a.model.save_pretrained(ckpt)
    a.tokenizer.save_pretrained(ckpt)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(ckpt)
    b = load_assistant(ckpt)
    assert b.config.llava_checkpoint == str(ckpt) and b.num_image_tokens == 16
    ids = torch.tensor([[5] + [a.image_token_id] * 16 + [7]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.model(input_ids=ids, pixel_values=pixels).logits, b.model(input_ids=ids, pixel_values=pixels).logits)


def test_importing_geochat_with_peft_prints_no_missing_kernel_warning() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import geochat, peft"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "kernels-community" not in proc.stderr, proc.stderr  # a Python API user's stderr
