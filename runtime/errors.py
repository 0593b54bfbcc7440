"""Errors the runtime raises to its users (SDK callers and the server)."""


class SpeakwatchError(Exception):
    """Base class of speakwatch's own errors."""


class ResponseActive(SpeakwatchError, RuntimeError):
    """A question was asked while the session is still answering the previous one.

    We reject rather than queue: a queued question would be answered against frames that are
    stale by the time it starts, and the caller can cancel first if it wants the new question.
    """


class EngineUnavailable(SpeakwatchError):
    """The engine is not running (still loading, shut down, or dead)."""


class SessionClosed(SpeakwatchError, RuntimeError):
    """The session was closed."""
