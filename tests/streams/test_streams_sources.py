"""Sources behind the common async-iterator interface: synthetic, numpy push, files through PyAV."""

from __future__ import annotations

import asyncio
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from streams_loopback import settle_tasks

import streams.sources
from streams import FileSource, PushSource, SyntheticSource, pattern

FILE_FPS = 10
FILE_FRAMES = 20


def write_pattern_video(path: Path, codec: str, frames: int = FILE_FRAMES, size=(160, 120)) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FILE_FPS)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, FILE_FPS)
        if codec == "libx264":
            stream.options = {"crf": "18"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern.encode(100 + i, *size), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_pattern_video(folder / "pattern.mp4", "libx264"),
        "mkv": write_pattern_video(folder / "pattern.mkv", "libvpx"),
    }


async def test_synthetic_as_fast_as_consumed_samples_exact_counters() -> None:
    source = SyntheticSource(30, (64, 48), count=90, realtime=False, fps=2, max_age=None)
    frames = [f async for f in source]
    assert [pattern.decode(f.rgb) for f in frames] == list(range(0, 90, 15))
    assert [f.timestamp for f in frames] == [i * 0.5 for i in range(6)]
    stats = source.stats()
    assert (stats.received, stats.sampled, stats.decoded, stats.delivered) == (90, 6, 6, 6)
    assert stats.dropped == {"rate": 84}
    await source.close()


async def test_synthetic_realtime_is_paced() -> None:
    before = asyncio.all_tasks()
    start = time.monotonic()
    async with SyntheticSource(30, (64, 48), count=15, fps=None, max_age=None) as source:
        counters = [pattern.decode(f.rgb) async for f in source]
    assert time.monotonic() - start >= 14 / 30
    assert counters == list(range(15))
    assert not await settle_tasks(before)


async def test_conversion_runs_off_the_loop_and_caps_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = []
    real = streams.sources.to_rgb

    def spy(image, max_size):
        threads.append(threading.current_thread())
        return real(image, max_size)

    monkeypatch.setattr(streams.sources, "to_rgb", spy)
    source = SyntheticSource(30, (640, 480), count=30, realtime=False, fps=2, max_size=(320, 320))
    frames = [f async for f in source]
    assert {f.rgb.shape for f in frames} == {(240, 320, 3)}
    assert [pattern.decode(f.rgb) for f in frames] == [0, 15]
    assert len(threads) == 2  # only the sampled frames were converted
    assert threading.main_thread() not in threads
    await source.close()


async def test_push_source_numpy_and_av_frames() -> None:
    source = PushSource(fps=None, buffer_size=8, max_age=None, max_size=(80, 80))
    buffer = pattern.encode(7, 160, 120)
    assert source.push(buffer, timestamp=0.0)
    buffer[:] = 0  # the caller reuses its buffer: the pushed frame was copied
    await asyncio.sleep(0.1)  # a push while the converter is still busy replaces the waiting frame
    video = av.VideoFrame.from_ndarray(pattern.encode(8, 160, 120), format="rgb24")
    assert source.push(video, timestamp=0.1)
    await asyncio.sleep(0.2)
    assert source.push(np.zeros((4, 4), np.float32), timestamp=0.2)  # unconvertible: counted as error
    source.end()
    frames = [f async for f in source]
    assert [pattern.decode(f.rgb) for f in frames] == [7, 8]
    assert frames[0].rgb.shape == (60, 80, 3)
    assert source.stats().dropped == {"error": 1}
    with pytest.raises(RuntimeError):
        source.push(buffer)
    await source.close()


async def test_push_source_is_bounded_when_nobody_reads() -> None:
    source = PushSource(fps=None, buffer_size=3, max_age=None)
    for i in range(50):
        source.push(pattern.encode(i, 32, 32), timestamp=i / 30)
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.1)
    stats = source.stats()
    assert stats.queues["buffer"] <= 3 and stats.queues["convert"] <= 1
    assert stats.dropped["overflow"] >= 46
    source.end()
    counters = [pattern.decode(f.rgb) async for f in source]
    assert counters == [47, 48, 49]  # the newest
    await source.close()


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
async def test_file_source_reads_every_frame_in_order(videos: dict[str, Path], kind: str) -> None:
    async with FileSource(videos[kind], realtime=False, fps=None, max_age=None, buffer_size=2) as source:
        frames = [f async for f in source]
    assert [pattern.decode(f.rgb) for f in frames] == list(range(100, 100 + FILE_FRAMES))
    assert np.allclose([f.timestamp for f in frames], np.arange(FILE_FRAMES) / FILE_FPS)
    assert source.end_reason == "eof"
    assert source.stats().dropped == {}


async def test_file_source_loops_with_increasing_timestamps(videos: dict[str, Path]) -> None:
    before = asyncio.all_tasks()
    source = FileSource(videos["mkv"], loop=True, realtime=False, fps=2, max_age=None)
    frames = []
    async for frame in source:
        frames.append(frame)
        if len(frames) == 10:
            break
    await source.close()
    assert np.allclose([f.timestamp for f in frames], np.arange(10) * 0.5)
    # 20 frames at 10 fps = 2 s per loop, 2 fps: counters 100, 105, 110, 115, then again
    assert [pattern.decode(f.rgb) for f in frames] == [100, 105, 110, 115] * 2 + [100, 105]
    assert not await settle_tasks(before)


async def test_file_source_realtime_paces_at_file_rate(videos: dict[str, Path]) -> None:
    start = time.monotonic()
    async with FileSource(videos["mp4"], fps=None, max_age=None) as source:
        frames = [f async for f in source]
    assert time.monotonic() - start >= (FILE_FRAMES - 1) / FILE_FPS - 0.05
    assert len(frames) == FILE_FRAMES
    ages = [f.arrival - frames[0].arrival - f.timestamp for f in frames]
    assert max(abs(a) for a in ages) < 0.1


async def test_file_source_missing_file_raises_from_iteration(tmp_path: Path) -> None:
    source = FileSource(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError):
        async for _ in source:
            pass
    assert source.end_reason == "error"
    await source.close()
