"""What watches a generation while it runs: text streamed out as it is decoded (`TimedStreamer`,
`AnswerStream`), a looping answer stopped (`StopOnLoop`), and an answer held to a list of options (`one_of`).

The engine (`geochat.engine`) hands these to transformers' `generate`; none of them knows about images.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from queue import Queue
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, TextStreamer

from geochat.box_geometry import rotated_iou
from geochat.errors import GeoChatError, PromptTooLongError
from geochat.grounding import Box, parse_boxes
from geochat.prompting import SYSTEM_PROMPT, Task, answer_marker

if TYPE_CHECKING:
    from geochat.answer import Answer, Turn
    from geochat.model.assistant import Assistant

TextCallback = Callable[[str], None]


class TimedStreamer(TextStreamer):
    """Records when the first new token arrives and forwards finished text pieces to a callback."""

    def __init__(self, tokenizer: Any, on_text: TextCallback | None) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.first_token_at: float | None = None
        self.cut_short = False  # set by `_generate`: the answer stopped at max_new_tokens
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._prompt_seen = True
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text and self.on_text is not None:
            self.on_text(text)


class HeldAnswer:
    """Forwards streamed reasoning as it comes, and holds back what follows its ``Answer:`` marker until `finish`
    gives the final text (classification with reasoning may decode its answer again, bounded to the labels: a
    stream must not show a label that is then taken back). Text goes on a line at a time, so a marker in the
    middle of a line is found before any of it is sent."""

    def __init__(self, on_text: TextCallback | None) -> None:
        self.on_text, self.text, self.sent = on_text, "", ""
        self.holding = False

    def __call__(self, piece: str) -> None:
        self.text += piece
        if self.holding:
            return
        marker = answer_marker(self.text)
        self.holding = marker is not None
        self._send(self.text[: marker.start()] if marker is not None else self.text[: self.text.rfind("\n") + 1])

    def finish(self, final: str) -> None:
        """Send the rest of `final`, the whole generated text. Where it does not extend what was sent (a loop's
        repeats trimmed from the reasoning, whitespace stripped), its answer part is sent on a line of its own."""
        if final.startswith(self.sent):
            self._send(final)
            return
        marker = answer_marker(final)
        if marker is not None and self.on_text is not None:
            self.on_text(("" if not self.sent or self.sent.endswith("\n") else "\n") + final[marker.start():].lstrip())

    def _send(self, upto: str) -> None:
        if len(upto) > len(self.sent) and upto.startswith(self.sent) and self.on_text is not None:
            self.on_text(upto[len(self.sent):])
            self.sent = upto


class StopOnLoop(StoppingCriteria):
    """Stops a generation that has started to loop, instead of letting it run to `max_new_tokens`:
    - its last `repeats` × L new tokens are one block of L tokens said `repeats` times (L from 8 to 48, and no
      shorter block repeats there: a short one, such as a Markdown table's `|---`, may repeat in a good answer), or
    - each of its last `repeats` boxes covers much the same ground as an earlier one (IoU >= 0.5): a
      small model asked for boxes may walk one box across the image a pixel at a time (13 such boxes on
      an RSICD storage-tank scene, and every tile of a tiled run paying the full token budget).
    Each row of a batch is followed on its own (`batch` rows, all with prompts `prompt_length` long, as a
    left-padded batch has them); a row once stopped stays stopped. After a repeating text stopped a row, `trim`
    drops the repeats from its answer (text already streamed keeps them: a stream cannot take text back).
    """

    def __init__(self, prompt_length: int, decode: Callable[[list[int]], str], repeats: int = 3,
                 batch: int = 1) -> None:
        self.prompt_length, self.decode, self.repeats = prompt_length, decode, repeats
        self._closed = [0] * batch  # closing braces seen so far: the boxes are checked again when one more is complete
        self._stopped: list[tuple[int, int | None] | None] = [None] * batch  # (new tokens, repeated block) at the stop

    def trim(self, new: list[int], row: int = 0) -> list[int]:
        """Row `row`'s new tokens up to its stop, without the block's repeats when a repeating text stopped it
        (the answer keeps one copy); as they are when it was not stopped."""
        stopped = self._stopped[row]
        if stopped is None:
            return new
        length, period = stopped
        return new[: length - (self.repeats - 1) * period] if period else new[:length]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if input_ids.shape[0] != len(self._stopped):
            raise ValueError(f"StopOnLoop follows {len(self._stopped)} answer(s), got a batch of {input_ids.shape[0]}")
        stop = [self._stopped[row] is not None or self._check(row, input_ids[row, self.prompt_length:].tolist())
                for row in range(input_ids.shape[0])]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

    def _check(self, row: int, new: list[int]) -> bool:
        period = next((n for n in range(1, 49) if looped(new, n, self.repeats)), None)  # the shortest repeating block
        looping = period is not None and period >= 8
        text = self.decode(new) if new and not looping else ""
        if text.count("}") > self._closed[row]:
            self._closed[row] = text.count("}")
            looping = boxes_circle(parse_boxes(text[: text.rfind("}") + 1]), self.repeats)
            period = None
        if looping:
            self._stopped[row] = (len(new), period)
        return looping


def looped(tokens: Sequence[int], block: int, repeats: int) -> bool:
    """Whether `tokens` ends with the same `block` tokens `repeats` times in a row."""
    if len(tokens) < block * repeats:
        return False
    tail = tokens[len(tokens) - block:]
    return all(tokens[len(tokens) - (k + 1) * block: len(tokens) - k * block] == tail for k in range(1, repeats))


def boxes_circle(boxes: Sequence[Box], repeats: int, iou: float = 0.5) -> bool:
    """Whether each of the last `repeats` boxes overlaps some box before it by `iou` or more."""
    n = len(boxes)
    return n > repeats and all(any(rotated_iou(boxes[i], boxes[j]) >= iou for j in range(i)) for i in range(n - repeats, n))


class StreamCancelled(Exception):
    """Raised inside generation when the stream's consumer has gone (`AnswerStream.cancel`)."""


class AnswerStream:
    """Iterate for text pieces as they are generated; `.answer` holds the full `Answer` afterwards.

    Generation runs in a worker thread. When the consumer stops early (it closes the iterator, or calls
    `cancel()`: a client that disconnected, a browser tab that closed), generation stops at its next
    text piece and gives the model back to the other users, instead of running on to `max_new_tokens`.
    """

    def __init__(self, run: Callable[[TextCallback], Answer]) -> None:
        self._run = run
        self._cancelled = threading.Event()
        self.answer: Answer | None = None

    def cancel(self) -> None:
        """Stop generating (a client that left): the model is freed for the next question."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[str]:
        queue: Queue[tuple[str, Any]] = Queue()

        def on_text(piece: str) -> None:
            if self._cancelled.is_set():
                raise StreamCancelled("the stream's consumer has gone")
            queue.put(("text", piece))

        def worker() -> None:
            try:
                queue.put(("done", self._run(on_text)))
            except BaseException as exc:  # handed to the consumer thread, re-raised there
                queue.put(("error", exc))

        threading.Thread(target=worker, daemon=True).start()
        try:
            while True:
                kind, value = queue.get()
                if kind == "text":
                    yield value
                elif kind == "done":
                    self.answer = value
                    return
                else:
                    raise value
        finally:
            if self.answer is None:  # left early: stop the worker's generation
                self.cancel()


def one_of(a: Assistant, options: Sequence[str], prompt_length: int) -> Callable[[int, torch.Tensor], list[int]]:
    """A `prefix_allowed_tokens_fn` for `generate`: the answer is exactly one of `options`, then end.

    Classification with a label list must name one of the labels; a free answer from a small model
    may not (asked to pick among forest/farmland/river it said "park"). Decoding walks a trie of the
    options' tokens, so greedy decoding picks the most likely option token by token.
    """
    sequences = [a.tokenizer.encode(option, add_special_tokens=False) for option in options]
    eos = a.model.generation_config.eos_token_id
    if eos is None:
        eos = a.tokenizer.eos_token_id
    ends = [eos] if isinstance(eos, int) else list(eos)

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        done = input_ids[prompt_length:].tolist()
        n = len(done)
        nxt = {seq[n] for seq in sequences if len(seq) > n and seq[:n] == done}
        if done in sequences or not nxt:
            nxt.update(ends)
        return sorted(nxt)

    return allowed


def check_context(a: Assistant, prompt_length: int, max_new_tokens: int) -> None:
    """Refuse a prompt that, with room for the answer, is longer than the model's context window: past it the
    model does not answer sensibly, and a CPU spends minutes reading it (24,000 tokens: 12 minutes)."""
    window = getattr(a.model.config.text_config, "max_position_embeddings", None)
    if window and prompt_length + max_new_tokens > window:
        raise PromptTooLongError(
            f"the conversation is {prompt_length:,} tokens and the answer may take {max_new_tokens:,} more, past the "
            f"model's context window of {window:,} tokens; shorten the question or the history, or start a new "
            "conversation")


def prompt_ids(a: Assistant, turns: Sequence[Turn], user: str, with_image: bool) -> list[int]:
    """Token ids of a conversation as the model sees it (training builds its samples with this too).

    System prompt, then the turns; `<image>` × N and a newline open the first user turn when there
    is an image; the tokenizer's own chat template does the rest.
    """
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    image_prefix = a.config.image_token * a.num_image_tokens + "\n" if with_image else ""
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": (image_prefix if i == 0 else "") + turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    messages.append({"role": "user", "content": (image_prefix if not turns else "") + user})
    encoded: Any = a.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids: list[int] = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    if with_image and ids.count(a.image_token_id) != a.num_image_tokens:
        raise GeoChatError(
            f"prompt holds {ids.count(a.image_token_id)} image tokens, the tower gives {a.num_image_tokens}"
        )
    return ids


def label_constraint(a: Assistant, task: Task, labels: Sequence[str] | None, prompt_length: int,
                     cot: bool = False) -> Callable[[int, torch.Tensor], list[int]] | None:
    """`one_of(labels)` for a classification with labels; None otherwise (and when reasoning comes first)."""
    return one_of(a, labels, prompt_length) if task is Task.CLASSIFY and labels and not cot else None
