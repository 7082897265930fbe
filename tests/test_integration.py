"""The real shipped models: SmolLM2-135M-Instruct (GGUF → safetensors) and ImageNet EfficientNet-Lite0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from geochat import GeoChat
from geochat.model.weights import efficientnet_lite0_safetensors, smollm2_dir, smollm2_gguf

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default() -> GeoChat:
    return GeoChat.from_pretrained(max_new_tokens=12)


def test_gguf_conversion_matches_gguf_logits() -> None:
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir())
    gguf = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 3241]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, direct(ids).logits)


def test_efficientnet_weights_are_imagenet(tmp_path: Path) -> None:
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(load_file(str(efficientnet_lite0_safetensors())), strict=False)
    net.eval()
    # A smooth grey image and a high-frequency checkerboard land in different ImageNet classes, and
    # the checkerboard gets confident logits; random weights give near-uniform logits for both.
    grey = torch.zeros(1, 3, 224, 224)
    checker = torch.from_numpy(np.indices((224, 224)).sum(0) % 2 * 2.0 - 1.0).float().expand(1, 3, 224, 224)
    untrained = EfficientNet.from_name("efficientnet-lite0").eval()
    with torch.no_grad():
        logits = net(torch.cat([grey, checker]))
        random_logits = untrained(torch.cat([grey, checker]))
    assert logits.shape == (2, 1000)
    assert logits[1].std() > 10 * random_logits[1].std()
    assert logits[0].argmax() != logits[1].argmax()


def test_default_model_answers_about_a_real_geotiff(default: GeoChat, shared_data: Path) -> None:
    answer = default.chat(shared_data / "georef" / "landsat_rgb_utm18.tif", "Describe this image.")
    assert answer.answer.strip()
    assert answer.facts["crs"] == "EPSG:32618"
    assert "untrained" in answer.model.name or (REPO / "adapters" / "geochat-mini" / "geochat_config.json").exists()
    assert answer.model.llm == "smollm2"


def test_default_model_cached_turn_equals_uncached(default: GeoChat) -> None:
    image = (np.random.RandomState(3).rand(120, 90, 3) * 255).astype(np.uint8)
    first = default.chat(image, "What do you see?")
    second = default.chat(image, "Any roads?", history=[first.as_turn()])
    fresh = GeoChat(default.assistant, max_new_tokens=12)  # no sessions: recomputes everything
    assert fresh.chat(image, "Any roads?", history=[first.as_turn()]).raw == second.raw
