"""Errors the runtime raises to its users (SDK callers and the server)."""


class SpeakwatchError(Exception):
    """Base class of speakwatch's own errors."""


class ResponseActive(SpeakwatchError, RuntimeError):
    """A question was asked while the session is still answering the previous one.

    We reject rather than queue: a queued question would be answered against frames that are
    stale by the time it starts, and the caller can cancel first if it wants the new question.
    """


class EngineUnavailable(SpeakwatchError):
    """The engine is not running (still loading, restarting after a crash, shut down, or dead).

    ``retry_after_s`` says when to try again (whole seconds) while the runtime restarts the engine;
    None when unknown, or when it will not come back.
    """

    def __init__(self, message: str = "the engine is unavailable", retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SessionClosed(SpeakwatchError, RuntimeError):
    """The session was closed."""


class SessionLimitReached(SpeakwatchError):
    """No room for another session: the engine's KV cache cannot hold one more session's budget
    on top of those already admitted (or the server is at its session limit).

    Refused at once, with the numbers, rather than admitted into a cache that would make vLLM
    preempt or stall the sessions already watching.
    """
