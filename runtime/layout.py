"""The streaming layout: the token stream a live session sends to vLLM, one chunk at a time.

A session's KV cache is a sequence of *pieces* in arrival order: text token ids and visual items.
The session's turn scheduler (runtime/scheduler.py) builds every chunk it sends with the functions
here, and the trainer (runtime/training/) builds its samples by `StreamBuilder`, which calls the
same functions in the same order the scheduler does. So a model is trained on exactly the layout it is
served with, and the two cannot drift.

Rules of a vLLM streaming request that shape the layout (see vllm.md):
- every chunk is a turn that samples at least one token; the last sampled token of a turn has no
  KV, so an answer in flight re-feeds it at the end of the next chunk, after any new frames:
  the KV order is ``t1 .. t(K-1), frames, tK, t(K+1) ...``;
- a frame-only chunk sent while idle samples one token that is ignored (never in KV);
- a finished answer's ``<|im_end|>`` (sampled, so without KV) is re-fed, with the newline, at the
  start of the next chunk.

`classify_tokens` turns a stream into position segments; the vLLM position hook
(runtime/vllm_models.py) and the trainer both call it, so positions agree too.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from positional import Segment
from runtime.chat import ChatFormat

IGNORE = -100  # label of a position that predicts nothing (cross-entropy ignore index)


@runtime_checkable
class VisualItem(Protocol):
    """What the layout needs of a visual item: its merged grid (t, h, w), t*h*w placeholder tokens."""

    @property
    def n_tokens(self) -> int: ...

    @property
    def merged_grid(self) -> tuple[int, int, int]: ...


Piece = int | VisualItem


class GridTokens:
    """`VisualItem` for a dataclass with ``grid`` (t, h, w in patches, before the merge) and ``merge``."""

    grid: tuple[int, int, int]
    merge: int

    @property
    def n_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w // (self.merge * self.merge)

    @property
    def merged_grid(self) -> tuple[int, int, int]:
        t, h, w = self.grid
        return t, h // self.merge, w // self.merge


# --- the chunks a session sends ---------------------------------------------------------------


def frames_chunk(chat: ChatFormat, items: Sequence[VisualItem]) -> list[Piece]:
    """Visual items, each between ``<|vision_start|>`` and ``<|vision_end|>``."""
    pieces: list[Piece] = []
    for item in items:
        pieces += [chat.vision_start, item, chat.vision_end]
    return pieces


def system_turn(chat: ChatFormat, text: str) -> list[Piece]:
    return list(chat.turn("system", text))


def question_chunk(
    chat: ChatFormat,
    question: str,
    *,
    frames: Sequence[VisualItem] = (),
    images: Sequence[VisualItem] = (),
    instructions: str | None = None,
) -> list[Piece]:
    """Frames that came before the question, the user turn (with its images), the assistant header."""
    pieces = frames_chunk(chat, frames)
    if instructions:
        pieces += system_turn(chat, instructions)
    pieces += chat.user_turn_open()
    pieces += frames_chunk(chat, images)
    pieces += chat.user_turn_close(question)
    pieces += chat.assistant_header
    return pieces


def answer_chunk(chat: ChatFormat, frames: Sequence[VisualItem], pending_token: int) -> list[Piece]:
    """The next turn of an answer in flight: new frames, then the re-fed last answer token."""
    return [*frames_chunk(chat, frames), pending_token]


def closing(chat: ChatFormat, last_token: int | None) -> list[Piece]:
    """What opens the chunk after an answer ended: the sampled token without KV, ``<|im_end|>\\n``.

    ``last_token`` is the answer's last sampled token when it was not ``<|im_end|>`` itself (the
    answer was cut by max_tokens or a cancel); None when the model ended it.
    """
    head: list[Piece] = [] if last_token is None else [last_token]
    return [*head, *chat.close_assistant()]


def dialogue_turn(chat: ChatFormat, question: str, answer_ids: Sequence[int]) -> list[Piece]:
    """A finished exchange as a rollover carries it: the user turn and the whole assistant turn."""
    return [*chat.turn("user", question), *chat.assistant_header, *answer_ids, *chat.close_assistant()]


# --- rendering pieces ---------------------------------------------------------------------------


def visual_items(pieces: Sequence[Piece]) -> list[VisualItem]:
    return [p for p in pieces if not isinstance(p, int)]


def prompt_ids(chat: ChatFormat, pieces: Sequence[Piece]) -> list[int]:
    """Token ids as vLLM takes them in a prompt: ONE placeholder per visual item (vLLM expands it)."""
    return [p if isinstance(p, int) else chat.image_pad for p in pieces]


def expanded_ids(chat: ChatFormat, pieces: Sequence[Piece]) -> list[int]:
    """Token ids as they sit in the KV cache: every visual item expanded to its placeholders."""
    ids: list[int] = []
    for p in pieces:
        if isinstance(p, int):
            ids.append(p)
        else:
            ids.extend([chat.image_pad] * p.n_tokens)
    return ids


def token_length(pieces: Sequence[Piece]) -> int:
    """KV tokens the pieces occupy."""
    return sum(1 if isinstance(p, int) else p.n_tokens for p in pieces)


def segments_of(chat: ChatFormat, pieces: Sequence[Piece]) -> list[Segment]:
    """Position segments of a stream, by the same classification the vLLM position hook applies."""
    ids = expanded_ids(chat, pieces)
    items = []
    offset = 0
    for p in pieces:
        if isinstance(p, int):
            offset += 1
        else:
            t, h, w = p.merged_grid
            items.append((offset, t, h, w))
            offset += p.n_tokens
    return classify_tokens(
        ids,
        items,
        assistant_header=chat.assistant_header,
        im_end=chat.im_end,
        vision_markers=(chat.vision_start, chat.vision_end),
    )


def classify_tokens(
    input_tokens: Sequence[int],
    vision_items: Sequence[tuple[int, int, int, int]],
    *,
    assistant_header: Sequence[int],
    im_end: int,
    vision_markers: Sequence[int],
) -> list[Segment]:
    """Turn a prompt's token ids and visual placeholder ranges into position segments.

    ``vision_items`` are ``(offset, t, h, w)`` with the merged grid; the item covers t*h*w ids from
    ``offset``. Assistant spans run from the chat template's header to ``<|im_end|>`` inclusive
    and are output; vision markers are input wherever they occur.
    """
    segments: list[Segment] = []
    header = list(assistant_header)
    markers = set(vision_markers)
    items = sorted(vision_items)

    def push(kind: str, n: int) -> None:
        if segments and segments[-1][0] == kind and kind != "vision":
            segments[-1] = (kind, segments[-1][1] + n)  # type: ignore[operator]
        else:
            segments.append((kind, n))

    in_output = False
    i = 0
    item_index = 0
    length = len(input_tokens)
    while i < length:
        if item_index < len(items) and items[item_index][0] == i:
            _, t, h, w = items[item_index]
            segments.append(("vision", (t, h, w)))
            i += t * h * w
            item_index += 1
            continue
        token = input_tokens[i]
        if (
            not in_output
            and header
            and token == header[0]
            and list(input_tokens[i : i + len(header)]) == header
        ):
            push("output", len(header))
            i += len(header)
            in_output = True
            continue
        if token in markers:
            push("input", 1)
        elif in_output:
            push("output", 1)
            if token == im_end:
                in_output = False
        else:
            push("input", 1)
        i += 1
    return segments


# --- a whole stream, built the way the scheduler builds it ---------------------------------------


@dataclass
class StreamBuilder:
    """Lays out one session's stream chunk by chunk, exactly as `Session` sends it, with labels.

    ``pieces`` is the KV order; ``labels[i]`` is the token the model sampled from position i (what
    a trainer's loss targets), or `IGNORE`. Call the methods in the order events happen in a live
    session: `system`, `idle_frames`, `ask`, `answer_turn` (repeatedly), `end_answer`.
    """

    chat: ChatFormat
    pieces: list[Piece] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    carry: list[Piece] = field(default_factory=list)
    pending: int | None = None
    answering: bool = False

    def system(self, instructions: str) -> None:
        """A session opened with instructions: the system turn opens its first chunk."""
        self.carry += system_turn(self.chat, instructions)

    def _send(self, body: Sequence[Piece]) -> None:
        chunk = [*self.carry, *body]
        self.carry = []
        self.pieces.extend(chunk)
        self.labels.extend([IGNORE] * token_length(chunk))

    def idle_frames(self, items: Sequence[VisualItem]) -> None:
        """A frame-only chunk sent while no answer is in flight (its one sample is ignored)."""
        if self.answering:
            raise RuntimeError("idle_frames during an answer: use answer_turn(frames=...)")
        if items:
            self._send(frames_chunk(self.chat, items))

    def ask(
        self,
        question: str,
        *,
        frames: Sequence[VisualItem] = (),
        images: Sequence[VisualItem] = (),
        instructions: str | None = None,
    ) -> None:
        """The question chunk (with the frames that were ready); the answer's first turn follows."""
        if self.answering:
            raise RuntimeError("ask while an answer is in flight")
        self._send(
            question_chunk(self.chat, question, frames=frames, images=images, instructions=instructions)
        )
        self.answering = True
        self.pending = None

    def answer_turn(self, tokens: Sequence[int], frames: Sequence[VisualItem] = ()) -> list[int]:
        """One turn of answer tokens as the model sampled them; ``frames`` were inserted before it.

        The first turn follows `ask` directly (frames must be empty: they go in the question chunk).
        Returns the label index of each token (the position it was sampled from).
        """
        if not self.answering:
            raise RuntimeError("answer_turn without a question")
        if not tokens:
            raise ValueError("a turn samples at least one token")
        tokens = list(tokens)
        if self.chat.im_end in tokens[:-1]:
            raise ValueError("<|im_end|> ends a turn: it must be the turn's last token")
        if self.pending is None:
            if frames:
                raise ValueError("the first turn's frames belong to the question chunk")
        else:
            self._send(answer_chunk(self.chat, frames, self.pending))
        # each token is sampled from the position of the token before it in KV
        self.labels[-1] = tokens[0]
        sources = [len(self.labels) - 1]
        for previous, token in itertools.pairwise(tokens):
            self.pieces.append(previous)
            self.labels.append(token)
            sources.append(len(self.labels) - 1)
        self.pending = tokens[-1]
        if tokens[-1] == self.chat.im_end:
            self.end_answer()
        return sources

    def end_answer(self) -> None:
        """The answer is over (the model ended it, or max_tokens / a cancel cut it)."""
        if not self.answering:
            return
        last = None if self.pending == self.chat.im_end else self.pending
        self.carry = closing(self.chat, last)
        self.pending = None
        self.answering = False

    def flush(self) -> None:
        """Write the carried tokens into the stream (they would open the next chunk)."""
        if self.carry:
            self._send([])
