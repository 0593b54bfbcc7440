"""The fake runtime of the server tests and the real runtime both serve `runtime.server.contract`.

Method names, parameters (names, kinds, defaults) and async-ness are compared with the protocols, so a
change to `Session`, `Runtime` or the fake that the other side does not follow fails here, not in an
engine test (or not at all).
"""

from __future__ import annotations

import inspect
from typing import get_type_hints

import pytest
from fake_runtime import FakeResponse, FakeRuntime, FakeSession

from runtime.runtime import Runtime
from runtime.server.contract import ServedResponse, ServedRuntime, ServedSession
from runtime.session import Response, Session
from runtime.wire import SessionStats

PAIRS = [
    (ServedRuntime, Runtime, FakeRuntime),
    (ServedSession, Session, FakeSession),
    (ServedResponse, Response, FakeResponse),
]


def members(protocol: type) -> dict[str, object]:
    """The protocol's own methods and properties (``__aiter__`` is the one dunder it requires)."""
    return {
        name: value
        for name, value in vars(protocol).items()
        if (not name.startswith("_") or name == "__aiter__")
        and (callable(value) or isinstance(value, property))
    }


def shape(function: object) -> tuple[bool, list[tuple[str, object, object]]]:
    """(async?, [(name, kind, default)]) of a method, without ``self``: what a caller relies on."""
    signature = inspect.signature(function)  # type: ignore[arg-type]
    params = [(p.name, p.kind, p.default) for p in signature.parameters.values() if p.name != "self"]
    return inspect.iscoroutinefunction(function), params


def has_attribute(cls: type, name: str) -> bool:
    """A property, class attribute or dataclass field, or an attribute that ``__init__`` sets."""
    if any(name in vars(klass) for klass in cls.__mro__):
        return True
    if name in getattr(cls, "__dataclass_fields__", {}):
        return True
    source = inspect.getsource(cls.__init__)
    return f"self.{name} =" in source or f"self.{name}:" in source


@pytest.mark.parametrize(("protocol", "real", "fake"), PAIRS, ids=lambda c: c.__name__)
def test_real_and_fake_serve_the_contract(protocol: type, real: type, fake: type) -> None:
    for name, member in members(protocol).items():
        for cls in (real, fake):
            if isinstance(member, property):
                assert has_attribute(cls, name), f"{cls.__name__} has no attribute {name!r}"
                continue
            implementation = getattr(cls, name, None)
            assert callable(implementation), f"{cls.__name__} has no method {name!r}"
            assert shape(implementation) == shape(member), (
                f"{cls.__name__}.{name}{inspect.signature(implementation)} does not match "
                f"{protocol.__name__}.{name}{inspect.signature(member)}"  # type: ignore[arg-type]
            )


def test_the_contract_check_catches_a_drift() -> None:
    class Drifted(FakeSession):
        def ask(self, text: str, max_tokens: int | None = None) -> FakeResponse:  # type: ignore[override]
            raise NotImplementedError

    assert shape(Drifted.ask) != shape(ServedSession.ask)


@pytest.mark.parametrize("cls", [Session, FakeSession], ids=lambda c: c.__name__)
def test_sessions_report_typed_stats(cls: type) -> None:
    assert get_type_hints(cls.stats)["return"] is SessionStats
