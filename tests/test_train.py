"""Training: labels only on answers, resume after a kill equals an uninterrupted run, every stage
runs on tiny models and generated data, the trained assistant loads and chats, `accelerate launch`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from geochat import GeoChat
from geochat.errors import GeoChatError
from geochat.generation import prompt_ids
from geochat.model.assistant import build_assistant
from geochat.train.chat import IGNORE, Encoded, answer_loss, collate, encode_conversation
from geochat.train.loop import TrainingInterrupted, batch_indices
from geochat.train.recipe import load_recipe
from geochat.train.run import run_recipe
from tests.tiny import TINY_VISION, tiny_config

REPO = Path(__file__).resolve().parents[1]
VISION = {**TINY_VISION, "projection_dim": 384}  # the dual-encoder head matches MiniLM


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 captioned 32-px images (RSICD format) and LLaVA conversations about them."""
    root = tmp_path_factory.mktemp("train-data")
    (root / "images").mkdir()
    rng = np.random.RandomState(0)
    rows, convs = [], []
    for i in range(8):
        label = ["airport", "forest"][i % 2]
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "split": "val" if i >= 6 else "train", "label": label,
                     "captions": [f"a {label} seen from above number {i} .", f"this is a {label} ."]})
        convs.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"A {label}."}]})
    (root / "ann.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "conv.json").write_text(json.dumps(convs))
    return root


def _recipe(tmp: Path, data: Path, llm: Path, stages: dict, run: dict | None = None, **model: object) -> Path:
    recipe = {"name": "tiny", "output": str(tmp / "out"),
              "model": {"llm": str(llm), "vision": VISION, **model},
              "run": {"seed": 0, "log_every": 1, "eval_every": 2, "save_every": 1, "cache_dir": str(tmp / "cache"),
                      **(run or {})},
              **stages}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _search_recipe(tmp: Path, data: Path, llm: Path, retrieval: dict) -> Path:
    """A recipe of the retrieval stage alone, on a tower with the shipped EfficientNet stem."""
    path = _recipe(tmp, data, llm, {"retrieval": retrieval})
    recipe = yaml.safe_load(path.read_text())
    vision = {k: v for k, v in VISION.items() if k != "conv_stem_channels"}
    recipe["model"]["vision"] = vision | {"stem": "efficientnet-lite0"}
    path.write_text(yaml.safe_dump(recipe))
    return path


def _align(data: Path, steps: int = 6, **extra: object) -> dict:
    return {"align": {"annotations": str(data / "ann.jsonl"), "max_images": 5, "val_max": 2,
                      "optim": {"lr": 1e-2, "batch_size": 4, "max_steps": steps}, **extra}}


def test_labels_only_on_answers(tiny_llm_dir: Path) -> None:
    a = build_assistant(tiny_config(tiny_llm_dir))
    conv = [{"from": "human", "value": "<image>\nwhat is this?"}, {"from": "gpt", "value": "a lake"},
            {"from": "human", "value": "and the river?"}, {"from": "gpt", "value": "green farmland"}]
    ids, labels = encode_conversation(a, conv)
    assert len(ids) == len(labels) and ids.count(a.image_token_id) == a.num_image_tokens
    kept = [t for t, lab in zip(ids, labels, strict=False) if lab != IGNORE]
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels, strict=False))
    eos = a.tokenizer.eos_token
    assert a.tokenizer.decode(kept) == f"a lake{eos}green farmland{eos}"
    assert labels[-1] == a.tokenizer.eos_token_id and ids[-1] == a.tokenizer.eos_token_id
    # the prompt of the first answer is exactly what the engine builds at inference
    prompt = prompt_ids(a, [], "what is this?", with_image=True)
    assert ids[: len(prompt)] == prompt and all(lab == IGNORE for lab in labels[: len(prompt)])
    with pytest.raises(ValueError):
        encode_conversation(a, [{"from": "human", "value": "x <image>"}, {"from": "gpt", "value": "y"}])


def test_answer_loss_equals_the_full_causal_lm_loss(tiny_llm_dir: Path, data: Path) -> None:
    """Left padding, explicit positions and logits only over the answers give the usual loss exactly."""
    a = build_assistant(tiny_config(tiny_llm_dir))
    convs = [[{"from": "human", "value": "<image>\nwhat is this?"}, {"from": "gpt", "value": "a lake"}],
             [{"from": "human", "value": "<image>\ndescribe the scene in a few words please"},
              {"from": "gpt", "value": "green farmland and a long river beside a road"}]]
    samples = [Encoded(data / "images" / "0.png", *encode_conversation(a, c)) for c in convs]
    assert len(samples[0].input_ids) != len(samples[1].input_ids)  # padding is exercised
    pad = a.pad_token_id
    a.model.eval()
    with torch.no_grad():
        ours = answer_loss(a.model, collate(samples, a, pad))
        # reference: each sample alone (no padding), the model's own loss over all its logits, token-weighted
        total = count = 0.0
        for s in samples:
            batch = collate([s], a, pad)
            batch.pop("position_ids")
            n = sum(lab != IGNORE for lab in s.labels) - 0  # labels shift by one inside the model
            total += float(a.model(**batch).loss) * (n - (1 if s.labels[0] != IGNORE else 0))
            count += n
    torch.testing.assert_close(float(ours), total / count, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="without any answer"):
        answer_loss(a.model, {**collate(samples, a, pad), "labels": torch.full((2, 3), IGNORE)})


def test_batches_are_a_function_of_the_step() -> None:
    assert batch_indices(10, 4, 3, seed=1) == batch_indices(10, 4, 3, seed=1)
    epoch0 = sum((batch_indices(10, 5, s, 0) for s in range(2)), [])
    assert sorted(epoch0) == list(range(10))


def test_align_resume_after_kill_matches_uninterrupted(tmp_path: Path, data: Path, tiny_llm_dir: Path) -> None:
    straight = run_recipe(load_recipe(_recipe(tmp_path / "a", data, tiny_llm_dir, _align(data))), progress=False)
    recipe = load_recipe(_recipe(tmp_path / "b", data, tiny_llm_dir, _align(data)))
    with pytest.raises(TrainingInterrupted):
        run_recipe(recipe, progress=False, stop_after=3)
    state = json.loads((tmp_path / "b" / "out" / "align" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    resumed = run_recipe(recipe, resume=True, progress=False)
    log = [json.loads(x) for x in (tmp_path / "b" / "out" / "align" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "step" in r and "loss" in r] == [1, 2, 3, 4, 5, 6]  # continues at 4
    a, b = load_file(str(straight / "vision" / "model.safetensors")), load_file(str(resumed / "vision" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert (tmp_path / "b" / "out" / "align" / "loss.png").stat().st_size > 1000
    assert any("zero_shot_acc" in r.get("eval", {}) for r in log)
    with pytest.raises(Exception, match="not empty"):
        run_recipe(recipe, progress=False)


def test_align_label_term_separates_the_labels() -> None:
    """The label term alone (captions identical, so the CLIP term is constant) teaches the tower the labels."""
    from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
    from geochat.train.align import AlignModel

    torch.manual_seed(0)
    tower = GeoHybridVisionModel(GeoHybridVisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"}))
    model = AlignModel(tower, temperature=0.07)
    n, c = tower.config.num_patches, tower.config.stem_channels
    labels = torch.tensor([0, 1] * 4)
    centers = torch.randn(2, 1, c)
    feats = centers[labels] + 0.3 * torch.randn(8, n, c)  # stem features of two kinds of scene
    label_emb = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(1, 384), dim=-1).expand(8, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = float(model(feats, text, labels, label_emb, 1.0))
    assert first > float(model(feats, text))  # the term is added
    for _ in range(60):
        loss = model(feats, text, labels, label_emb, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert ((model.embed(feats) @ label_emb.T).argmax(1) == labels).all()
        assert float(model(feats, text, labels, label_emb, 1.0)) < first - 0.5


def test_align_all_captions_pulls_each_image_to_every_caption_it_has() -> None:
    """`captions: all`: one text an image is the plain CLIP loss; three an image, each text finds its image."""
    from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
    from geochat.train.align import AlignModel

    torch.manual_seed(0)
    tower = GeoHybridVisionModel(GeoHybridVisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"}))
    model = AlignModel(tower, temperature=0.07)
    feats = torch.randn(6, tower.config.num_patches, tower.config.stem_channels)
    one = torch.nn.functional.normalize(torch.randn(6, 384), dim=-1)
    torch.testing.assert_close(model(feats, one, owner=torch.arange(6)), model(feats, one))
    owner = torch.arange(6).repeat_interleave(3)
    texts = torch.nn.functional.normalize(torch.randn(6, 1, 384) + 0.5 * torch.randn(6, 3, 384), dim=-1).reshape(18, 384)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = float(model(feats, texts, owner=owner))
    for _ in range(80):
        loss = model(feats, texts, owner=owner)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert ((texts @ model.embed(feats).T).argmax(1) == owner).all()
        assert float(model(feats, texts, owner=owner)) < first - 0.5


def test_query_bank_pulls_a_query_toward_the_images_of_captions_like_it(tmp_path: Path) -> None:
    from geochat.errors import ModelLoadError
    from geochat.train.dual_encoder import QueryBank

    torch.manual_seed(0)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    keys, values = unit(torch.randn(50, 384)), unit(torch.randn(50, 384))
    bank = QueryBank(keys, values, k=5, tau=0.03, weight=0.5)
    query = unit(keys[7] + 0.3 * unit(torch.randn(384))).numpy()[None]
    out = bank.expand(query)
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert float(out[0] @ values[7].numpy()) > float(query[0] @ values[7].numpy()) + 0.2  # toward image 7
    assert np.allclose(QueryBank(keys, values, weight=0.0).expand(query), query, atol=1e-6)
    stranger = unit(torch.randn(384)).numpy()[None]  # resembles no key (cosine about 0): below the floor
    assert float(bank.expand(stranger)[0] @ stranger[0]) > 0.999
    unfloored = QueryBank(keys, values, k=5, tau=0.03, weight=0.5, floor=-1.0).expand(stranger)
    assert float(unfloored[0] @ stranger[0]) < 0.95
    loaded = QueryBank.load(bank.save(tmp_path / "bank.safetensors"))  # int8 rows, float16 scales
    assert (loaded.k, loaded.tau, loaded.weight, loaded.floor) == (5, 0.03, 0.5, 0.55)
    assert torch.nn.functional.cosine_similarity(loaded.values, values).min() > 0.999
    assert float(loaded.expand(query)[0] @ out[0]) > 0.999

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelLoadError, match="not a query bank"):
        QueryBank.load(tmp_path / "other.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="not a query bank"):
        QueryBank.load(tmp_path / "corrupt.safetensors")
    bad = bank.save(tmp_path / "bad.safetensors")
    from safetensors import safe_open

    with safe_open(str(bad), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    save_file(tensors, str(bad), metadata={**meta, "tau": "0"})  # every expanded query would be NaN
    with pytest.raises(ModelLoadError, match="tau > 0"):
        QueryBank.load(bad)
    with pytest.raises(ValueError, match="one shape"):
        QueryBank(keys, values[:, :10])
    save_file(tensors, str(bad), metadata={k: v for k, v in meta.items() if not k.startswith("hub_")})
    old = QueryBank.load(bad)
    assert (old.hub_weight, old.hub_beta, old.hub_floor) == (0.75, 30.0, -0.05)  # older banks: today's
    save_file(tensors, str(bad), metadata={**meta, "hub_beta": "0"})
    with pytest.raises(ModelLoadError, match="hub_beta > 0"):
        QueryBank.load(bad)


def test_query_bank_lowers_images_crowded_by_its_caption_keys(tmp_path: Path) -> None:
    """Hubness: an image near many training captions would top every query like them; its offset is larger
    than an isolated image's, offsets are centred on the bank's own images, and weight 0 turns them off."""
    from geochat.train.dual_encoder import QueryBank

    gen = torch.Generator().manual_seed(0)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    hub, alone = unit(torch.randn(2, 384, generator=gen))
    keys = unit(torch.cat([hub + 0.3 * unit(torch.randn(30, 384, generator=gen)), torch.randn(30, 384, generator=gen)]))
    values = unit(keys + 0.3 * unit(torch.randn(60, 384, generator=gen)))  # training images beside their captions
    bank = QueryBank(keys, values, hub_weight=0.75, hub_beta=30.0, hub_floor=-0.05)
    offsets = bank.image_offsets(torch.stack([hub, alone]).numpy())
    assert offsets.shape == (2,) and offsets[0] > 0.04 and offsets[0] > offsets[1] + 0.05
    assert offsets[1] == pytest.approx(0.75 * -0.05)  # an empty neighbourhood lifts an image by at most this
    unfloored = QueryBank(keys, values, hub_weight=0.75, hub_beta=30.0, hub_floor=-float("inf"))
    assert abs(float(unfloored.image_offsets(values.numpy()).mean())) < 1e-5  # the bank's own images: centred at 0
    crowding = torch.logsumexp(30 * torch.stack([hub, alone]) @ keys.T, dim=1) / 30
    free = unfloored.image_offsets(torch.stack([hub, alone]).numpy())
    assert free[0] == pytest.approx(offsets[0]) and free[1] < offsets[1]
    assert free[0] - free[1] == pytest.approx(0.75 * float(crowding[0] - crowding[1]), abs=1e-5)
    assert not QueryBank(keys, values, hub_weight=0.0).image_offsets(values.numpy()).any()
    stored = QueryBank.load(bank.save(tmp_path / "bank.safetensors"))  # c is written with the bank, not recomputed
    assert stored.hub_centre == pytest.approx(bank._mean_crowding, abs=1e-6)
    assert np.allclose(stored.image_offsets(torch.stack([hub, alone]).numpy()), offsets, atol=0.01)  # int8 rows
    with pytest.raises(ValueError, match="hub_weight >= 0"):
        QueryBank(keys, values, hub_weight=-1.0)
    with pytest.raises(ValueError, match="hub_floor <= 0"):
        QueryBank(keys, values, hub_floor=0.1)


def test_image_embedding_is_the_same_for_every_quarter_turn() -> None:
    from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
    from geochat.train.dual_encoder import tower_embedding

    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY_VISION.items() if k != "model_type"}
    tower = GeoHybridVisionModel(GeoHybridVisionConfig(**cfg)).eval()
    pixels = torch.randn(3, 3, 64, 64)
    turned = torch.rot90(pixels, 1, dims=(2, 3))
    four = tower_embedding(tower, pixels)
    np.testing.assert_allclose(four, tower_embedding(tower, turned), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(four, axis=1), 1.0, atol=1e-5)
    one = tower_embedding(tower, pixels, rotations=1)  # a single view is what the tower alone gives
    np.testing.assert_allclose(one, torch.nn.functional.normalize(tower(pixel_values=pixels).pooler_output, dim=-1).detach().numpy(), atol=1e-6)
    assert not np.allclose(one, tower_embedding(tower, turned, rotations=1), atol=1e-3)
    with pytest.raises(ValueError, match="rotations"):
        tower_embedding(tower, pixels, rotations=3)


def test_trainable_stem_tail_computes_what_the_frozen_stem_does() -> None:
    from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel

    torch.manual_seed(0)
    small = {"image_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64}
    frozen = GeoHybridVisionModel(GeoHybridVisionConfig(**small))
    frozen.load_stem_weights()
    tail = GeoHybridVisionModel(GeoHybridVisionConfig(**small, trainable_stem_blocks=1))
    tail.load_state_dict(frozen.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    assert tail.stem_features(pixels).shape == (2, 4, 192)  # the input of the last MBConv block
    with torch.no_grad():
        torch.testing.assert_close(tail.eval()(pixel_values=pixels).pooler_output,
                                   frozen.eval()(pixel_values=pixels).pooler_output)
    trained = {n.split(".")[1] for n, p in tail.named_parameters() if p.requires_grad and n.startswith("stem.")}
    assert trained == {"_blocks", "_conv_head", "_bn1"}
    assert all(n.startswith("stem._blocks.15.") for n, p in tail.named_parameters()
               if p.requires_grad and n.startswith("stem._blocks"))
    assert tail.is_saved_weight("stem._conv_head.weight") and not frozen.is_saved_weight("stem._conv_head.weight")
    assert not tail.is_saved_weight("stem._blocks.14._project_conv.weight")
    with pytest.raises(ValueError, match="trainable_stem_blocks"):
        GeoHybridVisionConfig(trainable_stem_blocks=17)


def test_stem_cache_of_a_rotation_is_the_stem_of_the_turned_image(tmp_path: Path, data: Path) -> None:
    from geochat.model.hybrid_tower import GeoHybridVisionConfig, GeoHybridVisionModel
    from geochat.model.processor import to_pixel_values
    from geochat.train.features import cache_stem_features, read_rgb

    tower = GeoHybridVisionModel(GeoHybridVisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"}))
    images = sorted((data / "images").glob("*.png"))[:3]
    mean = std = (0.5, 0.5, 0.5)
    plain = cache_stem_features(tower, images, tmp_path, mean, std, progress=False)
    turned = cache_stem_features(tower, images, tmp_path, mean, std, progress=False, rotation=1)
    assert len(list(tmp_path.glob("stem-*.npy"))) == 2  # one file per rotation
    pixels = torch.cat([to_pixel_values(read_rgb(p), 64, mean, std) for p in images])
    expected = tower.stem_features(torch.rot90(pixels, 1, dims=(2, 3))).detach().numpy()
    assert np.abs(np.asarray(turned, dtype=np.float32) - expected).max() < 1e-4  # float16 rounding only
    assert np.abs(np.asarray(plain, dtype=np.float32) - expected).max() > 1e-3


def test_lr_scales_multiply_the_schedule_per_parameter_group(tmp_path: Path) -> None:
    from geochat.train.loop import Trainer
    from geochat.train.recipe import OptimConfig, RunConfig

    module = torch.nn.ModuleDict({"stem": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 1)})
    trainer = Trainer("t", module, OptimConfig(lr=0.1, max_steps=1), RunConfig(), tmp_path, lr_scales={"stem.": 0.25})
    x = torch.randn(4, 2)
    trainer.fit(lambda step: module["head"](module["stem"](x)).pow(2).mean(), progress=False)
    lrs = {round(g["lr_scale"], 2): g["lr"] for g in trainer.optimizer.param_groups}
    assert set(lrs) == {0.25, 1.0} and lrs[0.25] == pytest.approx(0.25 * lrs[1.0]) and lrs[1.0] > 0


def _retrained_copy(search: Path, other: Path) -> Path:
    """A copy of the search tower directory `search` whose tower has changed (one weight moved), as if retrained
    in place: what it holds beside the tower (bank, text head) now belongs to another tower."""
    shutil.copytree(search, other)
    weights = load_file(str(other / "vision" / "model.safetensors"))
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key] + 0.01
    save_file(weights, str(other / "vision" / "model.safetensors"))
    return other


def test_retrieval_stage_trains_a_search_tower_that_the_dual_encoder_uses(tmp_path: Path, data: Path,
                                                                          tiny_llm_dir: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    from geochat.eval.tasks import load_dual
    from geochat.retrieval.embedders import TowerEmbedder

    vision = {k: v for k, v in VISION.items() if k != "conv_stem_channels"} | {"stem": "efficientnet-lite0"}
    retrieval = {**_align(data, steps=2)["align"], "rotations": 4, "stem_lr_scale": 0.5,
                 "vision": {"trainable_stem_blocks": 1}, "query_bank": True}
    path = _recipe(tmp_path, data, tiny_llm_dir, {**_align(data, steps=2), "retrieval": retrieval})
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["vision"] = vision
    path.write_text(yaml.safe_dump(recipe))
    final = run_recipe(load_recipe(path), progress=False, use_accelerate=False)

    chat_tower = load_file(str(final / "vision" / "model.safetensors"))
    search_tower = load_file(str(final / "retrieval" / "vision" / "model.safetensors"))
    assert not any(k.startswith("stem.") for k in chat_tower)  # the chat stages' tower: stem frozen, not saved
    from geochat.model.weights import efficientnet_lite0_safetensors

    imagenet = load_file(str(efficientnet_lite0_safetensors()))
    key = "_blocks.15._project_conv.weight"
    assert not torch.allclose(search_tower[f"stem.{key}"], imagenet[key])  # the last block trained
    assert len(list((tmp_path / "cache").glob("stem-*.npy"))) == 1 + 4 + 1 + 4  # train/val: 1 view, then 4
    assert load_dual(str(final)).tower.config.trainable_stem_blocks == 1
    assert TowerEmbedder(final / "retrieval").tower.config.trainable_stem_blocks == 1
    assert TowerEmbedder(final).tower.config.trainable_stem_blocks == 0  # a recorded name is taken exactly
    # the query bank: one entry per training image, used for search queries (not for label prompts)
    from geochat.errors import GeoChatError
    from geochat.train.dual_encoder import QUERY_BANK
    from geochat.train.query_bank import main as query_bank_main
    from geochat.train.query_bank import write_query_bank

    dual = load_dual(str(final))
    assert dual.bank is not None and len(dual.bank.keys) == 5  # max_images
    plain, expanded = dual.embed_texts(["an airport"]), dual.embed_queries(["an airport"])
    assert 0.5 < float(plain[0] @ expanded[0]) < 0.9999
    searched = TowerEmbedder(final / "retrieval").embed_text("an airport")
    assert np.allclose(searched, expanded[0], atol=1e-4)
    assert np.allclose(TowerEmbedder(final).embed_text("an airport"), plain[0], atol=1e-4)  # no bank there
    written = dual.bank
    write_query_bank(path, final / "retrieval", progress=False)  # the command, from the saved tower
    from geochat.train.dual_encoder import QueryBank

    again = QueryBank.load(final / "retrieval" / QUERY_BANK)
    with pytest.raises(GeoChatError, match="holds no trained tower"):
        write_query_bank(path, tmp_path / "elsewhere", progress=False)
    with pytest.raises(SystemExit, match="^error: .* holds no trained tower"):  # the command: one line, no traceback
        query_bank_main([str(path), str(tmp_path / "elsewhere"), "--quiet"])
    torch.testing.assert_close(again.keys, written.keys)
    assert torch.nn.functional.cosine_similarity(again.values, written.values).min() > 0.999
    # the bank knows its tower (the fingerprint survives float16 storage); beside another tower it is skipped
    from geochat.train.dual_encoder import DualEncoder, load_query_bank, tower_fingerprint

    assert written.tower == again.tower == tower_fingerprint(final / "retrieval") != ""
    labels = ["airport", "forest"]
    assert np.allclose(dual.embed_labels(labels), DualEncoder(dual.tower, dual.text).embed_labels(labels))
    other = _retrained_copy(final / "retrieval", tmp_path / "retrained")
    with caplog.at_level(logging.WARNING):
        assert load_query_bank(other) is None
    assert "built for another tower" in caplog.text
    assert not np.allclose(TowerEmbedder(other).embed_text("an airport"), expanded[0], atol=1e-4)
    broken = yaml.safe_load(path.read_text())
    broken["retrieval"]["annotations"] = "missing.jsonl"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(SystemExit, match="^error: annotations file .*missing.jsonl not found"):
        query_bank_main([str(tmp_path / "broken.yaml"), str(final / "retrieval"), "--quiet"])
    # the periodic validation of the retrieval stage reports the four-view metrics
    log = [json.loads(line) for line in (tmp_path / "out" / "retrieval" / "log.jsonl").read_text().splitlines()]
    assert any("t2i_R@10" in r.get("eval", {}) for r in log)


def test_augment_gives_a_turned_or_mirrored_image_up_to_brightness_and_contrast() -> None:
    from geochat.train.align import augment

    torch.manual_seed(0)
    image = (torch.rand(1, 32, 32, 3) * 255).to(torch.uint8).repeat(16, 1, 1, 1)
    out = augment(image, [0, 1, 2, 3], (0.5,) * 3, (0.5,) * 3, crop_min=1.0)
    plain = image[0].permute(2, 0, 1).float()
    views = [torch.rot90(v, k, dims=(1, 2)) for v in (plain, plain.flip(2)) for k in range(4)]

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float(a @ b / (a.norm() * b.norm()))

    best = [max(range(8), key=lambda j, o=o: corr(o, views[j])) for o in out]
    assert all(corr(o, views[j]) > 0.99 for o, j in zip(out, best, strict=True))  # no crop: only colour moves
    assert len(set(best)) >= 4  # turns and mirrors vary within a batch
    cropped = augment(image, [0], (0.5,) * 3, (0.5,) * 3, crop_min=0.3)
    assert max(corr(o, v) for o in cropped for v in views) < 0.99  # crops zoom in


def test_retrieval_stage_from_pixels_trains_every_block_and_packs(tmp_path: Path, data: Path, tiny_llm_dir: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from geochat.eval.tasks import load_dual
    from geochat.model.weights import efficientnet_lite0_safetensors
    from geochat.train.pack import read_pack, train_from_pack, write_pack

    retrieval = {**_align(data, steps=2)["align"], "rotations": 4, "stem_lr_scale": 0.5,
                 "vision": {"trainable_stem_blocks": 16}}
    path = _search_recipe(tmp_path, data, tiny_llm_dir, retrieval)
    with caplog.at_level("WARNING", logger="geochat.train.align"):
        final = run_recipe(load_recipe(path), progress=False, use_accelerate=False)
    assert "from pixels on the CPU" in caplog.text  # hours on a CPU: the user is told

    search_tower = load_file(str(final / "retrieval" / "vision" / "model.safetensors"))
    imagenet = load_file(str(efficientnet_lite0_safetensors()))
    key = "_blocks.0._depthwise_conv.weight"
    assert not torch.allclose(search_tower[f"stem.{key}"], imagenet[key])  # the first block trained too
    assert "stem._conv_stem.weight" not in search_tower  # the frozen first convolution is not saved
    assert not list((tmp_path / "cache").glob("stem-*.npy"))  # from pixels: no stem cache
    assert load_dual(str(final)).tower.config.trainable_stem_blocks == 16
    log = [json.loads(line) for line in (tmp_path / "out" / "retrieval" / "log.jsonl").read_text().splitlines()]
    assert any("t2i_R@10" in r.get("eval", {}) for r in log)
    # killed after step 1 and resumed, it ends where the uninterrupted run did (augmentation is seeded per step)
    with pytest.raises(TrainingInterrupted):
        run_recipe(load_recipe(path), tmp_path / "killed", progress=False, stop_after=1, use_accelerate=False)
    resumed = run_recipe(load_recipe(path), tmp_path / "killed", resume=True, progress=False, use_accelerate=False)
    again = load_file(str(resumed / "retrieval" / "vision" / "model.safetensors"))
    for k in search_tower:
        torch.testing.assert_close(again[k], search_tower[k], rtol=0, atol=1e-5)

    # a pack carries the same data: WebP images, int8 caption embeddings, the stem's tensors
    pack = write_pack(load_recipe(path), tmp_path / "pack", quality=90, progress=False)
    packed, stem = read_pack(pack, [0, 1, 2, 3])
    assert packed.train.arrays[0].shape == (5, 64, 64, 3) and packed.val is not None and len(packed.val) == 2
    assert torch.allclose(stem["_blocks.0._depthwise_conv.weight"], imagenet[key], atol=1e-3)
    from geochat.train.align import load_align_data
    from geochat.train.dual_encoder import TextEncoder

    original = load_align_data(load_recipe(path), load_recipe(path).retrieval, load_dual(str(final)).tower,
                               TextEncoder(), progress=False)
    assert np.min(np.sum(packed.text * original.text, axis=1)) > 0.999
    diff = np.abs(packed.train.arrays[0].astype(int) - original.train.arrays[0]).mean(axis=(1, 2, 3))
    assert diff.max() < 25  # lossy (noise is WebP's worst case); another image would differ by ~85
    out = train_from_pack(load_recipe(path), pack, tmp_path / "from-pack", progress=False)
    assert load_file(str(out / "vision" / "model.safetensors")).keys() == search_tower.keys()
    cached = yaml.safe_load(path.read_text())
    cached["retrieval"]["vision"]["trainable_stem_blocks"] = 4
    path.write_text(yaml.safe_dump(cached))
    with pytest.raises(ValueError, match="above 4"):  # a pack holds pixels, not cached stem features
        train_from_pack(load_recipe(path), pack, tmp_path / "cached", progress=False)
    cached["retrieval"]["vision"]["trainable_stem_blocks"] = 16
    cached["retrieval"] |= {"text_head": True, "text_layers": 1}
    path.write_text(yaml.safe_dump(cached))
    with pytest.raises(GeoChatError, match="holds only their embeddings"):  # MiniLM's LoRA reads the captions
        train_from_pack(load_recipe(path), pack, tmp_path / "text-layers", progress=False)
    with pytest.raises(GeoChatError, match="not a training pack"):
        read_pack(tmp_path / "out", [0])
    without_val = write_pack(load_recipe(path), tmp_path / "pack2", val_images=False, progress=False)
    assert read_pack(without_val, [0])[0].val is None


def test_align_recipe_with_labels_runs_and_validates(tmp_path: Path, data: Path, tiny_llm_dir: Path) -> None:
    from geochat.errors import GeoChatError

    final = run_recipe(load_recipe(_recipe(tmp_path, data, tiny_llm_dir, _align(data, steps=2, label_weight=0.5))),
                       progress=False, use_accelerate=False)
    assert (final / "vision" / "model.safetensors").is_file()
    with pytest.raises(Exception, match="label_weight"):
        load_recipe(_recipe(tmp_path / "bad", data, tiny_llm_dir, _align(data, label_weight=-1)))
    with pytest.raises(Exception, match="captions"):
        load_recipe(_recipe(tmp_path / "bad2", data, tiny_llm_dir, _align(data, captions="some")))
    with pytest.raises(Exception, match="captions: a value is needed"):  # an empty key is not "one"
        load_recipe(_recipe(tmp_path / "bad3", data, tiny_llm_dir, _align(data, captions=None)))
    from geochat.train.recipe import AlignConfig

    with pytest.raises(ValueError, match="captions must be"):  # built in Python, not through the loader
        AlignConfig(annotations="a.jsonl", captions="some")  # type: ignore[arg-type]
    base = yaml.safe_load(_recipe(tmp_path / "base", data, tiny_llm_dir, _align(data)).read_text())
    for n, (change, words) in enumerate([
        ({"model": {**base["model"], "vision": {**base["model"]["vision"], "hiden_size": 64}}}, "hiden_size"),
        ({"model": {**base["model"], "vision": [1]}}, "must be a mapping"),
        ({"model": {**base["model"], "lora": {"target_modules": 5}}}, "list of module names"),
        ({"align": {**base["align"], "optim": {"lr": "fast"}}}, "expected a number"),
    ]):
        bad = tmp_path / f"bad-{n}.yaml"
        bad.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(GeoChatError, match=words):
            load_recipe(bad)


def test_align_stage_with_all_captions_trains_and_resumes(tmp_path: Path, data: Path, tiny_llm_dir: Path) -> None:
    stages = _align(data, steps=4, captions="all", label_weight=0.5)
    straight = run_recipe(load_recipe(_recipe(tmp_path / "a", data, tiny_llm_dir, stages)), progress=False,
                          use_accelerate=False)
    recipe = load_recipe(_recipe(tmp_path / "b", data, tiny_llm_dir, stages))
    with pytest.raises(TrainingInterrupted):
        run_recipe(recipe, progress=False, stop_after=2, use_accelerate=False)
    stage = tmp_path / "b" / "out" / "align"  # as if killed between the checkpoint save's two renames
    (stage / "checkpoint").rename(stage / ".checkpoint.old")
    with (stage / "log.jsonl").open("a") as f:  # ... and after logging a step that no checkpoint holds
        f.write(json.dumps({"step": 3, "loss": 9.9}) + "\n")
    resumed = run_recipe(recipe, resume=True, progress=False, use_accelerate=False)
    a, b = load_file(str(straight / "vision" / "model.safetensors")), load_file(str(resumed / "vision" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    log = [json.loads(x) for x in (tmp_path / "a" / "out" / "align" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    steps = [r["step"] for r in map(json.loads, (stage / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # continued from step 2, not started again


def test_all_stages_give_an_assistant_that_chats(tmp_path: Path, data: Path, tiny_llm_dir: Path) -> None:
    chat = {"conversations": str(data / "conv.json"), "val_samples": 2, "max_length": 256,
            "optim": {"lr": 1e-3, "batch_size": 2, "max_steps": 2}}
    stages = {**_align(data, steps=2), "pretrain": chat, "instruct": chat}
    path = _recipe(tmp_path, data, tiny_llm_dir, stages, run={"save_dtype": "float16"},
                   lora={"r": 4, "alpha": 8, "dropout": 0.0})
    final = run_recipe(load_recipe(path), progress=False)
    weights = sorted(final.rglob("*.safetensors"))
    assert len(weights) == 3 and all(v.dtype == torch.float16 for w in weights for v in load_file(str(w)).values())
    cfg = json.loads((final / "geochat_config.json").read_text())
    assert cfg["projector_trained"] and cfg["lora"]["r"] == 4
    gc = GeoChat.from_pretrained(final, max_new_tokens=4)
    assert "untrained" not in gc.model_info.name
    assert isinstance(gc.chat((np.random.rand(32, 32, 3) * 255).astype(np.uint8), "what is this?").answer, str)
    # the aligned tower went into the assistant and was saved with it
    aligned = load_file(str(tmp_path / "out" / "align" / "vision" / "model.safetensors"))
    pretrained = load_file(str(tmp_path / "out" / "pretrain" / "assistant" / "vision" / "model.safetensors"))
    torch.testing.assert_close(aligned["head.weight"], pretrained["head.weight"])
    assert (tmp_path / "out" / "instruct" / "loss.png").is_file()


def test_instruct_qlora_and_moe_one_step(tmp_path: Path, data: Path, tiny_llm_dir: Path) -> None:
    chat = {"conversations": str(data / "conv.json"), "val_samples": 0, "max_length": 256,
            "optim": {"lr": 1e-3, "batch_size": 2, "max_steps": 1}}
    path = _recipe(tmp_path, data, tiny_llm_dir, {"instruct": chat}, quantization="4bit",
                   lora={"r": 4, "alpha": 8, "dropout": 0.0},
                   moe={"num_experts": 3, "top_k": 2, "r": 2, "alpha": 4, "target_modules": ["gate_proj"]})
    final = run_recipe(load_recipe(path), progress=False, use_accelerate=False)
    assert (final / "moe.safetensors").is_file() and (final / "adapter").is_dir()


@pytest.mark.slow
def test_accelerate_launch_one_cpu_process(tmp_path: Path, data: Path, tiny_llm_dir: Path) -> None:
    path = _recipe(tmp_path, data, tiny_llm_dir, _align(data, steps=2))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    launcher = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(launcher), "launch", "--config_file", str(REPO / "adapters" / "accelerate" / "cpu.yaml"),
                           "-m", "geochat.train", str(path), "--quiet"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "assistant" / "vision" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_cpu_processes_train_the_recipe_and_write_once(tmp_path: Path, data: Path, tiny_llm_dir: Path) -> None:
    """`torchrun --nproc_per_node 2` (gloo on the CPU): data-parallel align, pretrain and instruct (LoRA +
    MoE-LoRA) stages; only rank 0 writes, the others wait for it between stages. (DeepSpeed and FSDP need
    GPUs: their configs are only parsed here.)"""
    chat = {"conversations": str(data / "conv.json"), "val_samples": 0, "max_length": 256,
            "optim": {"lr": 1e-3, "batch_size": 2, "max_steps": 2}}
    path = _recipe(tmp_path, data, tiny_llm_dir, {**_align(data, steps=2), "pretrain": chat, "instruct": chat},
                   lora={"r": 4, "alpha": 8, "dropout": 0.0},
                   moe={"num_experts": 3, "top_k": 1, "r": 2, "alpha": 4, "target_modules": ["gate_proj"]})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "geochat.train", str(path), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("trained: ") == 1  # said once for the run, not once a process
    final = tmp_path / "out" / "assistant"
    assert (final / "projector.safetensors").is_file() and (final / "vision" / "model.safetensors").is_file()
    assert GeoChat.from_pretrained(final, max_new_tokens=2).model_info.name != ""


@pytest.mark.slow
def test_shipped_default_model_loads_and_answers(tmp_path: Path, tiny_llm_dir: Path) -> None:
    directory = REPO / "adapters" / "geochat-mini"
    if not (directory / "geochat_config.json").is_file():
        pytest.skip("adapters/geochat-mini is not trained yet")
    # everything but docs, plots, configs and evaluation predictions is a weight file
    weights = [p for p in directory.rglob("*") if p.is_file() and p.suffix not in (".md", ".png", ".json", ".jsonl")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in weights) <= 40 * 2**20
    gc = GeoChat.from_pretrained(max_new_tokens=8)  # the default switches to the shipped model
    assert gc.model_info.name == "geochat-mini"
    rgb = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
    assert gc.chat(rgb, "Describe this image.").answer.strip()
    # a saved copy keeps the search tower and its query bank (without them it would search and classify
    # with the chat tower): the same files, the same fingerprint
    from geochat.engine import names_the_default
    from geochat.eval.tasks import load_dual
    from geochat.train.dual_encoder import load_query_bank, tower_fingerprint

    assert names_the_default("geochat-mini") and not names_the_default(str(tmp_path))  # --model geochat-mini
    assert load_dual("geochat-mini").bank is not None
    copy = gc.save_pretrained(tmp_path / "copy")
    assert tower_fingerprint(copy / "retrieval") == tower_fingerprint(directory / "retrieval")
    assert load_query_bank(copy / "retrieval") is not None
    # saving another assistant (without a search tower) there leaves none of this one's behind
    GeoChat.from_config(tiny_config(tiny_llm_dir)).save_pretrained(copy)
    assert not (copy / "retrieval").exists()


@pytest.mark.slow
def test_shipped_default_model_sees_real_scenes(shared_data: Path) -> None:
    """On 24 seeded RSICD test images the shipped model names the scene among 31 options far above
    chance (1/31), writes one-sentence captions, and answers [refer] with boxes on the map."""
    import random

    directory = REPO / "adapters" / "geochat-mini"
    if not (directory / "adapter").is_dir():
        pytest.skip("adapters/geochat-mini has no instruction-tuned adapter")
    rows = [json.loads(x) for x in (shared_data / "rsicd" / "annotations.jsonl").read_text().splitlines()]
    labels = sorted({r["label"] for r in rows})
    test = random.Random(0).sample([r for r in rows if r["split"] == "test"], 24)
    paths = [shared_data / "rsicd" / r["image"] for r in test]
    gc = GeoChat.from_pretrained(max_new_tokens=32)
    answers = gc.chat_batch(paths, "", task="classify", labels=labels)
    hits = sum(a.strip().rstrip(".").lower() == r["label"] for a, r in zip(answers, test, strict=True))
    assert hits >= 12, list(zip(answers, [r["label"] for r in test], strict=True))
    captions = gc.chat_batch(paths[:4], "", task="caption")
    assert all(3 <= len(c.split()) <= 30 and "IMAGE FACTS" not in c for c in captions), captions
    located = gc.chat(REPO / "examples" / "buildings_uint16_utm16.tif", "buildings", task="refer")
    assert located.boxes and located.geojson is not None  # boxes parsed and put on the map (rough ones)


@pytest.mark.slow
def test_shipped_dual_encoder_uses_its_search_tower_on_real_scenes(shared_data: Path) -> None:
    """The default model's dual encoder is the retrieval stage's tower (trainable end of the EfficientNet),
    and it names 24 seeded RSICD test scenes zero-shot among 31 labels far above chance (1/31)."""
    import random

    from geochat.eval.tasks import load_dual
    from geochat.train.features import read_rgb

    if not (REPO / "adapters" / "geochat-mini" / "retrieval" / "vision" / "model.safetensors").is_file():
        pytest.skip("adapters/geochat-mini has no search tower")
    rows = [json.loads(x) for x in (shared_data / "rsicd" / "annotations.jsonl").read_text().splitlines()]
    labels = sorted({r["label"] for r in rows})
    test = random.Random(1).sample([r for r in rows if r["split"] == "test"], 24)
    from geochat.retrieval.embedders import image_embedder_from_name

    dual = load_dual(None)
    recipe = load_recipe(REPO / "adapters" / "geochat-mini.yaml")
    assert recipe.retrieval is not None  # the shipped search tower is what the shipped recipe trains
    assert dual.tower.config.trainable_stem_blocks == recipe.retrieval.vision["trainable_stem_blocks"]
    assert image_embedder_from_name("auto").name.endswith("geochat-mini/retrieval")  # the image index's default
    assert dual.bank is not None and len(dual.bank.keys) == 8734  # RSICD train: the shipped query bank
    assert recipe.retrieval.query_bank
    weights = sum(f.stat().st_size for f in (REPO / "adapters" / "geochat-mini").rglob("*.safetensors"))
    assert weights <= 40_000_000, weights  # the cap on the shipped weights
    scores = dual.embed_images([read_rgb(shared_data / "rsicd" / r["image"]) for r in test]) @ dual.embed_labels(labels).T
    hits = sum(labels[i] == r["label"] for i, r in zip(scores.argmax(1), test, strict=True))
    assert hits >= 18, hits


def test_conversation_files_that_are_not_llava_lists_are_one_clear_error(tmp_path: Path, tiny_llm_dir: Path) -> None:
    from geochat.errors import GeoChatError
    from geochat.train.chat import load_conversations
    from geochat.train.recipe import ChatStageConfig

    assistant = build_assistant(tiny_config(tiny_llm_dir))
    cfg = ChatStageConfig(conversations="c.json")
    value5 = '[{"id": "s", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]}]'
    for text, words in (("[{not json", "not valid JSON"), ('{"a": 1}', "JSON list"), ("[1, 2]", "not a LLaVA object"),
                        (value5, "sample 's': turn 1: 'value' must be text, got 5"), ("[]", "holds no samples"),
                        ('[{"id": "x"}]', "sample 'x' has no 'conversations' list")):
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(GeoChatError, match=words):
            load_conversations(tmp_path / "c.json", cfg, assistant, 0)


def test_under_deepspeed_the_trainer_names_the_micro_batch_and_refuses_grad_accum(tmp_path: Path) -> None:
    """DeepSpeed is not installed on the CPU test machine; this checks what the trainer tells accelerate's plugin
    (without a DataLoader, accelerate needs `train_micro_batch_size_per_gpu` set before `prepare`)."""
    from types import SimpleNamespace

    from geochat.errors import GeoChatError
    from geochat.train.loop import Trainer
    from geochat.train.recipe import OptimConfig, RunConfig

    plugin = SimpleNamespace(deepspeed_config={"zero_stage": 2})
    seen = {}

    def prepare(module: torch.nn.Module, optimizer: object) -> tuple:
        seen.update(plugin.deepspeed_config)
        return module, optimizer

    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=4, prepare=prepare,
                                  is_main_process=True)
    Trainer("t", torch.nn.Linear(2, 2), OptimConfig(batch_size=64), RunConfig(), tmp_path, accelerator)
    assert seen["train_micro_batch_size_per_gpu"] == 16
    with pytest.raises(GeoChatError, match="grad_accum"):
        Trainer("t", torch.nn.Linear(2, 2), OptimConfig(batch_size=64, grad_accum=2), RunConfig(), tmp_path, accelerator)


def test_lora_target_modules_that_name_nothing_are_one_clear_error(tiny_llm_dir: Path) -> None:
    from geochat.errors import ModelLoadError
    from geochat.model.config import LoraSettings

    config = tiny_config(tiny_llm_dir, lora=True)
    config = dataclasses.replace(config, lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("nope_proj",)))
    with pytest.raises(ModelLoadError, match=r"model.lora.target_modules \['nope_proj'\] names no module"):
        build_assistant(config)


def test_a_start_that_failed_before_training_can_be_run_again(tmp_path: Path, data: Path, tiny_llm_dir: Path) -> None:
    path = _recipe(tmp_path, data, tiny_llm_dir, _align(data, steps=1))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "recipe.json").write_text("{}")  # all that a run that failed at its start leaves
    assert (run_recipe(load_recipe(path), progress=False, use_accelerate=False) / "vision").is_dir()
    with pytest.raises(GeoChatError, match="is not empty: pass --resume"):  # a run that trained is kept
        run_recipe(load_recipe(path), progress=False, use_accelerate=False)


def test_text_head_starts_as_the_identity_and_round_trips(tmp_path: Path) -> None:
    from geochat.train.dual_encoder import TextHead

    head = TextHead(8)
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1).numpy()
    assert np.allclose(head.transform(text), text, atol=1e-6)  # untrained: MiniLM's space as it is
    torch.nn.init.normal_(head.proj.weight, std=0.3)
    moved = head.transform(text)
    assert not np.allclose(moved, text, atol=1e-3)
    assert np.allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-5)


def test_retrieval_stage_with_a_text_head_searches_and_labels_through_it(tmp_path: Path, data: Path,
                                                                         tiny_llm_dir: Path) -> None:
    from geochat.errors import ModelLoadError
    from geochat.eval.tasks import load_dual
    from geochat.retrieval.embedders import TowerEmbedder
    from geochat.train.dual_encoder import TEXT_HEAD, DualEncoder, QueryBank, load_text_head
    from geochat.train.query_bank import write_query_bank

    retrieval = {**_align(data, steps=3)["align"], "rotations": 1, "query_bank": True, "text_head": True,
                 "vision": {"trainable_stem_blocks": 1}}
    retrieval["optim"] = {**retrieval["optim"], "lr": 0.05}
    path = _search_recipe(tmp_path, data, tiny_llm_dir, retrieval)
    final = run_recipe(load_recipe(path), progress=False, use_accelerate=False)

    assert (final / "retrieval" / TEXT_HEAD).is_file()  # the assembled assistant carries it beside its tower
    dual = load_dual(str(final))
    assert dual.text_head is not None
    plain = DualEncoder(dual.tower, dual.text)  # MiniLM's space as it is
    texts, labels = ["an airport", "a dense forest"], ["airport", "forest"]
    searched = dual.embed_texts(texts)
    assert not np.allclose(searched, plain.embed_texts(texts), atol=1e-3)  # the trained head moved them
    assert np.allclose(searched, dual.text_head.transform(plain.embed_texts(texts)), atol=1e-6)
    assert np.allclose(dual.embed_labels(labels), dual.text_head.transform(plain.embed_labels(labels)), atol=1e-6)
    # the image index's text queries take the same path: head, then the bank
    assert np.allclose(TowerEmbedder(final / "retrieval").embed_text("an airport"),
                       dual.embed_queries(["an airport"])[0], atol=1e-4)
    # the bank's keys live in the head's space: rewriting the bank from the saved tower gives the same keys
    written = dual.bank
    assert written is not None
    write_query_bank(path, final / "retrieval", progress=False)
    again = QueryBank.load(final / "retrieval" / "query_bank.safetensors")
    torch.testing.assert_close(again.keys, written.keys)
    # a head beside another tower is refused: its texts would not match that tower's images
    other = _retrained_copy(final / "retrieval", tmp_path / "retrained")
    with pytest.raises(ModelLoadError, match="trained with another tower"):
        load_text_head(other)
    (other / TEXT_HEAD).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="is not a text head"):
        load_text_head(other)


def test_retrieval_stage_trains_on_two_splits_and_banks_one(tmp_path: Path, data: Path, tiny_llm_dir: Path) -> None:
    """`split: train+val` trains on both splits' images (each split's stem features cached on its own and
    reused), `bank_split` keeps the query bank to one of them; validating on a trained split is refused."""
    from geochat.eval.tasks import load_dual
    from geochat.train.align import build_tower, load_align_data
    from geochat.train.dual_encoder import TextEncoder

    retrieval = {**_align(data, steps=2)["align"], "max_images": None, "split": "train+val", "val_split": None,
                 "rotations": 2, "query_bank": True, "bank_split": "train", "vision": {"trainable_stem_blocks": 1}}
    path = _search_recipe(tmp_path, data, tiny_llm_dir, retrieval)
    loaded = load_recipe(path)
    assert loaded.retrieval is not None
    tower = build_tower(loaded, loaded.retrieval.vision)
    both = load_align_data(loaded, loaded.retrieval, tower, TextEncoder(), progress=False)
    assert both.splits == ["train"] * 6 + ["val"] * 2 and len(both.train) == 8
    assert len(list((tmp_path / "cache").glob("stem-*.npy"))) == 2 * 2  # a cache per split and turn
    one = load_align_data(loaded, dataclasses.replace(loaded.retrieval, split="val", bank_split=None), tower,
                          TextEncoder(), progress=False)
    assert len(list((tmp_path / "cache").glob("stem-*.npy"))) == 2 * 2  # val's caches were reused
    for turn in range(2):
        np.testing.assert_array_equal(both.train.arrays[turn][6:], one.train.arrays[turn])
    np.testing.assert_array_equal(both.text[both.spans[6][0]:], one.text)  # val's captions follow train's
    final = run_recipe(loaded, progress=False, use_accelerate=False)
    bank = load_dual(str(final)).bank
    assert bank is not None and len(bank.keys) == 6  # the training split's images only

    for key, value, message in (("val_split", "val", "would not be held out"),
                                ("bank_split", "test", "not one of the training splits")):
        broken = yaml.safe_load(path.read_text())
        broken["retrieval"][key] = value
        (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
        with pytest.raises(GeoChatError, match=message):
            load_recipe(tmp_path / "broken.yaml")


def test_retrieval_stage_with_text_layers_adapts_minilm_for_search_alone(tmp_path: Path, data: Path,
                                                                          tiny_llm_dir: Path) -> None:
    """`text_layers: 1`: LoRA on MiniLM's top layer trains with the tower; search texts, label prompts and the
    bank's keys go through that adapted copy, saved as adapters beside the head, while MiniLM itself (what
    documentation retrieval reads) is untouched."""
    from geochat.errors import ModelLoadError
    from geochat.eval.tasks import load_dual
    from geochat.retrieval.embedders import TowerEmbedder
    from geochat.retrieval.text import TextEmbedder
    from geochat.train.dual_encoder import TEXT_HEAD, QueryBank, TextEncoder, label_embeddings, load_text_head
    from geochat.train.query_bank import write_query_bank

    retrieval = {**_align(data, steps=3)["align"], "rotations": 1, "query_bank": True, "text_head": True,
                 "text_layers": 1, "text_rank": 4, "vision": {"trainable_stem_blocks": 1}}
    retrieval["optim"] = {**retrieval["optim"], "lr": 0.05}
    path = _search_recipe(tmp_path, data, tiny_llm_dir, retrieval)
    final = run_recipe(load_recipe(path), progress=False, use_accelerate=False)

    saved = load_file(str(final / "retrieval" / TEXT_HEAD))
    adapters = [k for k in saved if "lora_" in k]
    assert adapters and all(".layer.5." in k for k in adapters)  # the top layer only; no MiniLM weight stored
    assert set(saved) - set(adapters) == {"proj.weight", "proj.bias"}
    assert any(float(saved[k].abs().max()) > 0 for k in adapters if "lora_B" in k)  # the adapters trained
    dual = load_dual(str(final))
    head = dual.text_head
    assert head is not None and head.minilm is not None
    texts, labels = ["an airport", "a dense forest"], ["airport", "forest"]
    plain = TextEncoder()
    adapted = head.encoder().encode(texts)
    assert not np.allclose(adapted, plain.encode(texts), atol=1e-3)  # the adapters move MiniLM's vectors
    np.testing.assert_allclose(dual.embed_texts(texts), head.transform(adapted), atol=1e-5)
    np.testing.assert_allclose(dual.embed_labels(labels), head.transform(label_embeddings(head.encoder(), labels)),
                               atol=1e-5)
    # documentation retrieval's MiniLM is not the adapted one
    np.testing.assert_allclose(TextEmbedder().embed_query("an airport"), plain.encode(["an airport"])[0], atol=1e-5)
    assert np.allclose(TowerEmbedder(final / "retrieval").embed_text("an airport"),
                       dual.embed_queries(["an airport"])[0], atol=1e-4)
    written = dual.bank
    assert written is not None
    write_query_bank(path, final / "retrieval", progress=False)  # keys from the adapted MiniLM again
    torch.testing.assert_close(QueryBank.load(final / "retrieval" / "query_bank.safetensors").keys, written.keys)
    # a head file whose adapters do not fit what it declares is refused
    broken = dict(saved)
    broken.pop(adapters[0])
    save_file(broken, str(final / "retrieval" / TEXT_HEAD), metadata={"layers": "1", "rank": "4"})
    with pytest.raises(ModelLoadError, match="is not a text head"):
        load_text_head(final / "retrieval")
    bad = yaml.safe_load(path.read_text())
    bad["retrieval"]["text_head"] = False
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(GeoChatError, match="set text_head: true"):
        load_recipe(tmp_path / "bad.yaml")
