"""Tests of the streaming layout (runtime/layout.py): the chunk functions and `StreamBuilder`.

The rules under test (vllm.md, "One session = one streaming request"): a turn's last sampled token
has no KV and is re-fed at the end of the next chunk, after the frames inserted before that turn,
so the KV order is ``t1 .. t(K-1), frames, tK ...``; ``labels[i]`` is the token sampled from
position i; a finished answer's ``<|im_end|>`` (and ``\\n``) opens the next chunk.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import positional
from runtime import layout
from runtime.engine import ModelInfo
from runtime.layout import IGNORE, StreamBuilder
from runtime.tiny_model import make_tiny_model


@dataclass(frozen=True)
class Item:
    """A visual item: ``key`` tells items apart, ``grid`` is the merged grid."""

    key: int
    grid: tuple[int, int, int] = (1, 2, 2)

    @property
    def n_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def merged_grid(self) -> tuple[int, int, int]:
        return self.grid


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("tiny"), vocab="task", size="tiny")
    return ModelInfo.load(directory).chat


def text_ids(chat) -> list[int]:
    """Ordinary (non-special) token ids to play answer tokens."""
    ids = sorted(set(chat.encode("abcdefghijklmnopqrstuvwxyz red square. blue circle. green triangle")))
    special = {chat.im_start, chat.im_end, chat.vision_start, chat.vision_end, chat.image_pad}
    return [i for i in ids if i not in special]


def offsets(pieces) -> list[int]:
    """KV offset of every piece."""
    out, at = [], 0
    for piece in pieces:
        out.append(at)
        at += layout.token_length([piece])
    return out


def offset_of(pieces, item) -> int:
    return offsets(pieces)[next(i for i, p in enumerate(pieces) if p is item)]


def supervised(labels) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE]


def user_turn(chat, question: str) -> list[int]:
    return [*chat.user_turn_open(), *chat.user_turn_close(question)]


# --- answers and labels -------------------------------------------------------------------------


def test_a_stream_without_mid_answer_frames_is_the_chat_template(chat) -> None:
    a, b, c, d, e = text_ids(chat)[:5]
    builder = StreamBuilder(chat)
    builder.system("You watch a camera.")
    builder.ask("What do you see?")
    builder.answer_turn([a, b, c])
    builder.answer_turn([d, e, chat.im_end])
    builder.flush()
    ids = layout.expanded_ids(chat, builder.pieces)
    expected = [
        *chat.turn("system", "You watch a camera."),
        *chat.turn("user", "What do you see?"),
        *chat.assistant_header,
        a,
        b,
        c,
        d,
        e,
        *chat.close_assistant(),
    ]
    assert chat.turn("user", "What do you see?") == user_turn(chat, "What do you see?")
    assert ids == expected
    assert len(builder.labels) == layout.token_length(builder.pieces) == len(ids)
    # every position from the header's last token to the last answer token predicts the next id
    header_end = len(chat.turn("system", "You watch a camera.")) + len(user_turn(chat, "What do you see?"))
    header_end += len(chat.assistant_header) - 1
    assert supervised(builder.labels) == list(range(header_end, header_end + 6))
    for i in supervised(builder.labels):
        assert builder.labels[i] == ids[i + 1]
    assert not builder.answering


def test_turns_with_frames_follow_the_kv_order(chat) -> None:
    a, b, c, d, e, f, g = text_ids(chat)[:7]
    f1, f2, f3 = Item(1), Item(2, (1, 2, 3)), Item(3)
    builder = StreamBuilder(chat)
    builder.ask("What do you see?")
    first = builder.answer_turn([a, b, c])
    second = builder.answer_turn([d, e, f], frames=[f1, f2])
    third = builder.answer_turn([g, chat.im_end])
    fourth_frames = [f3]
    builder.idle_frames(fourth_frames)
    pieces, labels = builder.pieces, builder.labels
    prefix = len(user_turn(chat, "What do you see?")) + len(chat.assistant_header)
    assert pieces[prefix:] == [
        a,
        b,
        chat.vision_start,
        f1,
        chat.vision_end,
        chat.vision_start,
        f2,
        chat.vision_end,
        c,  # the re-fed last token of turn 1, after the frames
        d,
        e,
        f,  # re-fed; no frames before turn 3
        g,
        *chat.close_assistant(),  # the sampled <|im_end|> has no KV: it opens the next chunk
        chat.vision_start,
        f3,
        chat.vision_end,
    ]
    where = offsets(pieces)
    position = {id(p): where[i] for i, p in enumerate(pieces)}
    ids = layout.expanded_ids(chat, pieces)
    # turn 1: t1 from the header, t2 from t1, t3 (the K-th) from t2, which is BEFORE the frames
    assert first == [prefix - 1, prefix, prefix + 1]
    assert first[-1] < position[id(f1)]
    # turn 2: its first token is labelled at the re-fed c, AFTER the frames
    frames_end = position[id(f2)] + f2.n_tokens  # then <|vision_end|>
    assert second[0] == frames_end + 1 and ids[second[0]] == c
    assert [ids[i] for i in second] == [c, d, e]
    assert [ids[i] for i in third] == [f, g]
    for sources, tokens in ((first, [a, b, c]), (second, [d, e, f]), (third, [g, chat.im_end])):
        assert [labels[i] for i in sources] == tokens
    assert supervised(labels) == [*first, *second, *third]
    assert len(labels) == layout.token_length(pieces)


def test_one_token_turns(chat) -> None:
    a, b, c = text_ids(chat)[:3]
    item = Item(1)
    builder = StreamBuilder(chat)
    builder.ask("q")
    s1 = builder.answer_turn([a])
    s2 = builder.answer_turn([b], frames=[item])
    s3 = builder.answer_turn([c])
    builder.end_answer()
    builder.flush()
    ids = layout.expanded_ids(chat, builder.pieces)
    assert ids[s1[0]] == chat.assistant_header[-1]
    assert ids[s2[0]] == a and ids[s3[0]] == b
    assert s1[0] < offset_of(builder.pieces, item) < s2[0] == s3[0] - 1
    assert [builder.labels[i] for i in (*s1, *s2, *s3)] == [a, b, c]
    assert builder.pieces[-3:] == [c, chat.im_end, *chat.newline]


def test_an_answer_ended_by_im_end_opens_the_next_chunk_with_im_end_newline(chat) -> None:
    a, b = text_ids(chat)[:2]
    assert layout.closing(chat, None) == [chat.im_end, *chat.newline]
    builder = StreamBuilder(chat)
    builder.ask("q")
    builder.answer_turn([a, b, chat.im_end])
    assert not builder.answering and builder.carry == layout.closing(chat, None)
    before = len(builder.pieces)
    assert builder.pieces[-1] == b  # the <|im_end|> itself is not in KV yet
    builder.ask("next")
    assert builder.pieces[before : before + 1 + len(chat.newline)] == [chat.im_end, *chat.newline]
    assert builder.carry == []
    assert all(label == IGNORE for label in builder.labels[before:])


def test_an_answer_cut_by_max_tokens_closes_with_its_last_token(chat) -> None:
    a, b, c = text_ids(chat)[:3]
    assert layout.closing(chat, c) == [c, chat.im_end, *chat.newline]
    builder = StreamBuilder(chat)
    builder.ask("q")
    builder.answer_turn([a, b, c])
    builder.end_answer()
    assert builder.carry == [c, chat.im_end, *chat.newline]
    before = len(builder.labels)
    item = Item(7)
    builder.idle_frames([item])
    assert builder.pieces[-6:] == [c, chat.im_end, *chat.newline, chat.vision_start, item, chat.vision_end]
    assert all(label == IGNORE for label in builder.labels[before:])
    at_b = len(builder.labels) - layout.token_length(builder.pieces[-6:]) - 1
    assert builder.pieces[-7] == b and builder.labels[at_b] == c  # c was sampled from b's position
    builder.end_answer()  # no answer in flight: nothing happens
    assert builder.carry == []


def test_the_system_turn_opens_the_first_chunk(chat) -> None:
    for first in ("idle", "ask"):
        builder = StreamBuilder(chat)
        builder.system("You watch a camera.")
        assert builder.pieces == [] and builder.labels == []
        item = Item(1)
        if first == "idle":
            builder.idle_frames([item])
            tail = layout.frames_chunk(chat, [item])
        else:
            builder.ask("q", frames=[item])
            tail = [*layout.frames_chunk(chat, [item]), *user_turn(chat, "q"), *chat.assistant_header]
        assert builder.pieces == [*chat.turn("system", "You watch a camera."), *tail]
        assert all(label == IGNORE for label in builder.labels)


def test_idle_frame_chunks_have_no_labels(chat) -> None:
    builder = StreamBuilder(chat)
    builder.idle_frames([Item(1), Item(2, (2, 2, 2))])
    builder.idle_frames([])  # nothing to send
    builder.idle_frames([Item(3)])
    assert builder.pieces == layout.frames_chunk(chat, [Item(1), Item(2, (2, 2, 2)), Item(3)])
    assert builder.labels == [IGNORE] * layout.token_length(builder.pieces)
    assert len(builder.labels) == 3 * 2 + 4 + 8 + 4


def test_question_chunk_layout(chat) -> None:
    frame, image = Item(1), Item(2)
    body = layout.question_chunk(chat, "q?", frames=[frame], images=[image], instructions="Be brief.")
    assert body == [
        chat.vision_start,
        frame,
        chat.vision_end,
        *chat.turn("system", "Be brief."),
        *chat.user_turn_open(),
        chat.vision_start,
        image,
        chat.vision_end,
        *chat.user_turn_close("q?"),
        *chat.assistant_header,
    ]
    assert layout.answer_chunk(chat, [], 5) == [5]
    assert layout.answer_chunk(chat, [frame], 5) == [chat.vision_start, frame, chat.vision_end, 5]
    assert layout.dialogue_turn(chat, "q?", [5, 6]) == [
        *chat.turn("user", "q?"),
        *chat.assistant_header,
        5,
        6,
        *chat.close_assistant(),
    ]
    assert layout.visual_items(body) == [frame, image]


# --- errors -------------------------------------------------------------------------------------


def test_errors(chat) -> None:
    a, b = text_ids(chat)[:2]
    builder = StreamBuilder(chat)
    with pytest.raises(RuntimeError, match="without a question"):
        builder.answer_turn([a])
    builder.ask("q")
    with pytest.raises(RuntimeError, match="in flight"):
        builder.ask("again")
    with pytest.raises(RuntimeError, match="idle_frames"):
        builder.idle_frames([Item(1)])
    with pytest.raises(ValueError, match="first turn"):
        builder.answer_turn([a], frames=[Item(1)])
    with pytest.raises(ValueError, match="at least one token"):
        builder.answer_turn([])
    with pytest.raises(ValueError, match="last token"):
        builder.answer_turn([a, chat.im_end, b])
    # the rejected calls left the stream as it was: the first turn still follows the question
    assert builder.pieces[-len(chat.assistant_header) :] == list(chat.assistant_header)
    assert supervised(builder.labels) == []
    assert builder.answer_turn([a, b]) == [len(builder.labels) - 2, len(builder.labels) - 1]
    with pytest.raises(ValueError, match="last token"):
        builder.answer_turn([a, chat.im_end, b], frames=[Item(1)])
    builder.end_answer()
    with pytest.raises(RuntimeError, match="without a question"):
        builder.answer_turn([a])


def test_a_rejected_later_turn_leaves_the_stream_unchanged(chat) -> None:
    a, b = text_ids(chat)[:2]
    builder = StreamBuilder(chat)
    builder.ask("q")
    builder.answer_turn([a, b])
    pieces, labels = list(builder.pieces), list(builder.labels)
    with pytest.raises(ValueError, match="last token"):
        builder.answer_turn([a, chat.im_end, b], frames=[Item(1)])
    assert builder.pieces == pieces and builder.labels == labels


# --- rendering ----------------------------------------------------------------------------------


def test_prompt_ids_and_expanded_ids(chat) -> None:
    items = [Item(1), Item(2, (1, 3, 2)), Item(3, (2, 2, 2))]
    builder = StreamBuilder(chat)
    builder.idle_frames(items[:1])
    builder.ask("q", frames=items[1:2], images=items[2:])
    pieces = builder.pieces
    prompt = layout.prompt_ids(chat, pieces)
    expanded = layout.expanded_ids(chat, pieces)
    assert len(prompt) == len(pieces)
    assert prompt.count(chat.image_pad) == len(items)
    assert expanded.count(chat.image_pad) == sum(item.n_tokens for item in items)
    assert len(expanded) == layout.token_length(pieces) == len(builder.labels)
    assert [p for p in prompt if p != chat.image_pad] == [p for p in pieces if isinstance(p, int)]
    assert [p for p in expanded if p != chat.image_pad] == [p for p in pieces if isinstance(p, int)]
    assert layout.visual_items(pieces) == items
    for item in items:  # each item expands to its placeholders between the vision markers
        start = offset_of(pieces, item)
        assert expanded[start - 1] == chat.vision_start
        assert expanded[start : start + item.n_tokens] == [chat.image_pad] * item.n_tokens
        assert expanded[start + item.n_tokens] == chat.vision_end


def test_segments_of_a_stream(chat) -> None:
    a, b, c = text_ids(chat)[:3]
    f1, f2 = Item(1, (1, 2, 3)), Item(2)
    builder = StreamBuilder(chat)
    builder.system("sys")
    builder.idle_frames([f1])
    builder.ask("q")
    builder.answer_turn([a, b])
    builder.answer_turn([c], frames=[f2])
    builder.end_answer()  # cut: [c, <|im_end|>, \n] opens the next chunk
    builder.flush()
    segments = layout.segments_of(chat, builder.pieces)
    system = len(chat.turn("system", "sys"))
    header = len(chat.assistant_header)
    assert segments == [
        ("input", system + 1),  # system turn, <|vision_start|>
        ("vision", (1, 2, 3)),
        ("input", 1 + len(user_turn(chat, "q"))),  # <|vision_end|>, the user turn
        ("output", header + 1),  # assistant header, a
        ("input", 1),  # <|vision_start|> inside the answer is input
        ("vision", (1, 2, 2)),
        ("input", 1),
        ("output", 3),  # b (re-fed), c, <|im_end|>
        ("input", len(chat.newline)),
    ]
    assert positional.token_count(segments) == layout.token_length(builder.pieces)


def test_classify_tokens_splits_consecutive_items(chat) -> None:
    ids = [chat.vision_start, *[chat.image_pad] * 4, *[chat.image_pad] * 2, chat.vision_end]
    segments = layout.classify_tokens(
        ids,
        [(1, 1, 2, 2), (5, 1, 1, 2)],
        assistant_header=chat.assistant_header,
        im_end=chat.im_end,
        vision_markers=(chat.vision_start, chat.vision_end),
    )
    assert segments == [("input", 1), ("vision", (1, 2, 2)), ("vision", (1, 1, 2)), ("input", 1)]


# --- random sessions: a stateful property test ---------------------------------------------------

QUESTIONS = ("What do you see?", "What color is it?", "q", "Describe what you see as it happens.")
GRIDS = ((1, 1, 1), (1, 2, 2), (1, 2, 3), (2, 1, 2))


class Oracle:
    """The stream as vllm.md describes it, kept apart from `StreamBuilder`: ids, kinds and labels."""

    def __init__(self, chat) -> None:
        self.chat = chat
        self.entries: list[tuple[str, object]] = []  # ("input" | "output", id) or ("vision", item)
        self.labels: list[int] = []
        self.carry: list[tuple[str, object]] = []
        self.pending: int | None = None
        self.answering = False

    def frames(self, items) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        for item in items:
            out += [("input", self.chat.vision_start), ("vision", item), ("input", self.chat.vision_end)]
        return out

    def send(self, entries) -> None:
        chunk, self.carry = [*self.carry, *entries], []
        self.entries += chunk
        for kind, value in chunk:
            self.labels += [IGNORE] * (value.n_tokens if kind == "vision" else 1)

    def system(self, text: str) -> None:
        self.carry += [("input", i) for i in self.chat.turn("system", text)]

    def idle(self, items) -> None:
        if items:
            self.send(self.frames(items))

    def ask(self, question: str, items) -> None:
        user = [("input", i) for i in user_turn(self.chat, question)]
        self.send([*self.frames(items), *user, *(("output", i) for i in self.chat.assistant_header)])
        self.answering, self.pending = True, None

    def turn(self, tokens, items) -> None:
        if self.pending is not None:
            self.send([*self.frames(items), ("output", self.pending)])
        self.labels[-1] = tokens[0]
        for previous, token in itertools.pairwise(tokens):
            self.entries.append(("output", previous))
            self.labels.append(token)
        self.pending = tokens[-1]
        if tokens[-1] == self.chat.im_end:
            self.end()

    def end(self) -> None:
        head = [] if self.pending == self.chat.im_end else [("output", self.pending)]
        self.carry = [*head, ("output", self.chat.im_end), *(("input", i) for i in self.chat.newline)]
        self.answering, self.pending = False, None

    def ids(self) -> list[int]:
        out: list[int] = []
        for kind, value in self.entries:
            out += [self.chat.image_pad] * value.n_tokens if kind == "vision" else [value]
        return out

    def segments(self) -> list[tuple[str, object]]:
        segments: list[tuple[str, object]] = []
        for kind, value in self.entries:
            if kind == "vision":
                segments.append(("vision", value.merged_grid))
            elif segments and segments[-1][0] == kind:
                segments[-1] = (kind, segments[-1][1] + 1)
            else:
                segments.append((kind, 1))
        return segments


class StreamMachine(RuleBasedStateMachine):
    """Random sessions: idle frames, questions, answer turns of random length with random frames."""

    chat = None  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.builder = StreamBuilder(self.chat)
        self.oracle = Oracle(self.chat)
        self.keys = itertools.count()
        self.turns: list[tuple[list[int], list[int], list[Item]]] = []  # (tokens, sources, frames)
        self.answer_turns: list[tuple[list[int], list[int], list[Item]]] = []
        self.words = text_ids(self.chat)

    def make_items(self, grids) -> list[Item]:
        return [Item(next(self.keys), GRIDS[g]) for g in grids]

    @initialize(system=st.one_of(st.none(), st.sampled_from(("You watch a camera.", "sys"))))
    def open(self, system) -> None:
        if system is not None:
            self.builder.system(system)
            self.oracle.system(system)

    @precondition(lambda self: not self.builder.answering)
    @rule(grids=st.lists(st.integers(0, len(GRIDS) - 1), max_size=4))
    def idle_frames(self, grids) -> None:
        items = self.make_items(grids)
        self.builder.idle_frames(items)
        self.oracle.idle(items)

    @precondition(lambda self: not self.builder.answering)
    @rule(question=st.sampled_from(QUESTIONS), grids=st.lists(st.integers(0, len(GRIDS) - 1), max_size=3))
    def ask(self, question, grids) -> None:
        items = self.make_items(grids)
        self.builder.ask(question, frames=items)
        self.oracle.ask(question, items)
        self.answer_turns = []

    @precondition(lambda self: self.builder.answering)
    @rule(
        data=st.data(),
        length=st.integers(1, 5),
        grids=st.lists(st.integers(0, len(GRIDS) - 1), max_size=3),
        ends=st.booleans(),
    )
    def answer_turn(self, data, length, grids, ends) -> None:
        tokens = data.draw(st.lists(st.sampled_from(self.words), min_size=length, max_size=length))
        if ends and data.draw(st.integers(0, 3)) == 0:
            tokens[-1] = self.chat.im_end
        items = self.make_items(grids) if self.answer_turns else []
        before = layout.token_length(self.builder.pieces)
        sources = self.builder.answer_turn(tokens, frames=items)
        self.oracle.turn(tokens, items)
        turn = (tokens, sources, items)
        # the structure of this turn, in its own terms
        ids = layout.expanded_ids(self.chat, self.builder.pieces)
        assert sources == sorted(set(sources)) and len(sources) == len(tokens)
        if not self.answer_turns:
            assert sources[0] == before - 1 and ids[sources[0]] == self.chat.assistant_header[-1]
        else:
            previous_tokens, previous_sources, _ = self.answer_turns[-1]
            assert ids[sources[0]] == previous_tokens[-1]  # the re-fed token
            assert previous_sources[-1] < before <= sources[0]
            for item in items:  # frames before this turn: after turn n-1's last source, before ours
                start = offset_of(self.builder.pieces, item)
                assert previous_sources[-1] < start and start + item.n_tokens < sources[0]
        for k in range(1, len(tokens)):
            assert ids[sources[k]] == tokens[k - 1] and sources[k] == sources[k - 1] + 1
        self.answer_turns.append(turn)
        self.turns.append(turn)

    @precondition(lambda self: self.builder.answering and self.answer_turns)
    @rule()
    def cut(self) -> None:
        self.builder.end_answer()
        self.oracle.end()

    @rule()
    def flush(self) -> None:
        self.builder.flush()
        self.oracle.send([])

    @invariant()
    def matches_the_oracle(self) -> None:
        builder, oracle = self.builder, self.oracle
        assert builder.answering == oracle.answering
        assert layout.expanded_ids(self.chat, builder.pieces) == oracle.ids()
        assert builder.labels == oracle.labels
        assert layout.segments_of(self.chat, builder.pieces) == oracle.segments()

    @invariant()
    def labels_are_the_sampled_tokens(self) -> None:
        labels, pieces = self.builder.labels, self.builder.pieces
        assert len(labels) == layout.token_length(pieces)
        sources = [s for _, turn_sources, _ in self.turns for s in turn_sources]
        assert supervised(labels) == sorted(sources)
        for tokens, turn_sources, _ in self.turns:
            assert [labels[s] for s in turn_sources] == tokens

    @invariant()
    def renders_and_classifies(self) -> None:
        pieces = self.builder.pieces
        items = layout.visual_items(pieces)
        prompt, ids = layout.prompt_ids(self.chat, pieces), layout.expanded_ids(self.chat, pieces)
        assert len(prompt) == len(pieces) and prompt.count(self.chat.image_pad) == len(items)
        assert ids.count(self.chat.image_pad) == sum(item.n_tokens for item in items)
        segments = layout.segments_of(self.chat, pieces)
        assert positional.token_count(segments) == len(ids)
        assert [s[1] for s in segments if s[0] == "vision"] == [item.merged_grid for item in items]
        kinds = [k for k, n in segments for _ in range(n if k != "vision" else 0) if k != "vision"]
        text = [p for p in ids if p != self.chat.image_pad]
        assert len(kinds) == len(text)
        for kind, token in zip(kinds, text, strict=True):
            if token in (self.chat.vision_start, self.chat.vision_end):
                assert kind == "input"
        flat = []  # per-position kind, vision included
        for kind, value in segments:
            flat += [kind] * (positional.token_count([(kind, value)]))
        for source in supervised(self.builder.labels):  # tokens are sampled from the model's own turn
            assert flat[source] == "output"


def test_random_sessions_keep_the_layout_invariants(chat) -> None:
    StreamMachine.chat = chat
    machine = StreamMachine.TestCase
    machine.settings = settings(
        max_examples=60,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    machine("runTest").runTest()
