"""Training samples of the synthetic seeing task (runtime/training/scenes.py), as `Sample` streams.

A sample is a short camera stream at 2 fps with one to three exchanges. Plain questions are
answered about the object latest in view when asked; a commentary writes one phrase per frame
step ("red square."), each naming the object latest in view when the phrase starts, and is cut
off (no ``<|im_end|>``): at serving time a commentary runs until ``max_tokens`` or a cancel.
"""

from __future__ import annotations

import numpy as np

from runtime.training import scenes
from runtime.training.data import Exchange, Phrase, Sample

FPS = 2.0
SYSTEM_PROMPTS = (None, None, "You watch a camera.", "You are a helpful assistant.")


def synthetic_sample(rng: np.random.Generator, *, fps: float = FPS, change_p: float = 0.35) -> Sample:
    """One random stream of the seeing task (deterministic in ``rng``)."""
    size = scenes.random_clip(rng, 1)  # a random frame size
    height, width = size.height, size.width
    aspect = width / height
    background = str(rng.choice(scenes.BACKGROUNDS))
    obj = scenes.random_object(rng, aspect=aspect)
    frames: list[np.ndarray] = []
    times: list[float] = []
    clock = [0.0]

    def show(change: float) -> None:
        nonlocal obj
        if frames:
            obj = scenes.step_object(obj, rng, change_p=change, aspect=aspect)
        frames.append(scenes.render(obj, height, width, rng, background=background))
        times.append(clock[0])
        clock[0] += 1.0 / fps

    exchanges = []
    for k in range(int(rng.choice([1, 1, 2, 3]))):
        for _ in range(int(rng.integers(1 if k == 0 else 0, 4))):
            show(change_p)
        if not frames:
            show(change_p)
        asked = times[-1]
        if rng.random() < 0.35:
            phrases = [Phrase(asked, f"{obj.phrase()}.")]
            for _ in range(int(rng.integers(2, 9))):
                if rng.random() < 0.6:
                    show(0.5)
                phrases.append(Phrase(times[-1], f"{obj.phrase()}."))
            exchanges.append(Exchange(asked, scenes.COMMENTARY, tuple(phrases), complete=False))
            if rng.random() < 0.5:  # a commentary is cut off; half the time a question follows it, as
                break  # a user asks one once the commentary stops (max_tokens or a cancel)
            continue
        question = str(rng.choice(scenes.QUESTIONS))
        exchanges.append(Exchange(asked, question, (Phrase(asked, scenes.answer(question, obj)),)))
    system = SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))]
    return Sample(tuple(frames), tuple(times), tuple(exchanges), system, name="synthetic")
