"""The speakwatch runtime: sessions on a vLLM engine, perception, memory, the server.

``from runtime import Runtime`` is the embedded SDK. Names are imported lazily so that the engine
process, which imports `runtime.vllm_models`, does not pay for the rest.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.runtime import Runtime, RuntimeSettings
    from runtime.session import Response, Session
    from streams.change import ChangeFilterSettings

__all__ = ["ChangeFilterSettings", "Response", "Runtime", "RuntimeSettings", "Session"]


def __getattr__(name: str):
    if name in ("Runtime", "RuntimeSettings"):
        from runtime import runtime as module

        return getattr(module, name)
    if name in ("Session", "Response"):
        from runtime import session as module

        return getattr(module, name)
    if name == "ChangeFilterSettings":  # the type of RuntimeSettings.change_filter and Session.update's
        from streams.change import ChangeFilterSettings

        return ChangeFilterSettings
    raise AttributeError(name)
