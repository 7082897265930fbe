"""Tiny models for unit tests: a 2-layer Llama (width 64: bitsandbytes' CPU 4-bit kernel packs 32-wide blocks) with a byte-level BPE tokenizer trained on the spot.

Nothing is downloaded: the tokenizer is trained by `tokenizers` on a few sentences, the LLM is
random with a fixed seed, the vision tower uses the conv stem. Width 32–64, 64 px images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from geochat.model.config import AssistantConfig, LoraSettings
from geochat.model.moe_lora import MoELoraSettings

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "a large airport with many planes parked near the terminal",
    "green farmland and a river crossing the scene",
    "dense residential buildings along straight roads",
    "[refer] give me the location of <p>the airplane</p> {<10><20><30><40>|<45>}",
    "Reasoning: the image shows water. Answer: a lake",
] * 20


def make_tiny_llm(directory: Path, seed: int = 0) -> Path:
    """Write a tiny Llama + tokenizer (with a ChatML template) to `directory`."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        initializer_range=0.2,  # large random weights: varied, input-dependent tokens to compare
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


TINY_VISION = {
    "model_type": "geochat_hybrid_vision", "stem": "conv", "image_size": 64, "conv_stem_channels": 16,
    "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
    "projection_dim": 24,
}


def tiny_config(llm_dir: Path, lora: bool = False, moe: bool = False, quantization: str | None = None) -> AssistantConfig:
    return AssistantConfig(
        name="tiny",
        llm=str(llm_dir),
        vision=dict(TINY_VISION),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0) if lora else None,
        moe=MoELoraSettings(num_experts=3, top_k=2, r=2, alpha=4) if moe else None,
        quantization=quantization,  # type: ignore[arg-type]
    )
