"""Client secrets: the pure store and request checks (no clock: every call takes ``now``), then
``POST /v1/realtime/client_secrets`` and the WebSocket and WebRTC endpoints that take the secrets."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from fake_runtime import FakeRuntime

from runtime.server.app import ServerConfig
from runtime.server.client_secrets import (
    DEFAULT_EXPIRY_S,
    MAX_EXPIRY_S,
    MIN_EXPIRY_S,
    ClientSecretRequest,
    ClientSecrets,
    Granted,
    Refused,
    SecretRefused,
    TooManySecrets,
    authorize,
    decode_request,
    session_defaults,
)
from runtime.server.protocol import Limits, SessionConfig
from runtime.wire import WireError
from streams import EVENTS_LABEL, EventChannel, synthetic_track

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.25  # a Unix time with a fraction: expiry is in whole seconds from int(now)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


def test_mint_then_redeem_once() -> None:
    store: ClientSecrets[str] = ClientSecrets()
    secret = store.mint("defaults", 60, T0)
    assert secret.value.startswith("ek_") and len(secret.value) > 30
    assert secret.expires_at == int(T0) + 60 and secret.session == "defaults"
    assert len(store) == 1
    assert store.redeem(secret.value, T0 + 59.5) == "defaults"
    assert len(store) == 0
    with pytest.raises(SecretRefused) as refused:
        store.redeem(secret.value, T0 + 1)
    assert refused.value.reason == "used" and "already used" in str(refused.value)


def test_secrets_are_unique_and_independent() -> None:
    store: ClientSecrets[int] = ClientSecrets()
    secrets = [store.mint(i, 60, T0) for i in range(50)]
    assert len({s.value for s in secrets}) == 50
    for s in reversed(secrets):
        assert store.redeem(s.value, T0) == s.session


def test_expired_secret_is_refused_from_its_expiry_second_on() -> None:
    store: ClientSecrets[str] = ClientSecrets()
    secret = store.mint("x", MIN_EXPIRY_S, T0)
    with pytest.raises(SecretRefused) as refused:
        store.redeem(secret.value, secret.expires_at)
    assert refused.value.reason == "expired" and "expired" in str(refused.value)
    # spent by the failed try: it stays refused
    with pytest.raises(SecretRefused):
        store.redeem(secret.value, T0)


def test_unknown_and_malformed_secrets_are_refused() -> None:
    store: ClientSecrets[str] = ClientSecrets()
    store.mint("x", 60, T0)
    for value in ("ek_nope", "", "ek_" + "a" * 5000, "\udcff"):
        with pytest.raises(SecretRefused) as refused:
            store.redeem(value, T0)
        assert refused.value.reason == "unknown"
    assert len(store) == 1


def test_purge_forgets_expired_secrets_only() -> None:
    store: ClientSecrets[str] = ClientSecrets()
    short = store.mint("short", 10, T0)
    long = store.mint("long", 100, T0)
    assert store.purge(T0 + 5) == 0 and len(store) == 2
    assert store.purge(T0 + 10) == 1 and len(store) == 1
    with pytest.raises(SecretRefused) as refused:
        store.redeem(short.value, T0 + 11)
    assert refused.value.reason == "unknown"
    assert store.redeem(long.value, T0 + 11) == "long"


def test_used_memory_ends_with_the_expiry() -> None:
    store: ClientSecrets[str] = ClientSecrets()
    secret = store.mint("x", 10, T0)
    store.redeem(secret.value, T0)
    store.purge(T0 + 10)
    with pytest.raises(SecretRefused) as refused:
        store.redeem(secret.value, T0 + 10)
    assert refused.value.reason == "unknown"  # still refused; the store no longer remembers it


def test_cap_on_outstanding_secrets_then_room_again() -> None:
    store: ClientSecrets[int] = ClientSecrets(max_outstanding=3)
    first = store.mint(0, 10, T0)
    store.mint(1, 100, T0)
    store.mint(2, 100, T0)
    with pytest.raises(TooManySecrets, match="3 unused client secrets"):
        store.mint(3, 100, T0)
    store.redeem(first.value, T0)  # a used one makes room
    store.mint(3, 100, T0)
    with pytest.raises(TooManySecrets):
        store.mint(4, 100, T0 + 50)
    assert len(store) == 3


def test_cap_frees_up_by_expiry_without_any_redeem() -> None:
    store: ClientSecrets[int] = ClientSecrets(max_outstanding=2)
    store.mint(0, 10, T0)
    store.mint(1, 10, T0)
    with pytest.raises(TooManySecrets):
        store.mint(2, 10, T0 + 9)
    assert store.mint(2, 10, T0 + 10).session == 2  # the two expired ones were purged
    assert len(store) == 1


def test_memory_of_used_secrets_is_bounded() -> None:
    store: ClientSecrets[int] = ClientSecrets(max_outstanding=4)
    values = []
    for i in range(40):
        secret = store.mint(i, 1000, T0)
        store.redeem(secret.value, T0)
        values.append(secret.value)
    assert len(store._used) == 4 and len(store) == 0
    reasons = []
    for value in values:
        with pytest.raises(SecretRefused) as refused:
            store.redeem(value, T0)
        reasons.append(refused.value.reason)
    assert reasons == ["unknown"] * 36 + ["used"] * 4


def test_mint_checks_its_bounds_and_factory() -> None:
    store: ClientSecrets[int] = ClientSecrets()
    for seconds in (MIN_EXPIRY_S - 1, MAX_EXPIRY_S + 1, 0, -5):
        with pytest.raises(ValueError):
            store.mint(0, seconds, T0)
    with pytest.raises(ValueError):
        ClientSecrets(max_outstanding=0)
    repeating: ClientSecrets[int] = ClientSecrets(new_secret=lambda: "ek_same")
    repeating.mint(0, 60, T0)
    with pytest.raises(RuntimeError):
        repeating.mint(1, 60, T0)


def test_the_store_keeps_no_usable_secret() -> None:
    store: ClientSecrets[int] = ClientSecrets()
    secret = store.mint(0, 60, T0)
    held = repr(store._outstanding) + repr(store._used)
    assert secret.value not in held and secret.value[3:] not in held


# ---------------------------------------------------------------------------------------------
# The request body
# ---------------------------------------------------------------------------------------------


def test_decode_request_defaults_and_shape() -> None:
    assert decode_request(None) == ClientSecretRequest(DEFAULT_EXPIRY_S, None)
    assert decode_request({}) == ClientSecretRequest(600, None)
    body = {
        "expires_after": {"anchor": "created_at", "seconds": 10},
        "session": {"type": "realtime", "instructions": "hi"},
        "extra": 1,
    }
    assert decode_request(body) == ClientSecretRequest(10, {"type": "realtime", "instructions": "hi"})
    assert decode_request({"expires_after": {"seconds": 7200}}).seconds == 7200
    assert decode_request({"expires_after": {}}).seconds == 600


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ("x", None),
        ({"expires_after": 60}, "expires_after"),
        ({"expires_after": {"anchor": "now", "seconds": 60}}, "expires_after.anchor"),
        ({"expires_after": {"seconds": 9}}, "expires_after.seconds"),
        ({"expires_after": {"seconds": 7201}}, "expires_after.seconds"),
        ({"expires_after": {"seconds": 60.5}}, "expires_after.seconds"),
        ({"expires_after": {"seconds": "60"}}, "expires_after.seconds"),
        ({"expires_after": {"seconds": True}}, "expires_after.seconds"),
        ({"session": "realtime"}, "session"),
    ],
)
def test_decode_request_refuses_bad_fields(body: object, param: str | None) -> None:
    with pytest.raises(WireError) as error:
        decode_request(body)  # type: ignore[arg-type]
    assert error.value.code == "invalid_value" and error.value.param == param
    if param == "expires_after.seconds":
        assert "from 10 to 7200" in error.value.message


def _defaults(session: dict | None) -> tuple[SessionConfig, dict]:
    return session_defaults(
        session,
        model="m",
        positions="group-decoupled",
        limits=Limits(max_video_fps=10.0),
        defaults=SessionConfig(video={"max_fps": 2.0, "schedule": "parallel"}),
    )


def test_session_defaults_merge_over_the_servers() -> None:
    config, shape = _defaults(None)
    assert config.instructions is None and config.video["max_fps"] == 2.0
    assert shape["id"] == "" and shape["type"] == "realtime" and shape["object"] == "realtime.session"
    config, shape = _defaults(
        {
            "type": "realtime",
            "model": "whatever",
            "instructions": "Count the shapes.",
            "max_output_tokens": 32,
            "video": {"max_fps": 5, "schedule": "sequential", "change_filter": {"threshold": 12}},
        }
    )
    assert config.instructions == "Count the shapes." and config.max_output_tokens == 32
    assert config.video == {"max_fps": 5, "schedule": "sequential", "positions": "group-decoupled"}
    assert config.change_filter.threshold == 12
    assert shape["instructions"] == "Count the shapes." and shape["max_output_tokens"] == 32
    assert shape["video"]["max_fps"] == 5.0 and shape["video"]["schedule"] == "sequential"
    assert shape["model"] == "m"


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ({"type": "transcription"}, "session.type"),
        ({"video": {"max_fps": 11}}, "session.video.max_fps"),
        ({"video": {"positions": "sequential"}}, "session.video.positions"),
        ({"instructions": 5}, "session.instructions"),
        ({"max_output_tokens": 0}, "session.max_output_tokens"),
        ({"output_modalities": ["audio"]}, "session.output_modalities"),
    ],
)
def test_session_defaults_refuse_what_a_session_update_would(session: dict, param: str) -> None:
    with pytest.raises(WireError) as error:
        _defaults(session)
    assert error.value.code == "invalid_value" and error.value.param == param


# ---------------------------------------------------------------------------------------------
# Who may connect
# ---------------------------------------------------------------------------------------------


def test_authorize_with_and_without_a_key() -> None:
    store: ClientSecrets[str] = ClientSecrets()
    assert authorize(["k"], api_key="k", store=store, now=T0) == Granted()
    assert authorize([], api_key=None, store=store, now=T0) == Granted()
    assert authorize(["sk-anything"], api_key=None, store=None, now=T0) == Granted()
    refused = authorize(["nope"], api_key="k", store=store, now=T0)
    assert isinstance(refused, Refused) and "API key" in refused.message
    assert isinstance(authorize([], api_key="k", store=None, now=T0), Refused)
    secret = store.mint("defaults", 60, T0)
    # a secret only where a session opens (store given), not to mint another or list models
    assert isinstance(authorize([secret.value], api_key="k", store=None, now=T0), Refused)
    assert authorize(["wrong", secret.value], api_key="k", store=store, now=T0) == Granted("defaults")
    used = authorize([secret.value], api_key="k", store=store, now=T0)
    assert isinstance(used, Refused) and "already used" in used.message


def test_authorize_key_wins_and_secrets_count_without_a_key() -> None:
    store: ClientSecrets[str] = ClientSecrets()
    secret = store.mint("defaults", 60, T0)
    assert authorize(["k", secret.value], api_key="k", store=store, now=T0) == Granted()
    assert len(store) == 1  # not spent: the key let the request in
    # a server without a key still applies (and spends) a secret, and refuses a bad one
    assert authorize([secret.value], api_key=None, store=store, now=T0) == Granted("defaults")
    assert isinstance(authorize([secret.value], api_key=None, store=store, now=T0), Refused)
    expired = store.mint("late", 10, T0)
    late = authorize([expired.value], api_key=None, store=store, now=T0 + 10)
    assert isinstance(late, Refused) and "expired" in late.message


# ---------------------------------------------------------------------------------------------
# Over HTTP
# ---------------------------------------------------------------------------------------------


class Clock:
    """A settable clock for ServerConfig.clock: expiry without sleeping."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


KEY = {"Authorization": "Bearer s3cret"}


async def mint(served, body: object = None, headers: dict | None = None, status: int = 200) -> dict:
    kwargs = {} if body is None else {"json": body}
    url = served.url + "/v1/realtime/client_secrets"
    async with served.http.post(url, headers=KEY if headers is None else headers, **kwargs) as reply:
        payload = await reply.json()
        assert reply.status == status, payload
    return payload


async def test_mint_needs_the_key_and_has_openais_shape(serve) -> None:
    from openai.types.realtime import ClientSecretCreateResponse

    clock = Clock()
    served = await serve(ServerConfig(api_key="s3cret", clock=clock))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        error = (await mint(served, {}, headers=headers, status=401))["error"]
        assert error["code"] == "invalid_api_key"
    assert len(served.server.secrets) == 0
    body = await mint(served, {"expires_after": {"anchor": "created_at", "seconds": 120}})
    parsed = ClientSecretCreateResponse.model_validate(body)
    assert parsed.value.startswith("ek_") and parsed.expires_at == int(T0) + 120
    assert parsed.session.type == "realtime" and parsed.session.model == "fake-vlm"
    # a secret cannot mint another
    error = (await mint(served, {}, headers={"Authorization": f"Bearer {parsed.value}"}, status=401))["error"]
    assert error["code"] == "invalid_api_key"
    assert (await mint(served))["expires_at"] == int(T0) + DEFAULT_EXPIRY_S  # no body: the defaults


async def test_the_openai_sdk_mints_one(serve) -> None:
    from openai import AsyncOpenAI

    served = await serve(ServerConfig(api_key="s3cret"))
    client = AsyncOpenAI(api_key="s3cret", base_url=served.url + "/v1")
    try:
        secret = await client.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": 60},
            session={"type": "realtime", "instructions": "Be brief."},
        )
    finally:
        await client.close()
    assert secret.value.startswith("ek_") and secret.session.instructions == "Be brief."
    ws = await served.connect(headers={"Authorization": f"Bearer {secret.value}"})
    created = await ws.recv()
    assert created["session"]["instructions"] == "Be brief."
    await ws.close()


async def test_mint_refuses_bad_bodies_with_the_field(serve) -> None:
    served = await serve(ServerConfig(api_key="s3cret"))
    cases = [
        ({"expires_after": {"seconds": 5}}, "expires_after.seconds"),
        ({"expires_after": {"seconds": 7201}}, "expires_after.seconds"),
        ({"expires_after": {"anchor": "later"}}, "expires_after.anchor"),
        ({"session": {"video": {"max_fps": 1000}}}, "session.video.max_fps"),
        ({"session": {"type": "transcription"}}, "session.type"),
        ([1, 2], None),
    ]
    for body, param in cases:
        error = (await mint(served, body, status=400))["error"]
        assert error["code"] == "invalid_value" and error["param"] == param, (body, error)
    url = served.url + "/v1/realtime/client_secrets"
    async with served.http.post(url, data="{not json", headers=KEY) as reply:
        assert reply.status == 400 and (await reply.json())["error"]["code"] == "invalid_json"
    assert len(served.server.secrets) == 0


async def test_mint_while_loading_is_503(serve) -> None:
    runtime = FakeRuntime(hold=True)
    served = await serve(ServerConfig(api_key="s3cret"), runtime=runtime, wait=False)
    error = (await mint(served, {}, status=503))["error"]
    assert error["code"] == "engine_unavailable"
    runtime.gate.set()
    assert await served.server.wait_ready(5)
    await mint(served, {})


async def test_mint_cap_is_429(serve) -> None:
    served = await serve(ServerConfig(api_key="s3cret", max_client_secrets=2))
    await mint(served, {})
    await mint(served, {})
    error = (await mint(served, {}, status=429))["error"]
    assert error["code"] == "too_many_client_secrets" and "2 unused" in error["message"]


async def test_websocket_takes_a_secret_once_with_its_session_defaults(serve) -> None:
    clock = Clock()
    served = await serve(ServerConfig(api_key="s3cret", clock=clock))
    session = {
        "type": "realtime",
        "instructions": "Say what moves.",
        "max_output_tokens": 7,
        "video": {"max_fps": 4, "schedule": "sequential", "change_filter": {"enabled": False}},
    }
    body = await mint(served, {"expires_after": {"seconds": 60}, "session": session})
    value = body["value"]
    assert body["session"]["instructions"] == "Say what moves." and body["session"]["video"]["max_fps"] == 4.0

    # the browser form: the secret in the subprotocol
    client = await served.connect(protocols=("realtime", f"openai-insecure-api-key.{value}"))
    assert client.ws.protocol == "realtime"
    created = await client.recv()
    assert created["type"] == "session.created"
    got = created["session"]
    assert got["instructions"] == "Say what moves." and got["max_output_tokens"] == 7
    assert got["video"]["max_fps"] == 4.0 and got["video"]["schedule"] == "sequential"
    assert got["video"]["change_filter"]["enabled"] is False
    (fake,) = served.runtime.sessions
    assert fake.instructions == "Say what moves." and fake.schedule == "sequential"
    assert served.server.connections[got["id"]].max_fps == 4.0
    _, done = await client.ask("hi")
    assert done["response"]["max_output_tokens"] == 7
    assert served.runtime.sessions[0].asked[-1].max_tokens == 7
    # null in a session.update restores the minted default, not the server's
    await client.send({"type": "session.update", "session": {"instructions": "other"}})
    await client.until("session.updated")
    await client.send({"type": "session.update", "session": {"instructions": None}})
    assert (await client.until("session.updated"))[-1]["session"]["instructions"] == "Say what moves."

    # reused: 401, in either form
    for kwargs in (
        {"protocols": ("realtime", f"openai-insecure-api-key.{value}")},
        {"headers": {"Authorization": f"Bearer {value}"}},
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await served.connect(**kwargs)
        assert refused.value.status == 401
    await client.close()

    # a new secret by Bearer header opens a plain session (the server's defaults)
    value = (await mint(served, {}))["value"]
    other = await served.connect(headers={"Authorization": f"Bearer {value}"})
    got = (await other.recv())["session"]
    assert got["instructions"] is None and got["video"]["max_fps"] == 2.0
    await other.close()


async def test_expired_secret_is_401(serve) -> None:
    clock = Clock()
    served = await serve(ServerConfig(api_key="s3cret", clock=clock))
    value = (await mint(served, {"expires_after": {"seconds": 10}}))["value"]
    clock.now += 10
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await served.connect(headers={"Authorization": f"Bearer {value}"})
    assert refused.value.status == 401
    # the body says why
    async with served.http.get(
        served.url + "/v1/realtime", headers={"Authorization": f"Bearer {value}"}
    ) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
    value = (await mint(served, {"expires_after": {"seconds": 10}}))["value"]
    clock.now += 9.5
    client = await served.connect(headers={"Authorization": f"Bearer {value}"})
    assert (await client.recv())["type"] == "session.created"
    await client.close()


async def test_expired_secret_body_names_expiry(serve) -> None:
    clock = Clock()
    served = await serve(ServerConfig(api_key="s3cret", clock=clock))
    value = (await mint(served, {"expires_after": {"seconds": 10}}))["value"]
    clock.now += 11
    headers = {"Authorization": f"Bearer {value}"}
    async with served.http.post(served.url + "/v1/realtime/calls", data="v=0\r\n", headers=headers) as reply:
        assert reply.status == 401
        assert "expired" in (await reply.json())["error"]["message"]


async def test_calls_take_a_secret_once(serve) -> None:
    """Auth comes before the SDP: 400 (a bad offer) means the secret let the request in."""
    served = await serve(ServerConfig(api_key="s3cret"))
    value = (await mint(served, {}))["value"]
    url = served.url + "/v1/realtime/calls"
    statuses = []
    for _ in range(2):
        async with served.http.post(url, data="bogus", headers={"Authorization": f"Bearer {value}"}) as reply:
            statuses.append(reply.status)
    assert statuses == [400, 401]
    async with served.http.post(url, data="bogus") as reply:
        assert reply.status == 401
    # and other /v1 endpoints never take a secret
    value = (await mint(served, {}))["value"]
    async with served.http.get(served.url + "/v1/models", headers={"Authorization": f"Bearer {value}"}) as r:
        assert r.status == 401
    assert len(served.server.secrets) == 1  # not spent by the refused request


async def test_a_secret_opens_a_webrtc_session_with_its_defaults(serve) -> None:
    served = await serve(ServerConfig(api_key="s3cret", stats_interval=0.2))
    session = {"instructions": "Watch the square.", "video": {"max_fps": 3}}
    value = (await mint(served, {"session": session}))["value"]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = synthetic_track(15.0, (96, 64))
    pc.addTrack(track)
    events = EventChannel(pc.createDataChannel(EVENTS_LABEL))
    try:
        await pc.setLocalDescription(await pc.createOffer())
        headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {value}"}
        async with served.http.post(
            served.url + "/v1/realtime/calls", data=pc.localDescription.sdp, headers=headers
        ) as reply:
            assert reply.status == 201, await reply.text()
            answer = await reply.text()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        created = await asyncio.wait_for(events.recv(), 15)
        assert created["type"] == "session.created"
        assert created["session"]["instructions"] == "Watch the square."
        assert created["session"]["video"]["max_fps"] == 3.0
        (fake,) = served.runtime.sessions
        assert fake.instructions == "Watch the square."
    finally:
        await pc.close()
        await track.aclose()


async def test_server_without_a_key_still_applies_and_checks_secrets(serve) -> None:
    served = await serve()
    value = (await mint(served, {"session": {"instructions": "keyless"}}, headers={}))["value"]
    client = await served.connect(headers={"Authorization": f"Bearer {value}"})
    assert (await client.recv())["session"]["instructions"] == "keyless"
    await client.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await served.connect(headers={"Authorization": f"Bearer {value}"})
    assert refused.value.status == 401
    # any other key is ignored, as before
    client = await served.connect(headers={"Authorization": "Bearer sk-whatever"})
    assert (await client.recv())["type"] == "session.created"
    await client.close()


async def test_many_secrets_each_open_one_session(serve) -> None:
    served = await serve(ServerConfig(api_key="s3cret", max_sessions=4))
    values = [(await mint(served, {"session": {"instructions": f"n{i}"}}))["value"] for i in range(3)]
    clients = []
    for i, value in enumerate(values):
        client = await served.connect(protocols=(f"openai-insecure-api-key.{value}",))
        assert (await client.recv())["session"]["instructions"] == f"n{i}"
        clients.append(client)
    assert len(served.server.secrets) == 0
    for client in clients:
        await client.close()


def test_the_shipped_page_mints_per_call_and_never_stores_the_key() -> None:
    """The browser test (tests/client/test_client_web_secrets.py) drives this for real; this guards
    the page's source where no Chromium is installed."""
    from runtime.server.app import WEB_ROOT

    page = (WEB_ROOT / "app.js").read_text()
    assert "/v1/realtime/client_secrets" in page
    assert "setItem" not in page  # neither localStorage nor sessionStorage is written
    assert "localStorage.removeItem(KEY_STORAGE)" in page  # an older page's stored key goes
