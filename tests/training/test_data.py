"""Tests of the training data (runtime/training/data.py, synthetic.py): JSONL parsing and `lay_out`."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime import layout
from runtime.engine import ModelInfo
from runtime.tiny_model import make_tiny_model
from runtime.training import data as data_module
from runtime.training import scenes, synthetic
from runtime.training.data import (
    DataError,
    Exchange,
    FrameRef,
    Phrase,
    Sample,
    lay_out,
    read_jsonl,
    supervised_positions,
)
from runtime.training.synthetic import synthetic_sample

GRID = (1, 4, 4)  # every frame's grid in the layout tests: 4 tokens after the 2x2 merge
MERGE = 2


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("tiny"), vocab="task", size="tiny")
    return ModelInfo.load(directory).chat


# --- JSONL ------------------------------------------------------------------------------------------


def write_video(path: Path, n: int = 10, fps: int = 2, size: tuple[int, int] = (48, 64)) -> None:
    height, width = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            rgb = np.full((height, width, 3), i * 25, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_frames(folder: Path, n: int = 3) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(n):
        rgb = np.zeros((12, 16, 3), dtype=np.uint8)
        rgb[..., i % 3] = 40 * (i + 1)
        Image.fromarray(rgb).save(folder / f"{i:03d}.png")
        frames.append(rgb)
    (folder / "notes.txt").write_text("not an image")
    return frames


@pytest.fixture()
def clips(tmp_path: Path) -> Path:
    frames = write_frames(tmp_path / "clips" / "a")
    np.save(tmp_path / "a.npy", np.stack(frames))
    write_video(tmp_path / "clips" / "v.mp4")
    (tmp_path / "clips" / "empty").mkdir()
    (tmp_path / "clips" / "broken").mkdir()
    (tmp_path / "clips" / "broken" / "000.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "clips" / "bad.mp4").write_bytes(b"not a video" * 50)
    return tmp_path


def write_jsonl(path: Path, records: list[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def frames_record(**changes) -> dict:
    record = {
        "id": "clip-a",
        "frames": "clips/a",
        "fps": 2.0,
        "system": "You watch a camera.",
        "exchanges": [
            {"at": 0.5, "question": "What do you see?", "answer": "a red square"},
            {
                "at": 1.0,
                "question": "Describe what you see as it happens.",
                "answer": [{"at": 1.0, "text": "red square."}, {"at": 1.0, "text": "blue circle."}],
                "complete": False,
            },
        ],
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


def test_a_frames_folder_parses(clips: Path) -> None:
    path = write_jsonl(clips / "train.jsonl", [frames_record(), "", frames_record(id=None, fps=4)])
    first, second = list(read_jsonl(path))
    expected = np.load(clips / "a.npy")
    assert len(first.frames) == 3 and first.times == (0.0, 0.5, 1.0)
    for frame, png in zip(first.frames, expected, strict=True):  # in name order, RGB
        assert frame.shape == (12, 16, 3) and np.array_equal(frame, png)
    assert first.system == "You watch a camera." and first.name == "clip-a"
    plain, commentary = first.exchanges
    assert plain == Exchange(0.5, "What do you see?", (Phrase(0.5, "a red square"),), True)
    assert commentary.answer == (Phrase(1.0, "red square."), Phrase(1.0, "blue circle."))
    assert commentary.complete is False
    assert second.times == (0.0, 0.25, 0.5)
    assert "line 3" in second.name  # no id: named by its line


@pytest.mark.parametrize(("fps", "times"), [(None, [i / 2 for i in range(10)]), (1, [0, 1, 2, 3, 4])])
def test_a_video_parses(clips: Path, fps, times) -> None:
    record = frames_record(frames=None, video="clips/v.mp4", fps=fps)
    (sample,) = read_jsonl(write_jsonl(clips / "train.jsonl", [record]))
    assert len(sample.frames) == len(times)
    assert sample.times == pytest.approx(times)
    assert all(frame.shape == (48, 64, 3) and frame.dtype == np.uint8 for frame in sample.frames)
    means = [float(frame.mean()) for frame in sample.frames]  # the frames taken, in order
    assert means == sorted(means)
    assert means[-1] == pytest.approx(25 * (10 - 10 // len(times)), abs=6)


def _exchange(**changes) -> dict:
    exchange = {"at": 0.5, "question": "What do you see?", "answer": "a red square"}
    exchange.update(changes)
    return exchange


BAD = {
    "missing exchanges": (dict(exchanges=None), ["'exchanges'"]),
    "empty exchanges": (dict(exchanges=[]), ["'exchanges'"]),
    "exchanges not a list": (dict(exchanges={"at": 1}), ["'exchanges'"]),
    "exchange not an object": (dict(exchanges=["hi"]), ["exchanges[0]"]),
    "missing at": (dict(exchanges=[{"question": "q", "answer": "a"}]), ["exchanges[0]", "'at'"]),
    "at not a number": (dict(exchanges=[_exchange(at="1")]), ["exchanges[0]", "'at'"]),
    "empty question": (dict(exchanges=[_exchange(question="  ")]), ["exchanges[0]", "'question'"]),
    "question not a string": (dict(exchanges=[_exchange(question=3)]), ["exchanges[0]", "'question'"]),
    "missing answer": (dict(exchanges=[{"at": 0, "question": "q"}]), ["exchanges[0]", "'answer'"]),
    "bad answer type": (dict(exchanges=[_exchange(answer=5)]), ["exchanges[0]", "'answer'"]),
    "empty answer": (dict(exchanges=[_exchange(answer="")]), ["exchanges[0]", "'answer'"]),
    "empty phrase list": (dict(exchanges=[_exchange(answer=[])]), ["exchanges[0]", "'answer'"]),
    "phrase not an object": (dict(exchanges=[_exchange(answer=["red"])]), ["exchanges[0]", "answer[0]"]),
    "phrase without text": (
        dict(exchanges=[_exchange(answer=[{"at": 0.5}])]),
        ["exchanges[0]", "answer[0]", "'text'"],
    ),
    "timed phrase before the question": (
        dict(exchanges=[_exchange(at=1.0, answer=[{"at": 0.5, "text": "red"}])]),
        ["exchanges[0]", "answer[0]", "'at'"],
    ),
    "timed phrase before the one before": (
        dict(exchanges=[_exchange(answer=[{"at": 1.0, "text": "a"}, {"at": 0.75, "text": "b"}])]),
        ["exchanges[0]", "answer[1]", "'at'"],
    ),
    "at going back": (dict(exchanges=[_exchange(at=1.0), _exchange(at=0.5)]), ["exchanges[1]", "'at'"]),
    "at before the last phrase": (
        dict(exchanges=[_exchange(answer=[{"at": 1.0, "text": "a"}]), _exchange(at=0.75)]),
        ["exchanges[1]", "'at'"],
    ),
    "complete not a bool": (dict(exchanges=[_exchange(complete="no")]), ["exchanges[0]", "'complete'"]),
    "complete a number": (dict(exchanges=[_exchange(complete=0)]), ["exchanges[0]", "'complete'"]),
    "system not a string": (dict(system=["a"]), ["'system'"]),
    "both video and frames": (dict(video="clips/v.mp4"), ["'video'", "'frames'"]),
    "neither video nor frames": (dict(frames=None), ["'video'", "'frames'"]),
    "missing folder": (dict(frames="clips/nowhere"), ["'frames'", "nowhere"]),
    "folder without images": (dict(frames="clips/empty"), ["'frames'", "no images"]),
    "broken image file": (dict(frames="clips/broken"), ["'frames'", "000.png"]),
    "frames not a string": (dict(frames=3), ["'frames'"]),
    "missing video": (dict(frames=None, video="clips/none.mp4"), ["'video'", "none.mp4"]),
    "unreadable video": (dict(frames=None, video="clips/bad.mp4"), ["'video'", "bad.mp4"]),
    "fps negative": (dict(fps=-1), ["'fps'"]),
    "fps not a number": (dict(fps="2"), ["'fps'"]),
    "fps a bool": (dict(fps=True), ["'fps'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_name_the_line_id_and_field(clips: Path, case: str) -> None:
    changes, words = BAD[case]
    record = frames_record(id="bad", **changes)
    path = write_jsonl(clips / "train.jsonl", [frames_record(), "", record])
    with pytest.raises(DataError) as caught:
        list(read_jsonl(path))
    message = str(caught.value)
    assert "train.jsonl line 3 (id 'bad')" in message
    for word in words:
        assert word in message, (case, message)


@pytest.mark.parametrize(
    ("line", "words"), [("{not json", ["line 2", "not valid JSON"]), ("[1, 2]", ["line 2", "JSON object"])]
)
def test_lines_that_are_not_samples(clips: Path, line: str, words: list[str]) -> None:
    path = write_jsonl(clips / "train.jsonl", [frames_record(), line])
    samples = read_jsonl(path)
    assert next(samples).name == "clip-a"  # the good line before it parses
    with pytest.raises(DataError) as caught:
        next(samples)
    for word in words:
        assert word in str(caught.value)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        list(read_jsonl(tmp_path / "nothing.jsonl"))


def test_zero_fps_is_rejected(clips: Path) -> None:
    path = write_jsonl(clips / "train.jsonl", [frames_record(id="bad", fps=0)])
    with pytest.raises(DataError, match="'fps'"):
        list(read_jsonl(path))


def test_an_empty_timed_phrase_is_rejected(clips: Path) -> None:
    exchange = _exchange(answer=[{"at": 0.5, "text": ""}], complete=False)
    path = write_jsonl(clips / "train.jsonl", [frames_record(id="bad", exchanges=[exchange])])
    with pytest.raises(DataError, match="'text'"):
        list(read_jsonl(path))


# --- lay_out ------------------------------------------------------------------------------------


def make_sample(times, exchanges, system=None) -> Sample:
    frames = tuple(np.zeros((4, 4, 3), dtype=np.uint8) for _ in times)
    return Sample(frames, tuple(times), tuple(exchanges), system, "test")


def lay(sample, chat, turn_tokens=3, seed=0, **kwargs):
    grids = [GRID] * len(sample.times)
    return lay_out(sample, chat, grids, MERGE, turn_tokens, np.random.default_rng(seed), **kwargs)


def answer_tokens(chat, exchange) -> tuple[list[int], list[int]]:
    """The answer's tokens as a live model would sample them, and where each phrase starts."""
    tokens, starts = [], []
    for k, phrase in enumerate(exchange.answer):
        starts.append(len(tokens))
        tokens += chat.encode(phrase.text if k == 0 or phrase.text.startswith(" ") else " " + phrase.text)
    if exchange.complete:
        tokens.append(chat.im_end)
    return tokens, starts


class Stream:
    """Where things sit in a laid-out sample."""

    def __init__(self, chat, sample, laid) -> None:
        self.laid = laid
        ids = layout.expanded_ids(chat, laid.pieces)
        self.frame_at: dict[int, int] = {}  # frame index -> KV offset of its first placeholder
        at = 0
        for piece in laid.pieces:
            if isinstance(piece, FrameRef):
                self.frame_at[piece.frame] = at
            at += layout.token_length([piece])
        header = list(chat.assistant_header)
        self.headers = [i for i in range(len(ids)) if ids[i : i + len(header)] == header]
        assert len(self.headers) == len(sample.exchanges)
        self.frame_end = {f: at + FrameRef(f, GRID, MERGE).n_tokens - 1 for f, at in self.frame_at.items()}

    def frames_before(self, position: int) -> set[int]:
        """Frames wholly in KV before ``position`` (what the token sampled there sees)."""
        return {f for f, end in self.frame_end.items() if end < position}

    def exchange_labels(self, index: int) -> list[int]:
        """Supervised positions of exchange ``index``'s answer, in order."""
        start = self.headers[index]
        stop = self.headers[index + 1] if index + 1 < len(self.headers) else len(self.laid.labels)
        return [i for i in supervised_positions(self.laid) if start <= i < stop]


def check_layout(chat, sample: Sample, laid) -> Stream:
    """The invariants of a laid-out sample whose phrases never start in the first turn."""
    stream = Stream(chat, sample, laid)
    times = np.asarray(sample.times)
    assert len(laid.labels) == layout.token_length(laid.pieces)
    assert laid.items == [p for p in laid.pieces if isinstance(p, FrameRef)]
    # every frame the sample looks at appears once, in order
    last_time = max(phrase.at for exchange in sample.exchanges for phrase in exchange.answer)
    looked_at = int((times <= last_time + 1e-9).sum())
    frames = [item.frame for item in laid.items]
    assert frames == list(range(len(frames))) and len(frames) >= looked_at
    for index, exchange in enumerate(sample.exchanges):
        header = stream.headers[index]
        # a question sees exactly the frames up to its time
        assert stream.frames_before(header) == set(np.flatnonzero(times <= exchange.at + 1e-9).tolist())
        tokens, starts = answer_tokens(chat, exchange)
        positions = stream.exchange_labels(index)
        assert [laid.labels[i] for i in positions] == tokens
        assert positions[0] == header + len(chat.assistant_header) - 1
        # complete answers end with <|im_end|>, cut-off ones never sample it
        assert (tokens[-1] == chat.im_end) == exchange.complete
        assert chat.im_end not in tokens[:-1]
        for k, phrase in enumerate(exchange.answer):
            first = positions[starts[k]]
            due = set(np.flatnonzero(times <= phrase.at + 1e-9).tolist())
            assert due <= stream.frames_before(first), f"phrase {k} cannot see its frames"
            assert stream.frames_before(first) <= due, f"phrase {k} sees frames after its time"
    return stream


PHRASES = ("red square.", "blue circle.", "green triangle.", "a white square", "black circle.")


@st.composite
def samples(draw) -> Sample:
    """Random streams: frames before each question, phrases with up to two new frames each."""
    times: list[float] = []
    clock = 0.0

    def show(n: int) -> None:
        nonlocal clock
        for _ in range(n):
            times.append(clock)
            clock += draw(st.sampled_from((0.25, 0.5, 1.0)))

    exchanges = []
    for k in range(draw(st.integers(1, 3))):
        show(draw(st.integers(1 if k == 0 else 0, 7)))
        asked = times[-1] if times and draw(st.booleans()) else clock
        if not times or times[-1] > asked:
            show(1)
            asked = times[-1]
        if exchanges:  # exchanges never go back in time (parse_record rejects that)
            asked = max(asked, exchanges[-1].answer[-1].at)
        phrases = [Phrase(asked, draw(st.sampled_from(PHRASES)))]
        for _ in range(draw(st.integers(0, 4))):
            show(draw(st.integers(0, 2)))
            phrases.append(Phrase(max(phrases[-1].at, times[-1]), draw(st.sampled_from(PHRASES))))
        exchanges.append(Exchange(asked, "What do you see?", tuple(phrases), draw(st.booleans())))
    system = draw(st.sampled_from((None, "You watch a camera.")))
    return make_sample(times, exchanges, system)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample=samples(), turn_tokens=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_lay_out_invariants(chat, sample, turn_tokens, seed) -> None:
    # every phrase is at least 3 tokens (K), so no later phrase starts in the first turn
    assert min(len(chat.encode(p)) for text in PHRASES for p in (text, " " + text)) >= 3
    laid = lay(sample, chat, turn_tokens, seed)
    check_layout(chat, sample, laid)
    again = lay(sample, chat, turn_tokens, seed)  # a fixed rng: the same layout
    assert again.pieces == laid.pieces and again.labels == laid.labels


def test_frames_go_in_before_the_phrase_that_describes_them(chat) -> None:
    exchange = Exchange(0.0, "Describe.", (Phrase(0.0, "red square."), Phrase(1.0, "blue circle.")), False)
    sample = make_sample([0.0, 0.5, 1.0, 1.5], [exchange])
    laid = lay(sample, chat, turn_tokens=2)
    stream = check_layout(chat, sample, laid)
    tokens, starts = answer_tokens(chat, exchange)
    positions = stream.exchange_labels(0)
    # phrase 2 starts at token 3: frames 1 and 2 go in at the turn boundary at token 2, before its
    # first token is sampled; the re-fed token 1 ("." of "red square.") follows them
    assert stream.frame_at[1] > positions[1] and stream.frame_end[2] < positions[2]
    assert tokens[-1] != chat.im_end and len(positions) == len(tokens) == starts[1] * 2


def test_tokens_sampled_before_their_frame_get_no_loss(chat) -> None:
    exchange = Exchange(0.0, "Describe.", (Phrase(0.0, "red square."), Phrase(0.5, "blue circle.")), True)
    sample = make_sample([0.0, 0.5], [exchange])
    laid = lay(sample, chat, turn_tokens=4)
    tokens, starts = answer_tokens(chat, exchange)
    assert starts[1] < 4  # phrase 2 starts in the first turn: its frame can only follow that turn
    stream = Stream(chat, sample, laid)
    labelled = [laid.labels[i] for i in stream.exchange_labels(0)]
    # phrase 1 keeps its loss; of phrase 2 only the tokens sampled before its frame entered KV
    # (those of the first turn) lose theirs: the rest are sampled after the frame
    assert labelled == tokens[: starts[1]] + tokens[4:]
    assert [item.frame for item in laid.items] == [0, 1]
    # the frame went in at the boundary after the first turn (4 tokens sampled, 3 of them in KV)
    header_last = stream.headers[0] + len(chat.assistant_header) - 1
    assert stream.frame_at[1] == header_last + 5
    assert layout.expanded_ids(chat, laid.pieces)[header_last + 1 : header_last + 5] == [
        *tokens[:3],
        chat.vision_start,
    ]


def test_every_phrase_of_the_first_turn_waits_for_its_frames(chat) -> None:
    exchange = Exchange(
        0.0,
        "Describe.",
        (Phrase(0.0, "red square."), Phrase(0.5, "blue circle."), Phrase(0.5, "blue circle.")),
        True,
    )
    sample = make_sample([0.0, 0.5], [exchange])
    laid = lay(sample, chat, turn_tokens=10)
    stream = Stream(chat, sample, laid)
    blue, circle, _ = chat.encode(" blue circle.")
    assert blue not in chat.encode("red square.") and circle not in chat.encode("red square.")
    for position in stream.exchange_labels(0):  # nothing may be trained to name frame 1 before it
        if laid.labels[position] in (blue, circle):
            assert 1 in stream.frames_before(position), "names a frame not in KV"


def test_many_frames_for_one_phrase_all_precede_it(chat) -> None:
    exchange = Exchange(0.0, "Describe.", (Phrase(0.0, "red square."), Phrase(3.0, "blue circle.")), True)
    sample = make_sample([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0], [exchange])
    laid = lay(sample, chat, turn_tokens=3)  # six frames due at phrase 2, four fit in a turn
    stream = Stream(chat, sample, laid)
    tokens, starts = answer_tokens(chat, exchange)
    # four go in before phrase 2, the other two a turn later: phrase 2's first turn cannot have seen
    # them, so its tokens get no loss; what is supervised after that sees all seven frames
    positions = stream.exchange_labels(0)
    assert starts[1] == 3 and len(tokens) == 7
    assert [laid.labels[i] for i in positions] == tokens[:3] + tokens[6:]
    assert stream.frames_before(positions[-1]) == set(range(7))


def test_idle_chunking_varies_with_the_rng(chat, monkeypatch) -> None:
    """The random schedule draws how the frames before a question are chunked."""
    calls: list[tuple] = []

    class Spy(data_module.StreamBuilder):
        def idle_frames(self, items):
            calls.append(("idle", tuple(item.frame for item in items)))
            return super().idle_frames(items)

        def ask(self, question, **kwargs):
            calls.append(("ask", tuple(item.frame for item in kwargs.get("frames", ()))))
            return super().ask(question, **kwargs)

    monkeypatch.setattr(data_module, "StreamBuilder", Spy)
    exchange = Exchange(5.5, "What do you see?", (Phrase(5.5, "red square."),))
    sample = make_sample([i / 2 for i in range(12)], [exchange])
    schedules = {}
    for seed in range(12):
        calls.clear()
        laid = lay(sample, chat, seed=seed)
        schedules[seed] = tuple(calls)
        frames = [f for _, group in calls for f in group]
        assert frames == list(range(12))  # every frame once, in order, however it is chunked
        assert all(0 < len(group) <= 4 for kind, group in calls if kind == "idle")
        check_layout(chat, sample, laid)
        calls.clear()
        lay(sample, chat, seed=seed)
        assert tuple(calls) == schedules[seed]  # the same rng draws the same chunks
    assert len(set(schedules.values())) > 3


def test_how_idle_frames_were_chunked_leaves_no_trace_in_kv(chat) -> None:
    """The drawn chunking of idle frames mirrors serving, but the KV stream (what is trained) is
    the same either way: an idle chunk's one sample never enters KV (docs/training.md says so)."""
    for index in range(10):
        sample = synthetic_sample(np.random.default_rng(index))
        grids = [GRID] * len(sample.frames)
        streams = set()
        for seed in range(5):
            laid = lay_out(sample, chat, grids, MERGE, 3, np.random.default_rng(seed))
            streams.add((tuple(map(repr, laid.pieces)), tuple(laid.labels)))
        assert len(streams) == 1


def test_a_question_never_sees_later_frames(chat) -> None:
    exchanges = [
        Exchange(1.0, "What color is it?", (Phrase(1.0, "red"),)),
        Exchange(2.0, "What do you see?", (Phrase(2.0, "a red square"),)),
    ]
    sample = make_sample([0.0, 0.5, 1.0, 1.5, 2.0], exchanges, "You watch a camera.")
    for seed in range(8):
        laid = lay(sample, chat, seed=seed)
        stream = check_layout(chat, sample, laid)
        assert stream.frames_before(stream.headers[0]) == {0, 1, 2}
        assert stream.frames_before(stream.headers[1]) == {0, 1, 2, 3, 4}
        system = chat.turn("system", "You watch a camera.")
        assert layout.expanded_ids(chat, laid.pieces)[: len(system)] == system  # the system turn opens it


# --- the synthetic task ------------------------------------------------------------------------


def recorded(monkeypatch, seed: int) -> tuple[Sample, list[scenes.SceneObject]]:
    """A synthetic sample and the object shown in each of its frames."""
    shown: list[scenes.SceneObject] = []
    render = scenes.render

    def spy(obj, *args, **kwargs):
        shown.append(obj)
        return render(obj, *args, **kwargs)

    monkeypatch.setattr(synthetic.scenes, "render", spy)
    sample = synthetic_sample(np.random.default_rng(seed))
    monkeypatch.setattr(synthetic.scenes, "render", render)
    assert len(shown) == len(sample.frames)
    return sample, shown


def test_synthetic_samples_are_deterministic_per_rng() -> None:
    a, b = synthetic_sample(np.random.default_rng(3)), synthetic_sample(np.random.default_rng(3))
    assert a.times == b.times and a.exchanges == b.exchanges and a.system == b.system
    assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames, strict=True))
    others = [synthetic_sample(np.random.default_rng(seed)) for seed in range(4, 10)]
    assert any(o.exchanges != a.exchanges for o in others)


def test_synthetic_samples_are_well_formed() -> None:
    kinds = set()
    followed = 0  # commentaries a question follows (as a user asks one once it stops)
    for seed in range(40):
        sample = synthetic_sample(np.random.default_rng(seed))
        assert len(sample.frames) == len(sample.times) >= 1
        assert np.allclose(np.diff(sample.times), 1 / synthetic.FPS)
        assert sample.system in synthetic.SYSTEM_PROMPTS
        ats = [phrase.at for exchange in sample.exchanges for phrase in exchange.answer]
        assert ats == sorted(ats) and ats[-1] == sample.times[-1]
        for k, exchange in enumerate(sample.exchanges):
            commentary = exchange.question == scenes.COMMENTARY
            kinds.add(commentary)
            assert exchange.complete != commentary
            assert exchange.question in (*scenes.QUESTIONS, scenes.COMMENTARY)
            if commentary:
                assert len(exchange.answer) >= 3
                followed += k < len(sample.exchanges) - 1
            else:
                assert len(exchange.answer) == 1
    assert kinds == {True, False} and followed > 0


def test_synthetic_answers_name_the_object_in_view(monkeypatch) -> None:
    for seed in range(40):
        sample, shown = recorded(monkeypatch, seed)
        times = np.asarray(sample.times)
        for exchange in sample.exchanges:
            for phrase in exchange.answer:
                obj = shown[int(np.flatnonzero(times <= phrase.at)[-1])]
                if exchange.question == scenes.QUESTIONS[0]:
                    assert scenes.mentions(phrase.text) == [(obj.color, None)]
                elif exchange.question == scenes.QUESTIONS[1]:
                    assert scenes.mentions(phrase.text) == [(None, obj.shape)]
                else:
                    assert scenes.mentions(phrase.text) == [(obj.color, obj.shape)]


def test_laid_out_answers_name_the_object_latest_in_kv(chat, monkeypatch) -> None:
    """At K=3 each phrase's first token is sampled after the frame it names, and before any later one."""
    checked = changed = 0
    for seed in range(60):
        sample, shown = recorded(monkeypatch, seed)
        laid = lay(sample, chat, turn_tokens=3, seed=seed)
        stream = check_layout(chat, sample, laid)
        for index, exchange in enumerate(sample.exchanges):
            tokens, starts = answer_tokens(chat, exchange)
            positions = stream.exchange_labels(index)
            assert len(positions) == len(tokens)  # nothing of an answer is left without loss at K=3
            previous = None
            for k, stop in enumerate([*starts[1:], len(tokens)]):
                obj = shown[max(stream.frames_before(positions[starts[k]]))]  # latest in KV
                ids = [laid.labels[i] for i in positions[starts[k] : stop]]
                text = chat.tokenizer.decode(ids, skip_special_tokens=True)
                named = scenes.mentions(text)
                if exchange.question == scenes.QUESTIONS[0]:
                    assert named == [(obj.color, None)]
                elif exchange.question == scenes.QUESTIONS[1]:
                    assert named == [(None, obj.shape)]
                else:
                    assert named == [(obj.color, obj.shape)], (seed, k, text)
                if exchange.question == scenes.COMMENTARY:
                    changed += previous is not None and previous != named[0]
                    previous = named[0]
                checked += 1
    assert checked > 100 and changed > 3  # the object changes mid-commentary in some samples
