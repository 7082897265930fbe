"""The engine: one `GeoChat` object behind the CLI, the app and the HTTP API.

A turn is a recipe:

    load the image (imagery) ─► encode it once per image (tower + projector, cached per session)
    ─► build the user message (task token, facts, passages) ─► chat template ─► generate, reusing the
    KV cache of the longest prefix already computed ─► split reasoning/answer ─► parse boxes ─►
    map boxes from the padded square to raster pixels to EPSG:4326 ─► `Answer`

Multi-turn reuse: each image gets a session holding its projected image tokens and the KV cache of
the last conversation about it. A later turn's token ids share a prefix with what is cached (system
prompt, image tokens, earlier turns); the cache is cropped to that common prefix and only the new
tokens are run through the model. Passing earlier turns back verbatim (`Answer.as_turn()`) keeps
the shared prefix whole. The image tokens sit in the first user turn, so they are always in the
cached prefix after turn one; a prefix shorter than them falls back to a fresh cache.

Generation is serialised by one lock: a CPU runs one forward pass at a time well, and several users
queue instead of trampling each other's caches. What watches a generation while it runs (streaming,
stopping a loop, holding an answer to the labels) is in `geochat.generation`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from geochat.answer import Answer, ModelInfo, Timings, Turn
from geochat.errors import GeoChatError, ImageryError
from geochat.generation import (
    AnswerStream,
    HeldAnswer,
    StopOnLoop,
    TextCallback,
    TimedStreamer,
    check_context,
    label_constraint,
    one_of,
    prompt_ids,
)
from geochat.georeference import georeference, region_to_grid
from geochat.grounding import parse_boxes, strip_grounding
from geochat.imagery import LoadedImage, load_image
from geochat.model.assistant import Assistant, build_assistant, load_assistant, save_assistant
from geochat.model.config import AssistantConfig, offline_default_config
from geochat.model.processor import to_pixel_values
from geochat.model.weights import TRAINED_DEFAULT_DIR, quiet_loading, store_as_float16
from geochat.prompting import (
    NEEDS_IMAGE,
    TASK_TOKENS,
    Passage,
    Task,
    answer_marker,
    asked,
    build_user_message,
    check_text,
    prompt_facts,
    split_reasoning,
    task_of,
)

log = logging.getLogger(__name__)

ImageInput = str | Path | bytes | np.ndarray | LoadedImage | Any  # Any: PIL.Image.Image

DEFAULT_MAX_NEW_TOKENS = 256
MAX_SESSIONS = 8  # images whose encodings and KV caches are kept (LRU)


# A chat turn is given only passages at least this close to the question (MiniLM cosine). Measured over the
# bundled knowledge/: the passage that answers one of benchmarks/retrieval_questions.jsonl scores 0.35 or more
# for 167 of 169 questions (median 0.62), while image questions that no document answers ("What is in this
# image?", "Describe this image.", "Is it vegetated?") reach 0.18-0.33 with unrelated passages, which a small
# model then repeats. "How many ships are in the harbour?" keeps its harbour passage (0.59), and only it.
MIN_PASSAGE_SCORE = 0.35


def names_the_default(name_or_path: str | Path | None) -> bool:
    """None, "default", or the shipped model's name ("geochat-mini", unless a directory of that name is here)."""
    if name_or_path is None or str(name_or_path) == "default":
        return True
    return str(name_or_path) == TRAINED_DEFAULT_DIR.name and not Path(str(name_or_path)).exists()


@dataclass
class _Session:
    """What is cached about one image: its projected tokens and the KV cache of the last conversation."""

    image_features: torch.Tensor  # (1, N, H)
    cache: DynamicCache | None = None
    cached_ids: list[int] | None = None  # the token ids whose keys/values `cache` holds
    last_reused: int = 0  # prompt tokens the last turn took from the cache instead of recomputing


def _check_max_new_tokens(n: int) -> None:
    if n < 1:
        raise GeoChatError(f"max_new_tokens must be at least 1, got {n}")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class GeoChat:
    """Chat about remote-sensing images. Thread-safe; one instance serves many users."""

    def __init__(self, assistant: Assistant, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        _check_max_new_tokens(max_new_tokens)
        self.assistant = assistant
        self.max_new_tokens = max_new_tokens
        self.retriever: Any | None = None  # set by the retrieval layer: .search(query, k) -> list[Passage]
        self._lock = threading.RLock()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None = None, **kwargs: Any) -> GeoChat:
        """Load an assistant directory (or a LLaVA hub id), or the offline default when `name_or_path` is
        None, "default" or its name "geochat-mini" (and no directory of that name is here).

        The default is the trained `adapters/geochat-mini` when it ships, else the assistant
        assembled from the shipped packages with an untrained projector (its name says so).
        """
        with quiet_loading():
            if name_or_path is None or names_the_default(name_or_path):
                if (TRAINED_DEFAULT_DIR / "geochat_config.json").is_file():
                    return cls(load_assistant(TRAINED_DEFAULT_DIR), **kwargs)
                return cls(build_assistant(offline_default_config()), **kwargs)
            return cls(load_assistant(name_or_path), **kwargs)

    @classmethod
    def from_config(cls, config: AssistantConfig, **kwargs: Any) -> GeoChat:
        """A new, untrained assistant built from `config` (tests and training start here)."""
        with quiet_loading():
            return cls(build_assistant(config), **kwargs)

    def save_pretrained(self, directory: str | Path, dtype: str = "float32") -> Path:
        """Write this assistant (safetensors weights and its config) where `from_pretrained` reads it back;
        `dtype="float16"` halves the files, as the shipped model's are (they load as float32 again)."""
        if dtype not in ("float32", "float16"):
            raise GeoChatError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        out = save_assistant(self.assistant, Path(directory))
        if dtype == "float16":
            for path in sorted(out.rglob("*.safetensors")):
                store_as_float16(path)
        return out

    @property
    def model_info(self) -> ModelInfo:
        """The model's name and parts, as answers report them (a property: `gc.model_info`)."""
        cfg = self.assistant.config
        name = cfg.name if cfg.projector_trained else f"{cfg.name} (projector untrained)"
        return ModelInfo(name=name, vision=cfg.vision["model_type"], llm=cfg.llm)

    # -- public API ---------------------------------------------------------------------------

    def chat(
        self,
        image: ImageInput | None,
        message: str,
        history: Sequence[Turn | tuple[str, str]] | None = None,
        task: Task | str | None = None,
        cot: bool = False,
        region: Sequence[float] | None = None,
        bands: Sequence[int] | str | None = None,
        sensor: str | None = None,
        labels: Sequence[str] | None = None,
        passages: Sequence[Passage] | None = None,
        max_new_tokens: int | None = None,
        on_text: TextCallback | None = None,
    ) -> Answer:
        """Answer `message` about `image` (None for a text-only question).

        `region` is a pixel box (x1, y1, x2, y2[, θ]) in the original raster for `[identify]`;
        `history` holds earlier turns (`Answer.as_turn()`); `on_text` receives text as it streams.
        With `task="classify"` and `labels` (and no `cot`), the answer is exactly one of the labels.
        """
        start = time.perf_counter()
        if max_new_tokens is not None:
            _check_max_new_tokens(max_new_tokens)
        check_text(message, labels)
        task = task_of(task)
        loaded = self._load(image, bands, sensor)
        if loaded is None and task in NEEDS_IMAGE:
            raise GeoChatError(f"the {task.value} task is about an image's pixels: pass an image")
        if loaded is not None and not loaded.valid.any():  # the model would describe a black square
            name = Path(loaded.info.path).name if loaded.info.path else "the image"
            raise ImageryError(f"{name} holds no valid pixel: every one is nodata (or NaN) in "
                               "the bands shown; choose other bands, or check the file's nodata value")
        region_box = region_to_grid(region, loaded) if region is not None else None
        if task is Task.IDENTIFY and region_box is None:
            raise GeoChatError("the identify task needs a region: region=(x1, y1, x2, y2) in pixels "
                               "(--region x1,y1,x2,y2 on the command line)")
        # Documentation helps answer questions, not locate or describe pixels: only chat turns retrieve
        # (caption/classify are also asked exactly as the model was trained: facts, no passages).
        turns = [Turn.of(t) for t in (history or ())]
        if passages is None and self.retriever is not None and task is Task.CHAT:
            try:
                passages = self._passages(message, turns)
            except GeoChatError as exc:  # the documentation is an aid: a store rebuilt elsewhere
                log.warning("documentation search failed (%s); answering without passages", exc)  # must not
                passages = []                                                                        # stop the answer
        facts = loaded.facts if loaded is not None else {}
        try:
            user = build_user_message(
                message, task=task, region=region_box, facts=prompt_facts(facts) if not turns else None,
                passages=passages or (), cot=cot, labels=labels,
            )
        except ValueError as exc:  # e.g. [refer] without a phrase
            raise GeoChatError(str(exc)) from exc
        with self._lock:
            encode_s, session = self._session(loaded)
            ids = self._prompt_ids(turns, user, with_image=loaded is not None)
            check_context(self.assistant, len(ids), max_new_tokens or self.max_new_tokens)
            relabel = task is Task.CLASSIFY and bool(labels) and cot
            held = HeldAnswer(on_text) if relabel else None
            streamer = TimedStreamer(self.assistant.tokenizer, held or on_text)
            gen_start = time.perf_counter()
            allowed = label_constraint(self.assistant, task, labels, len(ids), cot)
            raw = self._generate(session, ids, max_new_tokens or self.max_new_tokens, streamer, allowed)
            if held is not None and labels:
                raw = self._answer_from_labels(session, ids, raw, labels)
                held.finish(raw)
        ttft = (streamer.first_token_at or time.perf_counter()) - gen_start + encode_s
        reasoning, final = split_reasoning(raw) if cot else (None, raw)
        boxes = parse_boxes(raw)
        box_results, geojson = georeference(boxes, loaded)
        return Answer(
            answer=strip_grounding(final),
            reasoning=strip_grounding(reasoning) if reasoning else None,
            task=task.value,
            boxes=box_results,
            geojson=geojson,
            facts=facts,
            sources=[_source_json(p) for p in passages or ()],
            model=self.model_info,
            timings=Timings(encode_s=round(encode_s, 4), ttft_s=round(ttft, 4),
                            total_s=round(time.perf_counter() - start, 4)),
            prompt=user,
            raw=raw,
            cut_short=streamer.cut_short,
        )

    def chat_batch(
        self,
        images: Sequence[ImageInput],
        message: str | Sequence[str],
        task: Task | str | None = None,
        labels: Sequence[str] | None = None,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """One single-turn question (`message`, or one per image) about each of `images`, answered in
        one batched greedy generation.

        For evaluation and batch jobs: the same prompts as `chat` (facts block, task, options), no
        history, sessions or retrieval; returns the answer texts (box grammar removed; with `labels`,
        classify answers are exactly one of them, as in `chat`; an answer that loops is stopped and keeps
        one copy, as in `chat`). Several times faster than one `chat` per image on a CPU, since decoding a
        batch costs about as much as decoding one sequence.
        """
        task = task_of(task)
        if task in TASK_TOKENS:
            raise GeoChatError("chat_batch answers text questions; use chat for refer/grounding/identify")
        if not images:
            return []
        a = self.assistant
        messages = [message] * len(images) if isinstance(message, str) else list(message)
        if len(messages) != len(images):
            raise GeoChatError(f"{len(messages)} messages for {len(images)} images")
        for text in messages:
            check_text(text, labels)
        loaded = [self._load(image, None, None) for image in images]
        prompts = []
        for item, text in zip(loaded, messages, strict=True):
            assert item is not None
            try:
                user = build_user_message(text, task=task, facts=prompt_facts(item.facts), labels=labels)
            except ValueError as exc:
                raise GeoChatError(str(exc)) from exc
            prompts.append(prompt_ids(a, [], user, with_image=True))
        width = max(len(p) for p in prompts)
        check_context(a, width, max_new_tokens or self.max_new_tokens)
        pad = a.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        pixels = torch.cat([to_pixel_values(x.rgb, a.image_size, a.config.image_mean, a.config.image_std)
                            for x in loaded if x is not None])
        loop = StopOnLoop(width, lambda new: str(a.tokenizer.decode(new)), batch=len(prompts))
        with self._lock, torch.inference_mode():
            out = a.model.generate(
                input_ids=ids, attention_mask=mask, pixel_values=pixels.to(a.model.dtype),
                max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False,
                suppress_tokens=[a.image_token_id], pad_token_id=pad,
                prefix_allowed_tokens_fn=label_constraint(a, task, labels, width),
                stopping_criteria=StoppingCriteriaList([loop]),
            )
        texts = [a.tokenizer.decode(loop.trim(row[width:].tolist(), i), skip_special_tokens=True)
                 for i, row in enumerate(out)]
        return [strip_grounding(str(t).strip()) for t in texts]

    def chat_tiled(self, source: str | Path, message: str, **kwargs: Any) -> Answer:
        """Ask `message` of every overlapping tile of a large raster; boxes merged in map coordinates.

        See `geochat.tiling.chat_tiled` for the options (task, tile, overlap, bands, sensor).
        """
        from geochat.tiling import chat_tiled

        return chat_tiled(self, source, message, **kwargs)

    def stream(self, image: ImageInput | None, message: str, **kwargs: Any) -> AnswerStream:
        """Like `chat`, but iterate over the result for text pieces; `.answer` is set at the end."""
        return AnswerStream(lambda on_text: self.chat(image, message, on_text=on_text, **kwargs))

    # -- steps ----------------------------------------------------------------------------------

    def _load(self, image: ImageInput | None, bands: Any, sensor: str | None) -> LoadedImage | None:
        if image is None or isinstance(image, LoadedImage):
            return image
        return load_image(image, bands=bands, sensor=sensor)

    def _session(self, loaded: LoadedImage | None) -> tuple[float, _Session]:
        """The session of this image (text-only questions share one), encoding the image once."""
        if loaded is None:
            key = "text-only"
        else:
            key = hashlib.sha1(loaded.rgb.tobytes() + str(loaded.rgb.shape).encode()).hexdigest()
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return 0.0, self._sessions[key]
        t = time.perf_counter()
        a = self.assistant
        if loaded is None:
            features = torch.zeros(1, 0, 0)
        else:
            pixels = to_pixel_values(loaded.rgb, a.image_size, a.config.image_mean, a.config.image_std)
            features = a.encode_images(pixels)
        session = _Session(image_features=features)
        self._sessions[key] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return time.perf_counter() - t, session

    def _passages(self, message: str, turns: Sequence[Turn]) -> list[Passage]:
        """The passages close enough to the question; a follow-up ("And how is it computed?") that finds none
        alone is searched again together with the question before it, which names what "it" is."""
        assert self.retriever is not None
        queries = [message, *([f"{asked(turns[-1].user)} {message}"] if turns else [])]
        for query in queries:
            found = [p for p in self.retriever.search(query) if p.score is None or p.score >= MIN_PASSAGE_SCORE]
            if found:
                return found
        return []

    def _answer_from_labels(self, session: _Session, ids: list[int], raw: str, labels: Sequence[str]) -> str:
        """With reasoning first, the labels cannot bound the whole answer: when the answer after the reasoning is
        not one of them, it is decoded again after the reasoning and an "Answer:" marker, bounded to the labels."""
        marker = answer_marker(raw)
        if (raw[marker.end():] if marker is not None else raw).strip() in labels:
            return raw
        a = self.assistant
        head = raw[: marker.start()] if marker is not None else raw  # the reasoning: an answer outside the labels
        sep = "" if not head or head.endswith("\n") else "\n"          # is dropped, neither kept nor shown
        text = f"{head}{sep}Answer: "
        follow = ids + list(a.tokenizer.encode(text, add_special_tokens=False))
        longest = max(len(a.tokenizer.encode(label, add_special_tokens=False)) for label in labels)
        label = self._generate(session, follow, longest + 1, TimedStreamer(a.tokenizer, None),
                               one_of(a, labels, len(follow)))
        return text + label

    def _prompt_ids(self, turns: Sequence[Turn], user: str, with_image: bool) -> list[int]:
        return prompt_ids(self.assistant, turns, user, with_image)

    def _generate(self, session: _Session, ids: list[int], max_new_tokens: int, streamer: TimedStreamer,
                  allowed: Callable[[int, torch.Tensor], list[int]] | None = None) -> str:
        a = self.assistant
        input_ids = torch.tensor([ids])
        image_end = (max(i for i, t in enumerate(ids) if t == a.image_token_id) + 1) if session.image_features.numel() else 0
        reuse = 0
        if session.cache is not None and session.cached_ids is not None:
            reuse = min(_common_prefix(session.cached_ids, ids), len(ids) - 1)
        kwargs: dict[str, Any] = {}
        session.last_reused = reuse if reuse > image_end else 0
        if reuse > image_end and session.cache is not None:
            cache = session.cache
            if cache.get_seq_length() > reuse:
                cache.crop(reuse - cache.get_seq_length())
        else:
            text_config: Any = a.model.config.text_config
            cache = DynamicCache(config=text_config)
            if image_end:
                kwargs["mm_encoder_outputs"] = {
                    # LLaVA takes pre-encoded image features as a list of (N, H) tensors, one per image.
                    "image": BaseModelOutputWithPooling(pooler_output=list(session.image_features))  # type: ignore[arg-type]
                }
        # `generate` grows the cache in place: until it succeeds the session holds none, so a failure
        # cannot leave keys and values that no longer match `cached_ids`
        session.cache, session.cached_ids = None, None
        loop = StopOnLoop(len(ids), lambda new: str(a.tokenizer.decode(new)))
        out = a.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            cache=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
            suppress_tokens=[a.image_token_id],
            pad_token_id=a.pad_token_id,
            prefix_allowed_tokens_fn=allowed,
            stopping_criteria=StoppingCriteriaList([loop]),
            **kwargs,
        )
        sequence = out[0].tolist()
        session.cache = cache
        session.cached_ids = sequence[: cache.get_seq_length()]
        new = loop.trim(sequence[len(ids):])
        eos = a.model.generation_config.eos_token_id
        ends = set(eos if isinstance(eos, list) else [eos]) | {a.tokenizer.eos_token_id}
        streamer.cut_short = len(new) >= max_new_tokens and new[-1] not in ends
        text = str(a.tokenizer.decode(new, skip_special_tokens=True))
        return text.strip()

def _source_json(p: Passage) -> dict[str, Any]:
    return {"id": p.id, "source": p.source, "heading": p.heading, "text": p.text, "score": p.score}
