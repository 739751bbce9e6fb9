"""The server's VAPID key pair (RFC 8292): made once, kept under the data directory.

A browser subscribes with the *application server key* (the public half) and its push
service then accepts only pushes signed with the private half. The pair must
therefore survive restarts: a new key would silently orphan every subscription. It is
generated on the first start and stored as ``<data_dir>/notification/vapid_private.pem``
(PKCS#8 PEM, mode 0600); later starts read it back.

The file is written under a temporary name of its own and hard-linked into place, so
two servers starting on the same data directory at once end up with one key: the
second link fails and that server reads the first one's key.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02

from imserver.utils.errors import BadRequest

KEY_FILE = "vapid_private.pem"
"""The private key's file name under ``<data_dir>/notification/``."""


def key_path(data_dir: str | Path) -> Path:
    """Where the private key of the deployment with this data directory is stored."""
    return Path(data_dir) / "notification" / KEY_FILE


@dataclass(frozen=True, slots=True)
class VapidKeys:
    """The server's VAPID signing key and what clients need of it."""

    signer: Vapid02
    """Signs the ``Authorization: vapid t=…, k=…`` header of each push."""
    application_server_key: str
    """The public key as browsers take it (``PushManager.subscribe``'s
    ``applicationServerKey``): the uncompressed P-256 point, base64url without padding.
    The notification service serves it as ``push.vapid_key``."""
    path: Path
    """The PEM file holding the private key."""


def application_server_key(public_key: ec.EllipticCurvePublicKey) -> str:
    """The uncompressed point of ``public_key`` (65 bytes), base64url without padding."""
    raw = public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def load_vapid_keys(data_dir: str | Path) -> VapidKeys:
    """The key pair under ``data_dir``, generated and stored on the first call.

    Blocking file I/O: call it once at start-up.
    """
    path = key_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _create(path)
    private_key = _read(path)
    return VapidKeys(
        signer=Vapid02(private_key),
        application_server_key=application_server_key(private_key.public_key()),
        path=path,
    )


def _create(path: Path) -> None:
    """Write a new private key to ``path`` unless another process did first."""
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):  # another process's key won
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read(path: Path) -> ec.EllipticCurvePrivateKey:
    """The P-256 private key in ``path``; a configuration error when it is anything else."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise BadRequest(f"invalid configuration: {path} is not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BadRequest(f"invalid configuration: {path} is not a P-256 key")
    return key
