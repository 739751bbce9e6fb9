"""The ``apns`` provider against a local APNs stand-in: HTTP/2 over TLS.

The stand-in is an asyncio server on the ``h2`` library, behind a certificate of a CA
made here (the provider trusts it through ``ca_file``), that offers only ``h2`` by
ALPN. It checks what Apple's documentation asks of a provider: an ES256 provider token
(``kid`` the key id, ``iss`` the team, ``iat`` within the hour) verified with the
``.p8`` key's public half; ``apns-topic``, ``apns-push-type`` and a priority it allows,
``apns-collapse-id`` of at most 64 bytes, ``apns-expiration``, and the ``aps``
payload of each push type. It answers as APNs does: 200 with ``apns-id``, 410
``Unregistered``, 400 ``BadDeviceToken``, 403 ``ExpiredProviderToken``, 429
``TooManyRequests``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded

from imserver.services.notification.providers import apns
from imserver.services.notification.providers.apns import KEY_NAMESPACE, ApnsProvider
from imserver.services.notification.providers.base import Push, Registration
from imserver.utils.config import ApnsConfig
from imserver.utils.errors import BadRequest

KEY_ID = "ABC123DEFG"
TEAM_ID = "DEF123GHIJ"
TOPIC = "org.imserver.app"

OK = "a0" * 32
GONE = "de" * 32
BAD = "bd" * 32
BUSY = "b5" * 32
NOT_FOR_TOPIC = "0f" * 32

Answer = tuple[int, dict[str, str], bytes]


def refusal(status: int, reason: str, **extra: Any) -> Answer:
    return status, {}, json.dumps({"reason": reason, **extra}).encode()


@dataclass
class Apple:
    """The stand-in's checks and answers, and what it saw."""

    public_key: ec.EllipticCurvePublicKey
    tokens: list[str] = field(default_factory=list)
    """Distinct provider tokens, in the order they first arrived."""
    expired: set[str] = field(default_factory=set)
    expire_all: bool = False
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    connections: int = 0
    busy_answered: bool = False

    def answer(self, headers: dict[str, str], body: bytes) -> Answer:
        """APNs' answer to one request."""
        bearer = headers.get("authorization", "")
        if not bearer.startswith("bearer "):
            return refusal(403, "MissingProviderToken")
        token = bearer[7:]
        if token not in self.tokens:
            self.tokens.append(token)
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=["ES256"],
                issuer=TEAM_ID,
                options={"require": ["iss", "iat"]},
            )
        except jwt.InvalidTokenError:
            return refusal(403, "InvalidProviderToken")
        if header.get("kid") != KEY_ID:
            return refusal(403, "InvalidProviderToken")
        if self.expire_all or token in self.expired or claims["iat"] < time.time() - 3600:
            return refusal(403, "ExpiredProviderToken")
        if headers.get(":method") != "POST":
            return refusal(405, "MethodNotAllowed")
        path = headers.get(":path", "")
        if not path.startswith("/3/device/"):
            return refusal(404, "BadPath")
        device = path.removeprefix("/3/device/")
        if "apns-topic" not in headers:
            return refusal(400, "MissingTopic")
        if headers["apns-topic"] != TOPIC:
            return refusal(400, "TopicDisallowed")
        push_type = headers.get("apns-push-type")
        if push_type not in ("alert", "background"):
            return refusal(400, "InvalidPushType")
        if headers.get("apns-priority") != ("5" if push_type == "background" else "10"):
            return refusal(400, "BadPriority")
        collapse = headers.get("apns-collapse-id", "")
        if not collapse or len(collapse.encode()) > 64:
            return refusal(400, "BadCollapseId")
        if not headers.get("apns-expiration", "").isdigit():
            return refusal(400, "BadExpirationDate")
        try:
            uuid.UUID(headers.get("apns-id", ""))
        except ValueError:
            return refusal(400, "BadMessageId")
        if len(body) > 4096:
            return refusal(413, "PayloadTooLarge")
        try:
            payload = json.loads(body)
            aps = payload["aps"]
        except (ValueError, KeyError, TypeError):
            return refusal(400, "PayloadEmpty")
        if push_type == "background":
            if aps != {"content-available": 1}:
                return refusal(400, "BadPayload")
        elif set(aps["alert"]) != {"title", "body"} or "thread-id" not in aps:
            return refusal(400, "BadPayload")
        if device == GONE:
            return refusal(410, "Unregistered", timestamp=int(time.time() * 1000))
        if device == BAD:
            return refusal(400, "BadDeviceToken")
        if device == NOT_FOR_TOPIC:
            return refusal(400, "DeviceTokenNotForTopic")
        if device == BUSY and not self.busy_answered:
            self.busy_answered = True
            return refusal(429, "TooManyRequests")
        self.requests.append((headers, payload))
        return 200, {"apns-id": headers["apns-id"]}, b""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/2 connection: only ``h2`` is spoken."""
        self.connections += 1
        if writer.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
            writer.close()
            return
        conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, RequestReceived):
                        streams[event.stream_id] = (dict(event.headers), bytearray())  # type: ignore[arg-type]
                    elif isinstance(event, DataReceived):
                        streams[event.stream_id][1].extend(event.data)
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, StreamEnded):
                        headers, body = streams.pop(event.stream_id)
                        status, extra, reply = self.answer(headers, bytes(body))
                        response = [(":status", str(status)), *extra.items()]
                        if reply:
                            response.append(("content-type", "application/json"))
                        conn.send_headers(event.stream_id, response, end_stream=not reply)
                        if reply:
                            conn.send_data(event.stream_id, reply, end_stream=True)
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost:
    ``(ca.pem, server.pem, server-key.pem)``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imserver test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
async def apple(tmp_path: Path) -> AsyncIterator[tuple[Apple, ApnsConfig]]:
    """The stand-in on a free port, and the settings of a provider that uses it."""
    ca, cert, cert_key = make_certificates(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, cert_key)
    context.set_alpn_protocols(["h2"])
    signing = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / f"AuthKey_{KEY_ID}.p8"
    key_file.write_bytes(
        signing.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    state = Apple(public_key=signing.public_key())
    server = await asyncio.start_server(state.serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    config = ApnsConfig(
        key_file=str(key_file),
        key_id=KEY_ID,
        team_id=TEAM_ID,
        topic=TOPIC,
        endpoint=f"https://127.0.0.1:{port}",
        ca_file=str(ca),
        timeout=2.0,
    )
    try:
        yield state, config
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def provider(apple: tuple[Apple, ApnsConfig]) -> AsyncIterator[ApnsProvider]:
    """An APNs provider on the stand-in."""
    sender = ApnsProvider(apple[1])
    try:
        yield sender
    finally:
        await sender.close()


def registration(token: str) -> Registration:
    return Registration(
        user="u1", device="iphone", provider="apns", target={"token": token}, created=0
    )


def push(kind: str = "message", conv: str = "d:u1:u2") -> Push:
    return Push(
        key=f"u1:iphone:{conv}:12",
        kind=kind,  # type: ignore[arg-type]
        user="u1",
        device="iphone",
        conv=conv,
        seq=12,
        count=3 if kind == "message" else 0,
        badge=5 if kind == "message" else 0,
        title="Bob" if kind == "message" else "",
        body="see you at 8" if kind == "message" else "",
    )


async def test_alert_is_sent_over_http2_with_the_documented_headers_and_payload(
    apple: tuple[Apple, ApnsConfig], provider: ApnsProvider
) -> None:
    state, _ = apple
    outcome = await provider.send(registration(OK), push())
    apns_id = str(uuid.uuid5(KEY_NAMESPACE, "u1:iphone:d:u1:u2:12"))
    assert (outcome.status, outcome.code, outcome.detail) == ("sent", 200, apns_id)
    ((headers, payload),) = state.requests
    assert headers[":path"] == f"/3/device/{OK}"
    assert headers["apns-topic"] == TOPIC
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == "10"
    assert headers["apns-collapse-id"] == "d:u1:u2"
    assert abs(int(headers["apns-expiration"]) - (time.time() + 86400)) < 60
    assert payload == {
        "aps": {
            "alert": {"title": "Bob", "body": "see you at 8"},
            "badge": 5,
            "sound": "default",
            "thread-id": "d:u1:u2",
        },
        "kind": "message",
        "conv": "d:u1:u2",
        "seq": 12,
        "count": 3,
        "badge": 5,
        "key": "u1:iphone:d:u1:u2:12",
    }


async def test_read_is_a_background_push_at_priority_5(
    apple: tuple[Apple, ApnsConfig], provider: ApnsProvider
) -> None:
    state, _ = apple
    assert (await provider.send(registration(OK), push("read"))).status == "sent"
    ((headers, payload),) = state.requests
    assert headers["apns-push-type"] == "background"
    assert headers["apns-priority"] == "5"
    assert payload["aps"] == {"content-available": 1}
    assert payload["badge"] == 0
    assert payload["kind"] == "read"


async def test_one_connection_and_one_provider_token_serve_many_pushes(
    apple: tuple[Apple, ApnsConfig], provider: ApnsProvider
) -> None:
    state, _ = apple
    outcomes = await asyncio.gather(*(provider.send(registration(OK), push()) for _ in range(5)))
    assert [o.status for o in outcomes] == ["sent"] * 5
    assert (await provider.send(registration(OK), push("read"))).status == "sent"
    assert len(state.tokens) == 1
    assert state.connections == 1


async def test_token_is_signed_anew_after_its_lifetime(
    apple: tuple[Apple, ApnsConfig], provider: ApnsProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, _ = apple
    monkeypatch.setattr(apns, "TOKEN_LIFETIME", 0.0)
    for _ in range(2):
        assert (await provider.send(registration(OK), push())).status == "sent"
    assert len(state.tokens) == 2


async def test_expired_provider_token_is_replaced_and_the_push_retried(
    apple: tuple[Apple, ApnsConfig], provider: ApnsProvider
) -> None:
    state, _ = apple
    assert (await provider.send(registration(OK), push())).status == "sent"
    state.expired.update(state.tokens)
    outcome = await provider.send(registration(OK), push())
    assert outcome.status == "sent"
    assert len(state.tokens) == 2
    assert len(state.requests) == 2


async def test_token_refused_again_is_retried_later(
    apple: tuple[Apple, ApnsConfig], provider: ApnsProvider
) -> None:
    state, _ = apple
    state.expire_all = True
    outcome = await provider.send(registration(OK), push())
    assert (outcome.status, outcome.code, outcome.detail) == ("retry", 403, "ExpiredProviderToken")
    assert len(state.tokens) == 2


@pytest.mark.parametrize(
    ("device", "status", "code", "detail"),
    [
        (GONE, "gone", 410, "Unregistered"),
        (BAD, "gone", 400, "BadDeviceToken"),
        (NOT_FOR_TOPIC, "failed", 400, "DeviceTokenNotForTopic"),
    ],
)
async def test_refusals_map_to_outcomes(
    provider: ApnsProvider, device: str, status: str, code: int, detail: str
) -> None:
    outcome = await provider.send(registration(device), push())
    assert (outcome.status, outcome.code, outcome.detail) == (status, code, detail)


async def test_429_is_retried_then_sent(provider: ApnsProvider) -> None:
    first = await provider.send(registration(BUSY), push())
    assert (first.status, first.code, first.detail) == ("retry", 429, "TooManyRequests")
    assert (await provider.send(registration(BUSY), push())).status == "sent"


async def test_wrong_topic_fails_with_apples_reason(apple: tuple[Apple, ApnsConfig]) -> None:
    _, config = apple
    sender = ApnsProvider(msgspec.structs.replace(config, topic="org.example.other"))
    try:
        outcome = await sender.send(registration(OK), push())
    finally:
        await sender.close()
    assert (outcome.status, outcome.code, outcome.detail) == ("failed", 400, "TopicDisallowed")


async def test_wrong_path_fails_and_is_not_gone(apple: tuple[Apple, ApnsConfig]) -> None:
    _, config = apple
    sender = ApnsProvider(msgspec.structs.replace(config, endpoint=config.endpoint + "/v2"))
    try:
        outcome = await sender.send(registration(OK), push())
    finally:
        await sender.close()
    assert (outcome.status, outcome.code, outcome.detail) == ("failed", 404, "BadPath")


async def test_long_conversation_id_gives_a_64_byte_collapse_id(
    apple: tuple[Apple, ApnsConfig], provider: ApnsProvider
) -> None:
    state, _ = apple
    assert (await provider.send(registration(OK), push(conv="r:" + "x" * 100))).status == "sent"
    ((headers, _),) = state.requests
    assert len(headers["apns-collapse-id"]) == 64


async def test_long_body_is_clipped_to_fit_the_payload_limit(
    apple: tuple[Apple, ApnsConfig], provider: ApnsProvider
) -> None:
    state, _ = apple
    long = msgspec.structs.replace(push(), title="T" * 1000, body="é" * 5000)
    assert (await provider.send(registration(OK), long)).status == "sent"
    ((_, payload),) = state.requests
    assert payload["aps"]["alert"]["body"].endswith("…")


async def test_endpoint_not_trusted_without_the_ca_file_is_retried(
    apple: tuple[Apple, ApnsConfig],
) -> None:
    state, config = apple
    sender = ApnsProvider(msgspec.structs.replace(config, ca_file=""))
    try:
        outcome = await sender.send(registration(OK), push())
    finally:
        await sender.close()
    assert outcome.status == "retry"
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.detail
    assert not state.requests


async def test_unreachable_endpoint_is_retried(apple: tuple[Apple, ApnsConfig]) -> None:
    _, config = apple
    sender = ApnsProvider(msgspec.structs.replace(config, endpoint="https://127.0.0.1:9"))
    try:
        outcome = await sender.send(registration(OK), push())
    finally:
        await sender.close()
    assert (outcome.status, outcome.code) == ("retry", None)


@pytest.mark.parametrize(
    "target",
    [{}, {"token": 42}, {"token": "xyz"}, {"token": "abc"}, {"token": "a0" * 8}],
)
async def test_bad_target_is_a_bad_request_naming_the_field(
    provider: ApnsProvider, target: dict[str, Any]
) -> None:
    with pytest.raises(BadRequest) as caught:
        provider.check_target(target)
    assert caught.value.field == "target.token"


async def test_target_is_stored_in_lower_case(provider: ApnsProvider) -> None:
    assert provider.check_target({"token": "A0" * 32}) == {"token": OK}
    assert provider.name == "apns"


def test_bad_settings_stop_the_start(tmp_path: Path) -> None:
    def config(key_file: Path) -> ApnsConfig:
        return ApnsConfig(key_file=str(key_file), key_id=KEY_ID, team_id=TEAM_ID, topic=TOPIC)

    with pytest.raises(BadRequest, match=r"push\.apns\.key_file"):
        ApnsProvider(config(tmp_path / "missing.p8"))
    rsa_file = tmp_path / "rsa.p8"
    rsa_file.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(BadRequest, match="not an EC key"):
        ApnsProvider(config(rsa_file))
    ec_file = tmp_path / "ec.p8"
    ec_file.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(BadRequest, match=r"push\.apns\.ca_file"):
        ApnsProvider(msgspec.structs.replace(config(ec_file), ca_file=str(tmp_path / "no.pem")))
    with pytest.raises(BadRequest, match=r"push\.apns\.team_id"):
        ApnsProvider(ApnsConfig(key_file=str(rsa_file), key_id=KEY_ID, topic=TOPIC))
