"""The sans-I/O realtime protocol core: event sequences, shapes, errors and state, without sockets."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.server.protocol import (
    AddUserMessage,
    AppendFrame,
    CancelResponse,
    Limits,
    RealtimeProtocol,
    ServerEvent,
    SessionConfig,
    StartResponse,
    UpdateSession,
    default_id,
    error_event,
    session_limit_reached,
)
from runtime.wire import (
    ChangeFilterConfig,
    ChangeFilterUpdate,
    InputVideoStats,
    SessionObject,
    SessionStats,
    SessionUpdate,
    SessionUpdateFields,
    VideoConfig,
    VideoUpdate,
    decode_client_event,
)
from streams.change import ChangeFilterSettings

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(40))
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
FILTER_DEFAULTS = {"enabled": True, "threshold": 6.0, "keepalive_s": 10.0}
VIDEO_DEFAULTS = {
    "max_fps": 2.0,
    "schedule": "parallel",
    "positions": "group-decoupled",
    "change_filter": FILTER_DEFAULTS,
}
USAGE = {"input_tokens": 100, "output_tokens": 7}


def data_url(raw: bytes = JPEG, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def counter_ids():
    counter = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(counter)}"


def make(limits: Limits | None = None, defaults: SessionConfig | None = None, start: bool = True):
    proto = RealtimeProtocol(
        "sess_1",
        model="tiny-qwen",
        positions="group-decoupled",
        limits=limits or Limits(),
        defaults=defaults or SessionConfig(),
        id_factory=counter_ids(),
    )
    if start:
        proto.start()
    return proto


def send(proto: RealtimeProtocol, **event: Any) -> list:
    return proto.receive(json.dumps(event))


def events(out: list) -> list[dict]:
    return [o.encode() for o in out if isinstance(o, ServerEvent)]


def items(proto: RealtimeProtocol) -> list[dict]:
    return [item.encode() for item in proto.items]


def actions(out: list) -> list:
    return [o for o in out if not isinstance(o, ServerEvent)]


def types(out: list) -> list[str]:
    return [o.type if isinstance(o, ServerEvent) else type(o).__name__ for o in out]


def only_error(out: list) -> dict:
    assert len(out) == 1 and isinstance(out[0], ServerEvent), out
    payload = out[0].encode()
    assert payload["type"] == "error"
    assert set(payload) == {"type", "event_id", "error"}
    assert set(payload["error"]) == {"type", "code", "message", "param", "event_id"}
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
    return payload["error"]


def user_message(text: str = "what is on the table?", **extra: Any) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}], **extra}


def snapshot(proto: RealtimeProtocol) -> tuple:
    return (proto.config, proto.items, proto.active_response_id, proto.usage)


def ask(proto: RealtimeProtocol, text: str = "hi", **response: Any) -> StartResponse:
    send(proto, type="conversation.item.create", item=user_message(text))
    out = send(proto, type="response.create", **({"response": response} if response else {}))
    start = out[0]
    assert isinstance(start, StartResponse)
    return start


# ---------------------------------------------------------------------------------------------
# Session start and session.update
# ---------------------------------------------------------------------------------------------


def test_session_created_is_first_and_has_the_ga_shape():
    proto = make(start=False)
    out = proto.start()
    assert events(out) == [
        {
            "type": "session.created",
            "event_id": "event_2",
            "session": {
                "type": "realtime",
                "object": "realtime.session",
                "id": "sess_1",
                "model": "tiny-qwen",
                "output_modalities": ["text"],
                "instructions": None,
                "max_output_tokens": 4096,
                "tools": [],
                "tool_choice": "auto",
                "video": VIDEO_DEFAULTS,
            },
        }
    ]
    assert actions(out) == []


def test_start_twice_and_receive_before_start_are_usage_errors():
    proto = make(start=False)
    with pytest.raises(RuntimeError):
        proto.receive("{}")
    proto.start()
    with pytest.raises(RuntimeError):
        proto.start()


def test_server_defaults_show_in_session_created_and_positions_come_from_the_engine():
    defaults = SessionConfig(
        instructions="You watch a kitchen.",
        max_output_tokens=256,
        video={"max_fps": 1.0, "positions": "sequential"},
    )
    proto = make(defaults=defaults, start=False)
    session = events(proto.start())[0]["session"]
    assert session["instructions"] == "You watch a kitchen."
    assert session["max_output_tokens"] == 256
    assert session["video"] == {
        "max_fps": 1.0,
        "schedule": "parallel",
        "positions": "group-decoupled",
        "change_filter": FILTER_DEFAULTS,
    }


def test_session_update_emits_action_then_session_updated():
    proto = make()
    out = send(
        proto,
        type="session.update",
        event_id="evt_c1",
        session={
            "type": "realtime",
            "instructions": "Be brief.",
            "output_modalities": ["text"],
            "max_output_tokens": 128,
            "video": {"max_fps": 4, "schedule": "sequential", "positions": "group-decoupled"},
        },
    )
    assert types(out) == ["UpdateSession", "session.updated"]
    expected_video = {"max_fps": 4.0, "schedule": "sequential", "positions": "group-decoupled"}
    assert out[0] == UpdateSession(SessionConfig("Be brief.", 128, expected_video))
    session = out[1].encode()["session"]
    assert session["instructions"] == "Be brief."
    assert session["max_output_tokens"] == 128
    assert session["video"] == {**expected_video, "change_filter": FILTER_DEFAULTS}
    assert session["id"] == "sess_1" and session["type"] == "realtime"
    assert proto.config == out[0].config


def test_session_update_partial_updates_merge():
    proto = make()
    send(proto, type="session.update", session={"instructions": "A"})
    send(proto, type="session.update", session={"max_output_tokens": 64})
    send(proto, type="session.update", session={"video": {"schedule": "sequential"}})
    out = send(proto, type="session.update", session={"video": {"max_fps": 0.5}})
    config = out[0].config
    assert config.instructions == "A"
    assert config.max_output_tokens == 64
    assert config.video == {
        "max_fps": 0.5,
        "schedule": "sequential",
        "positions": "group-decoupled",
    }
    # An empty update changes nothing and still confirms.
    out = send(proto, type="session.update", session={})
    assert out[0].config == config
    assert types(out) == ["UpdateSession", "session.updated"]


def test_session_update_inf_and_null_reset_to_server_values():
    proto = make(defaults=SessionConfig(instructions="default"))
    send(proto, type="session.update", session={"max_output_tokens": 10, "instructions": "x"})
    out = send(proto, type="session.update", session={"max_output_tokens": "inf", "instructions": None})
    assert out[0].config.max_output_tokens is None
    assert out[0].config.instructions == "default"
    assert out[1].encode()["session"]["max_output_tokens"] == 4096
    assert out[1].encode()["session"]["instructions"] == "default"
    proto = make(defaults=SessionConfig(max_output_tokens=300))
    send(proto, type="session.update", session={"max_output_tokens": 10})
    out = send(proto, type="session.update", session={"max_output_tokens": None})
    assert out[0].config.max_output_tokens == 300
    out = send(proto, type="session.update", session={"max_output_tokens": "inf"})
    assert out[0].config.max_output_tokens is None
    assert send(proto, type="response.create")[0].max_output_tokens == 4096


def test_session_update_ignores_unknown_keys():
    proto = make()
    out = send(
        proto,
        type="session.update",
        future_field=1,
        session={
            "instructions": "ok",
            "audio": {"output": {"voice": "alloy"}},
            "video": {"zoom": 2, "window": 0},  # window: a setting older servers took and ignored
        },
    )
    assert types(out) == ["UpdateSession", "session.updated"]
    assert "audio" not in out[1].encode()["session"]
    assert out[1].encode()["session"]["video"] == VIDEO_DEFAULTS


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ("not an object", "session"),
        (None, "session"),
        ({"type": "transcription"}, "session.type"),
        ({"output_modalities": ["audio"]}, "session.output_modalities"),
        ({"output_modalities": ["text", "audio"]}, "session.output_modalities"),
        ({"output_modalities": "text"}, "session.output_modalities"),
        ({"instructions": 5}, "session.instructions"),
        ({"instructions": "x" * 32_001}, "session.instructions"),
        ({"max_output_tokens": 0}, "session.max_output_tokens"),
        ({"max_output_tokens": 4097}, "session.max_output_tokens"),
        ({"max_output_tokens": "10"}, "session.max_output_tokens"),
        ({"max_output_tokens": 1.5}, "session.max_output_tokens"),
        ({"max_output_tokens": True}, "session.max_output_tokens"),
        ({"max_output_tokens": "INF"}, "session.max_output_tokens"),
        ({"tools": [{"type": "function", "name": "f"}]}, "session.tools"),
        ({"video": []}, "session.video"),
        ({"video": {"max_fps": 0}}, "session.video.max_fps"),
        ({"video": {"max_fps": -1}}, "session.video.max_fps"),
        ({"video": {"max_fps": 31}}, "session.video.max_fps"),
        ({"video": {"max_fps": "2"}}, "session.video.max_fps"),
        ({"video": {"max_fps": True}}, "session.video.max_fps"),
        ({"video": {"schedule": "interleaved"}}, "session.video.schedule"),
        ({"video": {"positions": "sequential"}}, "session.video.positions"),
        ({"video": {"change_filter": True}}, "session.video.change_filter"),
        ({"video": {"change_filter": None}}, "session.video.change_filter"),
        ({"video": {"change_filter": {"enabled": "no"}}}, "session.video.change_filter.enabled"),
        ({"video": {"change_filter": {"enabled": 0}}}, "session.video.change_filter.enabled"),
        ({"video": {"change_filter": {"threshold": "6"}}}, "session.video.change_filter.threshold"),
        ({"video": {"change_filter": {"threshold": True}}}, "session.video.change_filter.threshold"),
        ({"video": {"change_filter": {"threshold": -1}}}, "session.video.change_filter.threshold"),
        ({"video": {"change_filter": {"threshold": 255}}}, "session.video.change_filter.threshold"),
        ({"video": {"change_filter": {"keepalive_s": 0}}}, "session.video.change_filter.keepalive_s"),
        ({"video": {"change_filter": {"keepalive_s": None}}}, "session.video.change_filter.keepalive_s"),
        # a good field of the filter does not go in with a bad one
        (
            {"video": {"change_filter": {"enabled": False, "keepalive_s": -2}}},
            "session.video.change_filter.keepalive_s",
        ),
        # One bad field rejects the whole update, good fields included.
        ({"instructions": "fine", "video": {"max_fps": -3}}, "session.video.max_fps"),
    ],
)
def test_session_update_rejects_wrong_types_and_values(session, param):
    proto = make()
    before = snapshot(proto)
    error = only_error(send(proto, type="session.update", event_id="evt_9", session=session))
    assert error == {**error, "type": "invalid_request_error", "code": "invalid_value", "param": param}
    assert error["event_id"] == "evt_9"
    assert snapshot(proto) == before


def test_session_update_sets_the_change_filter_field_by_field_and_echoes_it():
    proto = make(defaults=SessionConfig(change_filter=ChangeFilterSettings(threshold=4.0)))
    assert proto.config.change_filter == ChangeFilterSettings(threshold=4.0)
    out = send(proto, type="session.update", session={"video": {"change_filter": {"keepalive_s": 2.5}}})
    assert types(out) == ["UpdateSession", "session.updated"]
    assert out[0].config.change_filter == ChangeFilterSettings(True, 4.0, 2.5)
    shown = {"enabled": True, "threshold": 4.0, "keepalive_s": 2.5}
    assert out[1].encode()["session"]["video"]["change_filter"] == shown
    # unknown keys are ignored, as everywhere; the other settings stay
    update = {"enabled": False, "threshold": 0, "blur": 3}
    out = send(proto, type="session.update", session={"video": {"change_filter": update}})
    assert out[0].config.change_filter == ChangeFilterSettings(False, 0.0, 2.5)
    assert out[0].config.video["max_fps"] == 2.0
    shown = {"enabled": False, "threshold": 0.0, "keepalive_s": 2.5}
    assert out[1].encode()["session"]["video"]["change_filter"] == shown
    error = only_error(
        send(proto, type="session.update", session={"video": {"change_filter": {"threshold": 300}}})
    )
    assert "threshold" in error["message"] and "[0, 255)" in error["message"]


def test_the_change_filter_round_trips_through_the_wire_classes():
    update = SessionUpdate(
        event_id="e1",
        session=SessionUpdateFields(video=VideoUpdate(change_filter=ChangeFilterUpdate(threshold=3.0))),
    )
    payload = update.encode()
    assert payload["session"]["video"] == {"change_filter": {"threshold": 3.0}}
    assert decode_client_event(payload) == update
    shown = SessionObject(
        "s", "m", None, 8, VideoConfig(2.0, "parallel", "p", ChangeFilterConfig(False, 3.0, 5.0))
    )
    assert SessionObject.decode(shown.encode()) == shown
    older = shown.encode()
    del older["video"]["change_filter"]  # type: ignore[union-attr]  # a server without the filter
    assert SessionObject.decode(older).video.change_filter is None


def test_session_update_accepts_limits_exactly():
    proto = make()
    out = send(
        proto,
        type="session.update",
        session={"instructions": "x" * 32_000, "max_output_tokens": 4096, "video": {"max_fps": 30}},
    )
    assert types(out) == ["UpdateSession", "session.updated"]


# ---------------------------------------------------------------------------------------------
# conversation.item.create
# ---------------------------------------------------------------------------------------------


def test_item_create_text_message_sequence_and_shapes():
    proto = make()
    out = send(proto, type="conversation.item.create", event_id="evt_u1", item=user_message("hello"))
    assert types(out) == ["AddUserMessage", "conversation.item.added", "conversation.item.done"]
    assert out[0] == AddUserMessage(item_id="item_3", text="hello", images=(), event_id="evt_u1")
    item = {
        "id": "item_3",
        "type": "message",
        "object": "realtime.item",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_text", "text": "hello"}],
    }
    assert out[1].encode() == {
        "type": "conversation.item.added",
        "event_id": "event_4",
        "previous_item_id": None,
        "item": item,
    }
    assert out[2].encode() == {
        "type": "conversation.item.done",
        "event_id": "event_5",
        "previous_item_id": None,
        "item": item,
    }
    assert items(proto) == [item]


def test_item_create_chains_previous_item_id_and_keeps_client_ids():
    proto = make()
    first = send(proto, type="conversation.item.create", item=user_message("a", id="msg_a"))
    second = send(proto, type="conversation.item.create", item=user_message("b"))
    third = send(
        proto, type="conversation.item.create", previous_item_id=second[0].item_id, item=user_message("c")
    )
    assert first[0].item_id == "msg_a"
    assert second[1].encode()["previous_item_id"] == "msg_a"
    assert third[1].encode()["previous_item_id"] == second[0].item_id
    assert [item["id"] for item in items(proto)] == ["msg_a", second[0].item_id, third[0].item_id]


def test_item_create_with_images_decodes_data_urls_and_does_not_echo_them():
    proto = make()
    item = {
        "type": "message",
        "role": "user",
        "content": [
            {"type": "input_text", "text": "compare"},
            {"type": "input_image", "image_url": data_url(JPEG)},
            {"type": "input_text", "text": "with"},
            {"type": "input_image", "image_url": data_url(PNG, "image/png"), "detail": "high"},
        ],
    }
    out = send(proto, type="conversation.item.create", item=item)
    action = out[0]
    assert isinstance(action, AddUserMessage)
    assert action.images == (JPEG, PNG)
    assert action.text == "compare\nwith"
    assert out[1].encode()["item"]["content"] == [
        {"type": "input_text", "text": "compare"},
        {"type": "input_image", "detail": "auto"},
        {"type": "input_text", "text": "with"},
        {"type": "input_image", "detail": "high"},
    ]


def test_item_create_image_only_message_has_empty_text():
    proto = make()
    item = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": data_url()}]}
    action = send(proto, type="conversation.item.create", item=item)[0]
    assert action.text == "" and action.images == (JPEG,)


def test_item_create_accepts_mime_case_and_jpg_alias_and_root_previous():
    proto = make()
    for url in (data_url(JPEG, "IMAGE/JPEG"), data_url(JPEG, "image/jpg"), data_url(PNG, "image/png")):
        item = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": url}]}
        previous = "root" if not items(proto) else items(proto)[-1]["id"]
        out = send(proto, type="conversation.item.create", previous_item_id=previous, item=item)
        assert types(out)[0] == "AddUserMessage"


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ("text", "item"),
        (None, "item"),
        ({**user_message(), "type": "function_call"}, "item.type"),
        ({**user_message(), "role": "assistant"}, "item.role"),
        ({**user_message(), "role": "system"}, "item.role"),
        ({"type": "message", "content": [{"type": "input_text", "text": "x"}]}, "item.role"),
        ({**user_message(), "id": 5}, "item.id"),
        ({**user_message(), "id": ""}, "item.id"),
        ({**user_message(), "content": []}, "item.content"),
        ({**user_message(), "content": "hello"}, "item.content"),
        ({**user_message(), "content": ["hello"]}, "item.content[0]"),
        ({**user_message(), "content": [{"type": "input_text", "text": 3}]}, "item.content[0].text"),
        ({**user_message(), "content": [{"type": "input_text"}]}, "item.content[0].text"),
        ({**user_message(), "content": [{"type": "input_audio", "audio": ""}]}, "item.content[0].type"),
        ({**user_message(), "content": [{"text": "no type"}]}, "item.content[0].type"),
        (
            {**user_message(), "content": [{"type": "input_text", "text": "a"}, {"type": "output_text"}]},
            "item.content[1].type",
        ),
        (
            {**user_message(), "content": [{"type": "input_image", "image_url": 7}]},
            "item.content[0].image_url",
        ),
        ({**user_message(), "content": [{"type": "input_image"}]}, "item.content[0].image_url"),
        (
            {
                **user_message(),
                "content": [{"type": "input_image", "image_url": data_url(), "detail": "max"}],
            },
            "item.content[0].detail",
        ),
    ],
)
def test_item_create_rejects_wrong_values(item, param):
    proto = make()
    send(proto, type="conversation.item.create", item=user_message("existing", id="msg_0"))
    before = snapshot(proto)
    error = only_error(send(proto, type="conversation.item.create", event_id="evt_x", item=item))
    assert (error["type"], error["code"], error["param"], error["event_id"]) == (
        "invalid_request_error",
        "invalid_value",
        param,
        "evt_x",
    )
    assert snapshot(proto) == before


def test_item_create_rejects_duplicate_ids_and_insertion():
    proto = make()
    send(proto, type="conversation.item.create", item=user_message(id="msg_a"))
    send(proto, type="conversation.item.create", item=user_message(id="msg_b"))
    before = snapshot(proto)
    error = only_error(send(proto, type="conversation.item.create", item=user_message(id="msg_a")))
    assert (error["code"], error["param"]) == ("invalid_value", "item.id")
    for previous in ("msg_a", "root", "nope", 3):
        error = only_error(
            send(proto, type="conversation.item.create", previous_item_id=previous, item=user_message())
        )
        assert (error["code"], error["param"]) == ("invalid_value", "previous_item_id")
    assert snapshot(proto) == before


BAD_IMAGES = [
    "https://example.com/cat.jpg",
    "data:image/jpeg;base64",  # no comma
    "data:image/gif;base64," + base64.b64encode(b"GIF89a").decode(),
    "data:image/webp;base64," + base64.b64encode(JPEG).decode(),
    "data:text/plain;base64," + base64.b64encode(JPEG).decode(),
    "data:image/jpeg," + JPEG.hex(),  # not base64-encoded
    "data:image/jpeg;base64,!!!not-base64!!!",
    "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()[:-1],  # bad padding
    "data:image/jpeg;base64,"
    + base64.urlsafe_b64encode(b"\xff\xd8\xff\xfb\xff" * 9).decode(),  # url alphabet
    "data:image/jpeg;base64,",  # empty
    "data:image/png;base64," + base64.b64encode(b"not an image at all").decode(),  # wrong signature
]


@pytest.mark.parametrize("url", BAD_IMAGES)
def test_item_create_rejects_bad_images_as_invalid_image(url):
    proto = make()
    before = snapshot(proto)
    item = {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "x"}, {"type": "input_image", "image_url": url}],
    }
    error = only_error(send(proto, type="conversation.item.create", event_id="evt_i", item=item))
    assert (error["type"], error["code"], error["param"], error["event_id"]) == (
        "invalid_request_error",
        "invalid_image",
        "item.content[1].image_url",
        "evt_i",
    )
    assert snapshot(proto) == before


def test_image_byte_limit_counts_decoded_bytes():
    limit = 64
    proto = make(Limits(max_image_bytes=limit))
    exact = JPEG[:3] + b"\x00" * (limit - 3)
    item = {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_image", "image_url": data_url(exact)}],
    }
    assert types(send(proto, type="conversation.item.create", item=item))[0] == "AddUserMessage"
    item["content"][0]["image_url"] = data_url(exact + b"\x00")
    error = only_error(send(proto, type="conversation.item.create", item=item))
    assert error["code"] == "invalid_image"
    assert "64" in error["message"]


# ---------------------------------------------------------------------------------------------
# response.create, deltas, response.done
# ---------------------------------------------------------------------------------------------


def test_one_ask_full_event_sequence_and_shapes():
    proto = make()
    send(proto, type="conversation.item.create", item=user_message("what do you see?", id="msg_u"))
    out = send(proto, type="response.create", event_id="evt_r")
    assert types(out) == [
        "StartResponse",
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    start = out[0]
    assert start == StartResponse(response_id="resp_5", instructions=None, max_output_tokens=4096)
    assert proto.active_response_id == "resp_5"
    created, added, conv_added, part_added = events(out)
    assert created["response"] == {
        "id": "resp_5",
        "object": "realtime.response",
        "status": "in_progress",
        "status_details": None,
        "output": [],
        "conversation_id": "conv_1",
        "output_modalities": ["text"],
        "max_output_tokens": 4096,
        "metadata": None,
        "usage": None,
    }
    in_progress = {
        "id": "item_6",
        "type": "message",
        "object": "realtime.item",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    assert added == {**added, "response_id": "resp_5", "output_index": 0, "item": in_progress}
    assert conv_added == {**conv_added, "previous_item_id": "msg_u", "item": in_progress}
    assert part_added == {
        "type": "response.content_part.added",
        "event_id": part_added["event_id"],
        "response_id": "resp_5",
        "item_id": "item_6",
        "output_index": 0,
        "content_index": 0,
        "part": {"type": "text", "text": ""},
    }

    deltas = proto.text_delta("resp_5", "A red ") + proto.text_delta("resp_5", "mug.")
    assert [d.encode() for d in deltas] == [
        {
            "type": "response.output_text.delta",
            "event_id": deltas[0].encode()["event_id"],
            "response_id": "resp_5",
            "item_id": "item_6",
            "output_index": 0,
            "content_index": 0,
            "delta": "A red ",
        },
        {
            "type": "response.output_text.delta",
            "event_id": deltas[1].encode()["event_id"],
            "response_id": "resp_5",
            "item_id": "item_6",
            "output_index": 0,
            "content_index": 0,
            "delta": "mug.",
        },
    ]

    out = proto.response_finished("resp_5", "completed", USAGE)
    assert types(out) == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    text_done, part_done, item_done, conv_done, done = events(out)
    ids = {"response_id": "resp_5", "item_id": "item_6", "output_index": 0, "content_index": 0}
    assert text_done == {
        **ids,
        "type": "response.output_text.done",
        "event_id": text_done["event_id"],
        "text": "A red mug.",
    }
    assert part_done == {
        **ids,
        "type": "response.content_part.done",
        "event_id": part_done["event_id"],
        "part": {"type": "text", "text": "A red mug."},
    }
    final_item = {
        "id": "item_6",
        "type": "message",
        "object": "realtime.item",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "A red mug."}],
    }
    assert item_done == {**item_done, "response_id": "resp_5", "output_index": 0, "item": final_item}
    assert conv_done == {**conv_done, "previous_item_id": "msg_u", "item": final_item}
    assert done["response"] == {
        "id": "resp_5",
        "object": "realtime.response",
        "status": "completed",
        "status_details": None,
        "output": [final_item],
        "conversation_id": "conv_1",
        "output_modalities": ["text"],
        "max_output_tokens": 4096,
        "metadata": None,
        "usage": {
            "total_tokens": 107,
            "input_tokens": 100,
            "output_tokens": 7,
            "input_token_details": {
                "text_tokens": 0,
                "image_tokens": 0,
                "audio_tokens": 0,
                "cached_tokens": 0,
            },
            "output_token_details": {"text_tokens": 7, "audio_tokens": 0},
        },
    }
    assert proto.active_response_id is None
    assert items(proto)[-1] == final_item
    assert proto.usage == {"total_tokens": 107, "input_tokens": 100, "output_tokens": 7}


def test_next_item_follows_the_assistant_item_and_usage_accumulates():
    proto = make()
    first = ask(proto)
    proto.response_finished(first.response_id, "completed", USAGE)
    out = send(proto, type="conversation.item.create", item=user_message("and now?"))
    assert out[1].encode()["previous_item_id"] == items(proto)[1]["id"]
    assert items(proto)[1]["role"] == "assistant"
    second = send(proto, type="response.create")[0]
    proto.response_finished(
        second.response_id,
        "completed",
        {
            "input_tokens": 5,
            "output_tokens": 1,
            "total_tokens": 6,
            "input_token_details": {"image_tokens": 3},
        },
    )
    assert proto.usage == {"total_tokens": 113, "input_tokens": 105, "output_tokens": 8}


def test_response_create_resolves_instructions_and_max_tokens():
    proto = make(defaults=SessionConfig(instructions="sys", max_output_tokens=200))
    cases = [
        ({}, ("sys", 200)),
        ({"instructions": "override"}, ("override", 200)),
        ({"max_output_tokens": 50}, ("sys", 50)),
        ({"max_output_tokens": "inf"}, ("sys", 4096)),
        ({"max_output_tokens": None, "instructions": None}, ("sys", 200)),
        ({"max_output_tokens": 4096}, ("sys", 4096)),
        ({"future": True, "tools": [], "input": None, "conversation": "auto"}, ("sys", 200)),
    ]
    for params, (instructions, max_tokens) in cases:
        out = send(proto, type="response.create", response=params)
        start = out[0]
        assert (start.instructions, start.max_output_tokens) == (instructions, max_tokens), params
        assert out[1].encode()["response"]["max_output_tokens"] == max_tokens
        proto.response_finished(start.response_id, "completed", {})


def test_response_create_uses_session_update_values():
    proto = make()
    send(proto, type="session.update", session={"instructions": "narrate", "max_output_tokens": 32})
    start = send(proto, type="response.create")[0]
    assert (start.instructions, start.max_output_tokens) == ("narrate", 32)


def test_response_create_echoes_metadata():
    proto = make()
    out = send(proto, type="response.create", response={"metadata": {"turn": "7"}})
    assert out[1].encode()["response"]["metadata"] == {"turn": "7"}
    done = proto.response_finished(out[0].response_id, "completed", {})
    assert done[-1].encode()["response"]["metadata"] == {"turn": "7"}


def test_response_create_without_conversation_items_is_allowed():
    proto = make()
    out = send(proto, type="response.create")
    assert out[3].encode()["previous_item_id"] is None


@pytest.mark.parametrize(
    ("response", "param"),
    [
        ("go", "response"),
        ([], "response"),
        ({"instructions": 1}, "response.instructions"),
        ({"instructions": "x" * 32_001}, "response.instructions"),
        ({"max_output_tokens": 0}, "response.max_output_tokens"),
        ({"max_output_tokens": -5}, "response.max_output_tokens"),
        ({"max_output_tokens": 4097}, "response.max_output_tokens"),
        ({"max_output_tokens": "100"}, "response.max_output_tokens"),
        ({"max_output_tokens": 10.0}, "response.max_output_tokens"),
        ({"max_output_tokens": False}, "response.max_output_tokens"),
        ({"max_output_tokens": "infinity"}, "response.max_output_tokens"),
        ({"output_modalities": ["audio"]}, "response.output_modalities"),
        ({"conversation": "none"}, "response.conversation"),
        ({"metadata": "x"}, "response.metadata"),
        ({"tools": [{"type": "function", "name": "f"}]}, "response.tools"),
        ({"input": []}, "response.input"),
    ],
)
def test_response_create_rejects_wrong_values(response, param):
    proto = make()
    before = snapshot(proto)
    error = only_error(send(proto, type="response.create", event_id="evt_r", response=response))
    assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", param, "evt_r")
    assert snapshot(proto) == before


def test_second_response_while_active_is_an_error_not_queued():
    proto = make()
    start = ask(proto)
    proto.text_delta(start.response_id, "partial")
    before = snapshot(proto)
    error = only_error(send(proto, type="response.create", event_id="evt_2nd"))
    assert error == {
        "type": "invalid_request_error",
        "code": "conversation_already_has_active_response",
        "message": error["message"],
        "param": None,
        "event_id": "evt_2nd",
    }
    assert start.response_id in error["message"]
    assert snapshot(proto) == before
    # The first response is unaffected, and once it is done a new one starts.
    assert proto.text_delta(start.response_id, " more")
    done = proto.response_finished(start.response_id, "completed", {})
    assert done[-1].encode()["response"]["output"][0]["content"][0]["text"] == "partial more"
    assert types(send(proto, type="response.create"))[0] == "StartResponse"


def test_user_message_during_a_response_is_added_after_the_assistant_item():
    proto = make()
    start = ask(proto)
    assistant_id = items(proto)[-1]["id"]
    out = send(proto, type="conversation.item.create", item=user_message("wait"))
    assert out[1].encode()["previous_item_id"] == assistant_id
    done = proto.response_finished(start.response_id, "completed", {})
    conv_done = events(done)[3]
    assert conv_done["type"] == "conversation.item.done"
    assert conv_done["previous_item_id"] == items(proto)[0]["id"]
    assert [item["role"] for item in items(proto)] == ["user", "assistant", "user"]


def test_deltas_and_finish_for_unknown_or_finished_responses_are_ignored():
    proto = make()
    assert proto.text_delta("resp_nope", "x") == []
    assert proto.response_finished("resp_nope", "completed", USAGE) == []
    start = ask(proto)
    assert proto.text_delta("resp_other", "x") == []
    assert proto.text_delta(start.response_id, "") == []
    proto.response_finished(start.response_id, "completed", USAGE)
    assert proto.text_delta(start.response_id, "late") == []
    assert proto.response_finished(start.response_id, "completed", USAGE) == []
    assert proto.usage["total_tokens"] == 107


def test_invalid_finish_status_is_a_programming_error():
    proto = make()
    start = ask(proto)
    with pytest.raises(ValueError):
        proto.response_finished(start.response_id, "done", {})  # type: ignore[arg-type]
    assert proto.active_response_id == start.response_id


@pytest.mark.parametrize(
    ("status", "reason", "details"),
    [
        ("incomplete", None, {"type": "incomplete", "reason": "max_output_tokens"}),
        ("incomplete", "content_filter", {"type": "incomplete", "reason": "content_filter"}),
        ("cancelled", "turn_detected", {"type": "cancelled", "reason": "turn_detected"}),
        (
            "failed",
            "engine crashed",
            {
                "type": "failed",
                "error": {"type": "server_error", "code": "engine_unavailable", "message": "engine crashed"},
            },
        ),
    ],
)
def test_unsuccessful_endings_mark_the_item_incomplete(status, reason, details):
    proto = make()
    start = ask(proto)
    proto.text_delta(start.response_id, "so far")
    out = proto.response_finished(start.response_id, status, USAGE, reason)
    done = out[-1].encode()["response"]
    assert (done["status"], done["status_details"]) == (status, details)
    assert done["output"][0]["status"] == "incomplete"
    assert done["output"][0]["content"] == [{"type": "output_text", "text": "so far"}]
    assert items(proto)[-1]["status"] == "incomplete"
    assert proto.active_response_id is None


# ---------------------------------------------------------------------------------------------
# response.cancel
# ---------------------------------------------------------------------------------------------


def test_cancel_flow_ends_with_response_done_cancelled():
    proto = make()
    start = ask(proto)
    proto.text_delta(start.response_id, "The cup")
    out = send(proto, type="response.cancel", event_id="evt_c")
    assert out == [CancelResponse(start.response_id)]
    # The engine may still deliver a few tokens before the abort lands: not shown.
    assert proto.text_delta(start.response_id, " is") == []
    # Cancelling twice is harmless and asks the app only once.
    assert send(proto, type="response.cancel") == []
    assert proto.active_response_id == start.response_id
    out = proto.response_finished(start.response_id, "cancelled", {"input_tokens": 10, "output_tokens": 3})
    assert types(out)[-1] == "response.done"
    done = out[-1].encode()["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert done["output"][0]["content"][0]["text"] == "The cup"
    assert events(out)[0]["text"] == "The cup"
    assert proto.active_response_id is None


def test_cancel_by_response_id():
    proto = make()
    start = ask(proto)
    assert send(proto, type="response.cancel", response_id=start.response_id) == [
        CancelResponse(start.response_id)
    ]


@pytest.mark.parametrize("response_id", [None, "resp_other"])
def test_cancel_without_matching_active_response_is_an_error(response_id):
    proto = make()
    extra = {} if response_id is None else {"response_id": response_id}
    error = only_error(send(proto, type="response.cancel", event_id="evt_c", **extra))
    assert (error["type"], error["code"], error["event_id"]) == (
        "invalid_request_error",
        "response_cancel_not_active",
        "evt_c",
    )
    start = ask(proto)
    proto.response_finished(start.response_id, "completed", {})
    assert only_error(send(proto, type="response.cancel"))["code"] == "response_cancel_not_active"


def test_cancel_with_other_id_while_active_changes_nothing():
    proto = make()
    start = ask(proto)
    before = snapshot(proto)
    error = only_error(send(proto, type="response.cancel", response_id="resp_other"))
    assert error["code"] == "response_cancel_not_active"
    assert snapshot(proto) == before
    assert proto.text_delta(start.response_id, "still streaming")
    error = only_error(send(proto, type="response.cancel", response_id=5))
    assert (error["code"], error["param"]) == ("invalid_value", "response_id")


def test_app_may_end_a_cancel_requested_response_as_completed():
    proto = make()
    start = ask(proto)
    send(proto, type="response.cancel")
    out = proto.response_finished(start.response_id, "completed", {})
    assert out[-1].encode()["response"]["status"] == "completed"


# ---------------------------------------------------------------------------------------------
# input_video.append and input_video.stats
# ---------------------------------------------------------------------------------------------


def test_video_append_emits_append_frame_only():
    proto = make()
    out = send(proto, type="input_video.append", event_id="evt_f", image=data_url(), timestamp_ms=1234)
    assert out == [AppendFrame(image=JPEG, timestamp_ms=1234.0, event_id="evt_f")]
    out = send(proto, type="input_video.append", image=data_url(PNG, "image/png"))
    assert out == [AppendFrame(image=PNG, timestamp_ms=None, event_id=None)]


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        ({}, "invalid_value", "image"),
        ({"image": 5}, "invalid_value", "image"),
        ({"image": "data:image/bmp;base64,Qk0="}, "invalid_image", "image"),
        ({"image": "data:image/jpeg;base64,@@@"}, "invalid_image", "image"),
        ({"image": data_url(), "timestamp_ms": -1}, "invalid_value", "timestamp_ms"),
        ({"image": data_url(), "timestamp_ms": "10"}, "invalid_value", "timestamp_ms"),
        ({"image": data_url(), "timestamp_ms": True}, "invalid_value", "timestamp_ms"),
    ],
)
def test_video_append_errors(event, code, param):
    proto = make()
    error = only_error(send(proto, type="input_video.append", event_id="evt_v", **event))
    assert (error["code"], error["param"], error["event_id"]) == (code, param, "evt_v")


def test_video_append_rejects_non_finite_timestamps():
    proto = make()
    for raw in ("NaN", "Infinity"):
        message = (
            json.dumps({"type": "input_video.append", "image": data_url()})[:-1]
            + f', "timestamp_ms": {raw}}}'
        )
        assert only_error(proto.receive(message))["param"] == "timestamp_ms"


def test_video_stats_carries_the_session_stats_at_the_top_level():
    proto = make()
    stats = SessionStats(
        session_id="sess_1",
        schedule="parallel",
        positions="group-decoupled",
        frames_received=90,
        frames_sampled=6,
        frames_ingested=5,
        frames_dropped_by_reason={"rate": 84, "invalid": 1},
        frame_lag_p50_ms=180.5,
    )
    out = proto.video_stats(stats)
    assert types(out) == ["input_video.stats"]
    payload = out[0].encode()
    assert payload == {"type": "input_video.stats", "event_id": payload["event_id"], **stats.to_dict()}
    assert payload["frames_dropped"] == 85 and payload["event_id"].startswith("event_")
    assert InputVideoStats.decode(json.loads(out[0].to_json())) == out[0]


# ---------------------------------------------------------------------------------------------
# Errors from the transport level and from the app
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    ["", "not json", "{", "[1, 2]", '"session.update"', "null", "42", b"\xff\xfe{}", "{" * 100_000],
)
def test_invalid_json(message):
    proto = make()
    error = only_error(proto.receive(message))
    assert (error["type"], error["code"], error["event_id"], error["param"]) == (
        "invalid_request_error",
        "invalid_json",
        None,
        None,
    )


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"event_id": "evt_u"},
        {"type": 3, "event_id": "evt_u"},
        {"type": None, "event_id": "evt_u"},
        {"type": "input_audio_buffer.append", "event_id": "evt_u", "audio": ""},
        {"type": "session.created", "event_id": "evt_u"},
        {"type": "response.done", "event_id": "evt_u"},
        {"type": "conversation.item.delete", "event_id": "evt_u", "item_id": "x"},
        {"type": "SESSION.UPDATE", "event_id": "evt_u", "session": {}},
    ],
)
def test_unknown_event(event):
    proto = make()
    before = snapshot(proto)
    error = only_error(proto.receive(json.dumps(event)))
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "unknown_event",
        "type",
    )
    assert error["event_id"] == event.get("event_id")
    assert snapshot(proto) == before


def test_non_string_client_event_id_is_invalid():
    proto = make()
    error = only_error(send(proto, type="response.create", event_id=7))
    assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "event_id", None)
    assert proto.active_response_id is None


def test_payload_too_large_is_checked_on_raw_bytes_before_parsing():
    proto = make(Limits(max_message_bytes=100))
    event = {"type": "session.update", "session": {"instructions": ""}}
    padding = 100 - len(json.dumps(event))
    event["session"]["instructions"] = "x" * padding
    exact = json.dumps(event)
    assert len(exact) == 100
    assert types(proto.receive(exact)) == ["UpdateSession", "session.updated"]
    assert types(proto.receive(exact.encode())) == ["UpdateSession", "session.updated"]
    before = snapshot(proto)
    for message in (exact + " ", (exact + " ").encode(), "!" * 101, b"\xff" * 101):
        error = only_error(proto.receive(message))
        assert (error["type"], error["code"]) == ("invalid_request_error", "payload_too_large")
    # 60 characters but 120 UTF-8 bytes: counted in bytes.
    wide = json.dumps({"type": "session.update", "session": {"instructions": "é" * 40}}, ensure_ascii=False)
    assert len(wide) <= 100 < len(wide.encode())
    assert only_error(proto.receive(wide))["code"] == "payload_too_large"
    assert snapshot(proto) == before


def test_payload_limit_default_is_8_mib():
    proto = make()
    big = "x" * (8 * 1024 * 1024 + 1)
    assert only_error(proto.receive(big))["code"] == "payload_too_large"


def test_a_bad_event_never_ends_the_session():
    proto = make()
    for message in ("nope", "{}", json.dumps({"type": "response.cancel"})):
        only_error(proto.receive(message))
    start = ask(proto)
    assert proto.text_delta(start.response_id, "fine")


def test_image_rejected_for_a_frame_is_an_error_only():
    proto = make()
    before = snapshot(proto)
    error = only_error(proto.image_rejected("evt_f", "image larger than 1920x1080 pixels"))
    assert error == {
        "type": "invalid_request_error",
        "code": "invalid_image",
        "message": "image larger than 1920x1080 pixels",
        "param": None,
        "event_id": "evt_f",
    }
    assert snapshot(proto) == before


def test_image_rejected_for_a_message_takes_the_item_back():
    proto = make()
    send(proto, type="conversation.item.create", item=user_message("first", id="msg_1"))
    item = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": data_url()}]}
    action = send(proto, type="conversation.item.create", event_id="evt_img", item=item)[0]
    out = proto.image_rejected("evt_img", "cannot decode JPEG", item_id=action.item_id)
    assert types(out) == ["error", "conversation.item.deleted"]
    assert out[0].encode()["error"]["event_id"] == "evt_img"
    assert out[1].encode() == {
        "type": "conversation.item.deleted",
        "event_id": out[1].encode()["event_id"],
        "item_id": action.item_id,
    }
    assert [i["id"] for i in items(proto)] == ["msg_1"]
    out = send(proto, type="conversation.item.create", item=user_message("again"))
    assert out[1].encode()["previous_item_id"] == "msg_1"
    # Unknown item ids only produce the error.
    assert types(proto.image_rejected(None, "bad", item_id="item_gone")) == ["error"]


def test_engine_error_is_a_server_error_and_leaves_the_response_to_the_app():
    proto = make()
    start = ask(proto)
    error = only_error(proto.engine_error("vLLM engine died", event_id="evt_r"))
    assert error == {
        "type": "server_error",
        "code": "engine_unavailable",
        "message": "vLLM engine died",
        "param": None,
        "event_id": "evt_r",
    }
    assert proto.active_response_id == start.response_id
    done = proto.response_finished(start.response_id, "failed", {}, "vLLM engine died")
    assert done[-1].encode()["response"]["status"] == "failed"


def test_session_limit_reached_without_a_session():
    for event in (session_limit_reached(), RealtimeProtocol.session_limit_reached("full: 8 sessions")):
        payload = event.encode()
        assert payload["type"] == "error" and payload["event_id"].startswith("event_")
        assert payload["error"]["type"] == "server_error"
        assert payload["error"]["code"] == "session_limit_reached"
        assert payload["error"]["event_id"] is None
        json.loads(event.to_json())
    assert RealtimeProtocol.session_limit_reached("full").encode()["error"]["message"] == "full"


def test_error_event_helper():
    event = error_event("invalid_value", "bad", param="x", client_event_id="c", event_id="e")
    assert event.encode() == {
        "type": "error",
        "event_id": "e",
        "error": {
            "type": "invalid_request_error",
            "code": "invalid_value",
            "message": "bad",
            "param": "x",
            "event_id": "c",
        },
    }


# ---------------------------------------------------------------------------------------------
# Ids, JSON, isolation, bounds
# ---------------------------------------------------------------------------------------------


def run_everything(proto: RealtimeProtocol) -> list:
    out = proto.start()
    out += send(proto, type="session.update", session={"instructions": "watch"})
    for turn in range(3):
        out += send(proto, type="conversation.item.create", item=user_message(f"q{turn}"))
        out += send(proto, type="input_video.append", image=data_url())
        start = send(proto, type="response.create")
        out += start
        out += send(proto, type="response.create")  # error
        for token in ("a", "b", "c"):
            out += proto.text_delta(start[0].response_id, token)
        if turn == 1:
            out += send(proto, type="response.cancel")
            out += proto.response_finished(start[0].response_id, "cancelled", USAGE)
        else:
            out += proto.response_finished(start[0].response_id, "completed", USAGE)
        out += proto.video_stats(SessionStats("sess_x", "parallel", "sequential", frames_received=turn))
    out += proto.receive("garbage")
    out += proto.engine_error("x")
    return out


def test_every_server_event_has_a_unique_event_id_and_ids_do_not_collide():
    proto = RealtimeProtocol("sess_x", model="m", positions="sequential")  # default id factory
    out = run_everything(proto)
    payloads = events(out)
    event_ids = [p["event_id"] for p in payloads]
    assert all(isinstance(i, str) and i.startswith("event_") for i in event_ids)
    assert len(set(event_ids)) == len(event_ids)
    item_ids = [i["id"] for i in items(proto)]
    response_ids = [p["response"]["id"] for p in payloads if p["type"] == "response.created"]
    assert len(item_ids) == 6 and len(response_ids) == 3
    assert all(i.startswith("item_") for i in item_ids) and all(r.startswith("resp_") for r in response_ids)
    assert len(set(item_ids + response_ids + event_ids)) == len(item_ids) + len(response_ids) + len(event_ids)


def test_all_payloads_are_json_serialisable_and_to_json_round_trips():
    out = run_everything(make(start=False))
    for event in out:
        if isinstance(event, ServerEvent):
            assert json.loads(event.to_json()) == event.encode()
            assert event.type == event.encode()["type"]


def test_default_id_format():
    ids = {default_id("event") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("event_") and len(i) == 30 for i in ids)


def test_emitted_payloads_do_not_alias_core_state():
    proto = make()
    out = send(proto, type="conversation.item.create", item=user_message("keep"))
    out[1].encode()["item"]["content"][0]["text"] = "mutated"
    out[2].encode()["item"]["status"] = "mutated"
    items(proto)[0]["content"].clear()
    assert items(proto)[0]["content"] == [{"type": "input_text", "text": "keep"}]
    assert out[1].encode()["item"]["content"][0]["text"] == "keep"
    out = send(proto, type="session.update", session={})
    out[0].config.video["max_fps"] = 999
    assert proto.config.video["max_fps"] == 2.0


def test_conversation_memory_is_bounded():
    proto = make(Limits(max_conversation_items=3))
    for n in range(5):
        send(proto, type="conversation.item.create", item=user_message(str(n), id=f"m{n}"))
    assert [i["id"] for i in items(proto)] == ["m2", "m3", "m4"]
    out = send(proto, type="conversation.item.create", item=user_message(id="m5"))
    assert out[1].encode()["previous_item_id"] == "m4"


def test_bytes_messages_are_accepted():
    proto = make()
    out = proto.receive(json.dumps({"type": "response.create"}).encode())
    assert types(out)[0] == "StartResponse"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
EVENT_TYPES = st.sampled_from(
    ["session.update", "conversation.item.create", "response.create", "response.cancel", "input_video.append"]
)
FIELDS = st.sampled_from(["session", "item", "response", "response_id", "image", "timestamp_ms", "event_id"])


@settings(max_examples=150, deadline=None)
@given(kind=EVENT_TYPES, body=st.dictionaries(FIELDS, JSON_VALUES, max_size=4))
def test_fuzzed_events_never_raise_and_errors_never_change_state(kind, body):
    proto = make()
    before = snapshot(proto)
    out = proto.receive(json.dumps({"type": kind, **body}))
    payloads = events(out)
    if payloads and payloads[0]["type"] == "error":
        assert len(out) == 1
        assert snapshot(proto) == before
    for payload in payloads:
        json.dumps(payload)


# ---------------------------------------------------------------------------------------------
# The events against the official SDK's models (openai.types.realtime)
# ---------------------------------------------------------------------------------------------


def test_server_events_parse_as_the_openai_sdk_types():
    """What the official ``openai`` SDK would make of every event the core sends (our extension
    ``input_video.stats`` aside): the right model, with the fields it reads."""
    from openai.types.realtime import RealtimeServerEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(RealtimeServerEvent)
    out = run_everything(make(start=False))
    parsed = [adapter.validate_python(p) for p in events(out) if p["type"] != "input_video.stats"]
    kinds = {type(model).__name__ for model in parsed}
    assert {
        "SessionCreatedEvent",
        "ResponseTextDeltaEvent",
        "ResponseDoneEvent",
        "RealtimeErrorEvent",
    } <= kinds
    done = next(m for m in parsed if type(m).__name__ == "ResponseDoneEvent")
    assert done.response.status == "completed" and done.response.usage.output_tokens == 7
    assert done.response.output[0].content[0].text == "abc"
    cancelled = [m for m in parsed if type(m).__name__ == "ResponseDoneEvent"][1]
    assert cancelled.response.status_details.reason == "client_cancelled"


def test_client_events_the_core_accepts_parse_as_the_openai_sdk_types():
    from openai.types.realtime import RealtimeClientEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(RealtimeClientEvent)
    proto = make()
    session = {"type": "realtime", "instructions": "x", "max_output_tokens": "inf"}
    response = {"instructions": "y", "max_output_tokens": 9, "metadata": {}}
    for event in (
        {"type": "session.update", "session": session},
        {"type": "conversation.item.create", "item": user_message("hi")},
        {"type": "response.create", "response": response},
        {"type": "response.cancel", "response_id": "resp_7"},
    ):
        assert types(send(proto, **event))[0] != "error", event
        assert adapter.validate_python(event).type == event["type"]
