"""The Origin check: the pure policy, then browser-like requests (with ``Origin``) against the server."""

from __future__ import annotations

import aiohttp
import pytest

from runtime.server.app import ServerConfig
from runtime.server.origins import Origin, OriginPolicy, cors_headers, preflight_headers

pytestmark = pytest.mark.timeout(60)

EVIL = "http://evil.example"
FRIEND = "https://app.example:8443"


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------


def test_origin_parse_normalises() -> None:
    assert Origin.parse("HTTP://LocalHost:8000") == Origin("http", "localhost", 8000)
    assert Origin.parse("https://a.example") == Origin("https", "a.example", 443)
    assert Origin.parse("http://a.example/") == Origin("http", "a.example", 80)
    assert Origin.parse("http://[::1]:9") == Origin("http", "::1", 9)
    assert str(Origin.parse("http://[::1]:9")) == "http://[::1]:9"
    assert str(Origin.parse("https://a.example:443")) == "https://a.example"
    for bad in ("null", "a.example", "ftp://a.example", "http://", "http://a.example/path",
                "http://a.example?q", "http://u@a.example", "http://a.example:99999", "*x"):  # fmt: skip
        with pytest.raises(ValueError):
            Origin.parse(bad)


def test_of_request_reads_the_host_header() -> None:
    assert Origin.of_request("http", "127.0.0.1:8000") == Origin("http", "127.0.0.1", 8000)
    assert Origin.of_request("https", "example.org") == Origin("https", "example.org", 443)
    assert Origin.of_request("http", "[::1]:8000") == Origin("http", "::1", 8000)
    assert Origin.of_request("http", "bad host:x") is None


def test_policy_verdicts() -> None:
    policy = OriginPolicy.of([FRIEND, "http://localhost:3000/"])
    host = "127.0.0.1:8000"
    assert policy.check(None, "http", host) == "no-origin"
    assert policy.check("http://127.0.0.1:8000", "http", host) == "same-origin"
    assert policy.check("http://127.0.0.1:8001", "http", host) == "refused"  # another port
    assert policy.check("https://127.0.0.1:8000", "http", host) == "refused"  # another scheme
    assert policy.check("http://localhost:8000", "http", host) == "refused"  # another host name
    assert policy.check(FRIEND, "http", host) == "allowed"
    assert policy.check("https://APP.example:8443", "http", host) == "allowed"
    assert policy.check("https://app.example", "http", host) == "refused"
    assert policy.check("http://localhost:3000", "http", host) == "allowed"
    assert policy.check(EVIL, "http", host) == "refused"
    assert policy.check("null", "http", host) == "refused"
    assert policy.check("garbage", "http", host) == "refused"
    assert policy.check("http://localhost", "http", "localhost") == "same-origin"  # default port
    assert policy.check("http://localhost:80", "http", "localhost") == "same-origin"
    assert policy.check("http://127.0.0.1:8000", "http", None) == "refused"


def test_any_origin() -> None:
    policy = OriginPolicy.of(["*"])
    assert policy.any and not policy.allowed
    assert policy.check(EVIL, "http", "127.0.0.1:8000") == "allowed"
    assert policy.check("null", "http", "127.0.0.1:8000") == "allowed"
    assert OriginPolicy.of([]).check(EVIL, "http", "x") == "refused"


def test_bad_allow_list_is_refused_at_config_time() -> None:
    with pytest.raises(ValueError, match="origin"):
        ServerConfig(allow_origins=("evil.example",))
    with pytest.raises(ValueError):
        ServerConfig(allow_origins=("http://a.example/app",))
    assert ServerConfig(allow_origins=("*", FRIEND)).allow_origins == ("*", FRIEND)


def test_cors_header_sets() -> None:
    assert cors_headers(FRIEND)["Access-Control-Allow-Origin"] == FRIEND
    assert "Location" in cors_headers(FRIEND)["Access-Control-Expose-Headers"]
    asked = {"Access-Control-Request-Headers": "authorization, content-type"}
    headers = preflight_headers(FRIEND, asked)
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert (
        "POST" in headers["Access-Control-Allow-Methods"]
        and "DELETE" in headers["Access-Control-Allow-Methods"]
    )
    assert "Origin" in headers["Vary"] and int(headers["Access-Control-Max-Age"]) > 0
    assert "Authorization" in preflight_headers(FRIEND, {})["Access-Control-Allow-Headers"]


# ---------------------------------------------------------------------------------------------
# Over the wire
# ---------------------------------------------------------------------------------------------


async def refused_handshake(served, origin: str, **kwargs: object) -> aiohttp.WSServerHandshakeError:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await served.connect(origin=origin, **kwargs)
    return refused.value


async def test_cross_origin_websocket_is_refused(serve) -> None:
    served = await serve()
    refused = await refused_handshake(served, EVIL)
    assert refused.status == 403
    async with served.http.get(served.url + "/v1/realtime", headers={"Origin": EVIL}) as reply:
        assert reply.status == 403
        error = (await reply.json())["error"]
    assert error["code"] == "origin_not_allowed" and "--allow-origin http://evil.example" in error["message"]
    assert not served.runtime.sessions  # no session was opened for it
    async with served.http.get(served.url + "/metrics") as reply:
        assert 'speakwatch_client_errors_total{code="origin_not_allowed"} 2.0' in await reply.text()


async def test_cross_origin_http_is_refused_even_with_the_key(serve) -> None:
    served = await serve(ServerConfig(api_key="k"))
    headers = {"Origin": EVIL, "Authorization": "Bearer k"}
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("POST", "/v1/realtime/calls", "v=0\r\n"),
        ("POST", "/v1/realtime/client_secrets", "{}"),
        ("DELETE", "/v1/realtime/calls/rtc_x", None),
    ):
        async with served.http.request(method, served.url + path, data=body, headers=headers) as reply:
            assert reply.status == 403, (method, path)
            assert (await reply.json())["error"]["code"] == "origin_not_allowed"
            assert "Access-Control-Allow-Origin" not in reply.headers
    assert len(served.server.secrets) == 0
    # a preflight from it is refused too
    preflight = {"Origin": EVIL, "Access-Control-Request-Method": "POST"}
    async with served.http.options(served.url + "/v1/realtime/calls", headers=preflight) as reply:
        assert reply.status == 403 and "Access-Control-Allow-Origin" not in reply.headers


async def test_outside_v1_origin_is_not_checked(serve) -> None:
    served = await serve()
    for path in ("/health", "/metrics", "/"):
        async with served.http.get(served.url + path, headers={"Origin": EVIL}) as reply:
            assert reply.status == 200, path


async def test_same_origin_page_works(serve) -> None:
    served = await serve(ServerConfig(api_key="k"))
    client = await served.connect(origin=served.url, headers={"Authorization": "Bearer k"})
    assert (await client.recv())["type"] == "session.created"
    await client.close()
    headers = {"Origin": served.url, "Authorization": "Bearer k"}
    async with served.http.post(
        served.url + "/v1/realtime/client_secrets", json={}, headers=headers
    ) as reply:
        assert reply.status == 200
        assert "Access-Control-Allow-Origin" not in reply.headers  # same origin needs no CORS
        value = (await reply.json())["value"]
    client = await served.connect(
        origin=served.url, protocols=("realtime", f"openai-insecure-api-key.{value}")
    )
    assert (await client.recv())["type"] == "session.created"
    await client.close()
    # "localhost" is another origin than "127.0.0.1" to a browser; the Host header decides
    port = served.url.rsplit(":", 1)[1]
    async with served.http.get(
        served.url + "/v1/models",
        headers={
            "Origin": f"http://localhost:{port}",
            "Host": f"localhost:{port}",
            "Authorization": "Bearer k",
        },
    ) as reply:
        assert reply.status == 200


async def test_no_origin_is_unaffected(serve) -> None:
    served = await serve(ServerConfig(api_key="k"))
    client = await served.connect(headers={"Authorization": "Bearer k"})
    assert (await client.recv())["type"] == "session.created"
    await client.close()
    async with served.http.get(served.url + "/v1/models", headers={"Authorization": "Bearer k"}) as reply:
        assert reply.status == 200


async def test_allow_listed_origin_gets_cors(serve) -> None:
    served = await serve(ServerConfig(api_key="k", allow_origins=(FRIEND,)))
    await refused_handshake(served, EVIL)
    client = await served.connect(origin=FRIEND, headers={"Authorization": "Bearer k"})
    assert (await client.recv())["type"] == "session.created"
    await client.close()

    # the preflight of a POST with the key and an SDP body: answered without the key
    preflight = {
        "Origin": FRIEND,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    async with served.http.options(served.url + "/v1/realtime/calls", headers=preflight) as reply:
        assert reply.status == 204
        assert reply.headers["Access-Control-Allow-Origin"] == FRIEND
        assert "POST" in reply.headers["Access-Control-Allow-Methods"]
        assert reply.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    # the answers carry the CORS headers, errors included (so the page can read them)
    headers = {"Origin": FRIEND, "Authorization": "Bearer k"}
    async with served.http.get(served.url + "/v1/models", headers=headers) as reply:
        assert reply.status == 200 and reply.headers["Access-Control-Allow-Origin"] == FRIEND
        assert "Origin" in reply.headers["Vary"]
    async with served.http.get(served.url + "/v1/models", headers={"Origin": FRIEND}) as reply:
        assert reply.status == 401 and reply.headers["Access-Control-Allow-Origin"] == FRIEND
    async with served.http.post(served.url + "/v1/realtime/calls", data="nope", headers=headers) as reply:
        assert reply.status == 400 and reply.headers["Access-Control-Allow-Origin"] == FRIEND
    async with served.http.get(served.url + "/v1/nothing-here", headers=headers) as reply:
        assert reply.status == 404 and reply.headers["Access-Control-Allow-Origin"] == FRIEND
    # a preflight without an Origin is no CORS request: the router answers it as before
    async with served.http.options(served.url + "/v1/models") as reply:
        assert reply.status == 401 and "Access-Control-Allow-Origin" not in reply.headers


async def test_any_origin_allowed_with_star(serve) -> None:
    served = await serve(ServerConfig(allow_origins=("*",)))
    client = await served.connect(origin=EVIL)
    assert (await client.recv())["type"] == "session.created"
    await client.close()
    async with served.http.get(served.url + "/v1/models", headers={"Origin": "null"}) as reply:
        assert reply.status == 200 and reply.headers["Access-Control-Allow-Origin"] == "null"


def test_cli_allow_origin_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.cli import build_parser, server_config

    monkeypatch.setenv("SPEAKWATCH_ALLOW_ORIGIN", "http://a.example:3000, https://b.example")
    args = build_parser().parse_args(["serve"])
    assert server_config(args).allow_origins == ("http://a.example:3000", "https://b.example")
    flags = ["serve", "--allow-origin", "HTTP://C.example:80", "--allow-origin", "*"]
    args = build_parser().parse_args(flags)  # the command line replaces the variable's list
    assert server_config(args).allow_origins == ("http://c.example", "*")
    monkeypatch.setenv("SPEAKWATCH_ALLOW_ORIGIN", "nope")
    assert "SPEAKWATCH_ALLOW_ORIGIN" in build_parser().parse_args(["serve"]).env_errors[0]
    monkeypatch.delenv("SPEAKWATCH_ALLOW_ORIGIN")
    assert server_config(build_parser().parse_args(["serve"])).allow_origins == ()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--allow-origin", "evil.example/path"])
