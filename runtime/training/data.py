"""Training data for the streaming layout: samples, the JSONL format, and their layout.

A `Sample` is one recorded stream: frames with their times, an optional system prompt, and
exchanges (a question asked at a time, and its answer: one text, or timed phrases of a running
commentary). `lay_out` turns it into the token stream a live session would send to vLLM for it,
through `runtime.layout.StreamBuilder`, drawing at random where frames land between chunks and
answer turns (the paper's "Random schedule": serving timing decides it, so training must not
fix it).

JSONL format (one sample per line; paths relative to the file)::

    {"id": "clip-7",                            # optional; named in errors
     "video": "clips/7.mp4",                    # a video file (PyAV) ... or
     "frames": "clips/7/",                      # ... a folder of images, in name order
     "fps": 2.0,                                # frames taken per second of video / shown per second
     "system": "You watch a camera.",           # optional
     "exchanges": [
        {"at": 1.5, "question": "What do you see?", "answer": "a red square"},
        {"at": 4.0, "question": "Describe what you see as it happens.",
         "answer": [{"at": 4.0, "text": "red square."}, {"at": 5.0, "text": "blue circle."}],
         "complete": false}                     # optional: false = no <|im_end|> (a commentary cut off)
     ]}

A question sees every frame up to its time ``at``. A timed phrase sees every frame up to its
``at``: those frames are inserted into the answer at the last turn boundary before the phrase
starts, as a live session would have inserted them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.chat import ChatFormat
from runtime.layout import IGNORE, GridTokens, Piece, StreamBuilder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(ValueError):
    """Bad training data: the message names the sample and the field."""


@dataclass(frozen=True)
class Phrase:
    """A piece of an answer and the stream time it describes."""

    at: float
    text: str


@dataclass(frozen=True)
class Exchange:
    at: float
    question: str
    answer: tuple[Phrase, ...]  # one phrase (at = question time) for a plain answer
    complete: bool = True  # the answer ends with <|im_end|>


@dataclass(frozen=True)
class Sample:
    frames: tuple[np.ndarray, ...]
    times: tuple[float, ...]  # seconds, non-decreasing, one per frame
    exchanges: tuple[Exchange, ...]
    system: str | None = None
    name: str = "?"


# --- JSONL ------------------------------------------------------------------------------------


def _field(record: dict, key: str, kind: type | tuple[type, ...], where: str, *, required: bool = True):
    if key not in record:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return None
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _read_frames(record: dict, base: Path, where: str) -> tuple[list[np.ndarray], list[float]]:
    given = _field(record, "fps", (int, float), where, required=False)
    fps = 2.0 if given is None else float(given)
    if not fps > 0:
        raise DataError(f"{where}: field 'fps' must be positive")
    if ("video" in record) == ("frames" in record):
        raise DataError(f"{where}: give exactly one of 'video' (a file) or 'frames' (a folder)")
    if "frames" in record:
        folder = base / _field(record, "frames", str, where)
        if not folder.is_dir():
            raise DataError(f"{where}: field 'frames': {folder} is not a folder")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{where}: field 'frames': no images in {folder}")
        from PIL import Image, UnidentifiedImageError

        frames = []
        for path in files:
            try:
                with Image.open(path) as image:
                    frames.append(np.asarray(image.convert("RGB")))
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"{where}: field 'frames': cannot read {path.name}: {exc}") from None
        return frames, [i / fps for i in range(len(frames))]
    path = base / _field(record, "video", str, where)
    if not path.is_file():
        raise DataError(f"{where}: field 'video': {path} does not exist")
    import av

    frames, times = [], []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            next_time = 0.0
            for frame in container.decode(stream):
                t = float(frame.time or 0.0)
                if t + 1e-6 >= next_time:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    times.append(t)
                    next_time += 1.0 / fps
    except (av.error.FFmpegError, IndexError) as exc:
        raise DataError(f"{where}: field 'video': cannot decode {path.name}: {exc}") from None
    if not frames:
        raise DataError(f"{where}: field 'video': {path.name} has no frames")
    return frames, times


def parse_record(record: object, base: Path, where: str) -> Sample:
    """One JSONL record as a `Sample`, or `DataError` naming the sample and field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a sample must be a JSON object")
    name = record.get("id")
    if name is not None:
        where = f"{where} (id {name!r})"
    system = _field(record, "system", str, where, required=False)
    raw_exchanges = _field(record, "exchanges", list, where)
    if not raw_exchanges:
        raise DataError(f"{where}: field 'exchanges' is empty")
    exchanges = []
    last = -math.inf
    for i, raw in enumerate(raw_exchanges):
        here = f"{where}: exchanges[{i}]"
        if not isinstance(raw, dict):
            raise DataError(f"{here} must be an object")
        at = float(_field(raw, "at", (int, float), here))
        if at < last:
            raise DataError(f"{here}: field 'at' goes back in time ({at} < {last})")
        question = _field(raw, "question", str, here)
        if not question.strip():
            raise DataError(f"{here}: field 'question' is empty")
        answer = raw.get("answer")
        if isinstance(answer, str):
            if not answer.strip():
                raise DataError(f"{here}: field 'answer' is empty")
            phrases = (Phrase(at, answer),)
        elif isinstance(answer, list) and answer:
            items = []
            for j, item in enumerate(answer):
                where_j = f"{here}: answer[{j}]"
                if not isinstance(item, dict):
                    raise DataError(f"{where_j} must be an object with 'at' and 'text'")
                t = float(_field(item, "at", (int, float), where_j))
                if t < at or (items and t < items[-1].at):
                    raise DataError(
                        f"{where_j}: field 'at' must not precede the question or the phrase before"
                    )
                text = _field(item, "text", str, where_j)
                if not text.strip():
                    raise DataError(f"{where_j}: field 'text' is empty")
                items.append(Phrase(t, text))
            phrases = tuple(items)
        else:
            raise DataError(f"{here}: field 'answer' must be a non-empty string or list of timed phrases")
        complete = raw.get("complete", True)
        if not isinstance(complete, bool):
            raise DataError(f"{here}: field 'complete' must be true or false")
        exchanges.append(Exchange(at, question, phrases, complete))
        last = phrases[-1].at
    frames, times = _read_frames(record, base, where)
    return Sample(tuple(frames), tuple(times), tuple(exchanges), system, str(name or where))


def read_jsonl(path: str | Path) -> Iterator[Sample]:
    """Samples of a JSONL file, one per non-empty line (errors name the line and field)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON: {exc.msg}") from None
            yield parse_record(record, path.parent, where)


# --- layout -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameRef(GridTokens):
    """A visual item of a laid-out sample: which frame, and its grid (a `runtime.layout.VisualItem`)."""

    frame: int
    grid: tuple[int, int, int]  # before the merge, as image_grid_thw
    merge: int


@dataclass
class LaidOut:
    """A sample as the token stream a live session sends for it, with the trainer's labels."""

    pieces: list[Piece]
    labels: list[int]
    items: list[FrameRef] = field(default_factory=list)


def _groups(refs: list[FrameRef], rng: np.random.Generator, most: int) -> list[list[FrameRef]]:
    """Split frames into consecutive chunks of random sizes (how they happened to be ready)."""
    groups, i = [], 0
    while i < len(refs):
        n = int(rng.integers(1, most + 1))
        groups.append(refs[i : i + n])
        i += n
    return groups


def lay_out(
    sample: Sample,
    chat: ChatFormat,
    grid_of: Sequence[tuple[int, int, int]],
    merge: int,
    turn_tokens: int,
    rng: np.random.Generator,
    *,
    max_chunks_per_turn: int = 4,
) -> LaidOut:
    """The stream of ``sample`` as `Session` would send it, with its training labels.

    ``grid_of[i]`` is frame i's grid after resizing. Frames before a question go in frame chunks
    of random sizes or with the question (``rng``: how they happened to be ready; the KV order is
    the same either way). Answer turns are ``turn_tokens`` long; the frames a phrase must see are
    inserted at the last turn boundary before it starts, at most ``max_chunks_per_turn`` a turn,
    as the scheduler inserts them. A token sampled before every frame up to its phrase's time is
    in KV (a phrase starting inside the first turn, frames that spilled to a later turn) could not
    have seen it: it gets no loss.
    """
    builder = StreamBuilder(chat)
    if sample.system:
        builder.system(sample.system)
    refs = [FrameRef(i, tuple(g), merge) for i, g in enumerate(grid_of)]  # type: ignore[arg-type]
    times = sample.times
    sent = 0  # frames already in the stream
    needs: list[tuple[int, list[int]]] = []  # (frames that must be in KV, label indices of a phrase)

    def due(t: float) -> list[FrameRef]:
        nonlocal sent
        end = sent
        while end < len(refs) and times[end] <= t + 1e-9:
            end += 1
        out, sent = refs[sent:end], end
        return out

    for exchange in sample.exchanges:
        groups = _groups(due(exchange.at), rng, max_chunks_per_turn)
        with_question: list[FrameRef] = []
        if groups and rng.random() < 0.5:
            with_question = groups.pop()
        for group in groups:
            builder.idle_frames(group)
        builder.ask(exchange.question, frames=with_question)
        tokens: list[int] = []
        starts: list[int] = []
        insert_at: dict[int, list[FrameRef]] = {}
        visible: list[int] = []  # frames due by each phrase's time
        for k, phrase in enumerate(exchange.answer):
            frames = due(phrase.at) if k else []
            starts.append(len(tokens))
            visible.append(sent)
            if frames:
                boundary = max(turn_tokens, (len(tokens) // turn_tokens) * turn_tokens)
                insert_at.setdefault(boundary, []).extend(frames)
            text = phrase.text if k == 0 or phrase.text.startswith(" ") else " " + phrase.text
            tokens += chat.encode(text)
        if exchange.complete:
            tokens.append(chat.im_end)
        starts.append(len(tokens))
        label_at: list[int] = []
        spill: list[FrameRef] = []
        for start in range(0, len(tokens), turn_tokens):
            waiting = [*spill, *insert_at.pop(start, [])] if start else []
            frames_now, spill = waiting[:max_chunks_per_turn], waiting[max_chunks_per_turn:]
            label_at += builder.answer_turn(tokens[start : start + turn_tokens], frames=frames_now)
        for k in range(len(exchange.answer)):
            needs.append((visible[k], label_at[starts[k] : starts[k + 1]]))
        builder.end_answer()
        leftover = [*spill, *(f for b in sorted(insert_at) for f in insert_at[b])]
        for group in _groups(leftover, rng, max_chunks_per_turn):
            builder.idle_frames(group)
    builder.flush()
    # where each frame ends in KV; a label at position p sees the frames that end at or before p
    frame_end: list[int] = []
    offset = 0
    for piece in builder.pieces:
        offset += 1 if isinstance(piece, int) else piece.n_tokens
        if isinstance(piece, FrameRef):
            frame_end.append(offset - 1)
    for count, labels in needs:
        if count:
            last_needed = frame_end[count - 1] if count <= len(frame_end) else len(builder.labels)
            for position in labels:
                if position <= last_needed:
                    builder.labels[position] = IGNORE
    return LaidOut(builder.pieces, builder.labels, [p for p in builder.pieces if isinstance(p, FrameRef)])


def supervised_positions(laid: LaidOut) -> list[int]:
    return [i for i, label in enumerate(laid.labels) if label != IGNORE]
