"""CurveZMQ cluster keys, and the ZAP handler that admits only peers holding the cluster key.

A cluster key is one CURVE key pair shared by every node, worker and driver of a
cluster. Servers use it as their own key pair; clients present it as theirs. The
CURVE handshake proves a peer holds the secret half, and the ZAP handler admits a
client only when the public key it proved is the cluster's. A peer without the key
is refused in the handshake, before any byte it sends reaches zmesh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

logger = logging.getLogger(__name__)

KEY_ENV = "ZMESH_CLUSTER_KEY_FILE"
INSECURE_ENV = "ZMESH_INSECURE"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zmesh"
_HEADER = "# zmesh cluster key. Whoever holds this file can run code on every node of the cluster: keep it secret.\n"


class ClusterKeyError(ValueError):
    """A cluster key file that is missing, malformed or readable by others."""


@dataclasses.dataclass(frozen=True)
class ClusterKey:
    """One CURVE key pair (Z85 text). ``repr`` shows only the fingerprint, never the secret."""

    public: bytes
    secret: bytes = dataclasses.field(repr=False)
    path: str | None = None

    def __repr__(self) -> str:
        return f"ClusterKey(fingerprint={self.fingerprint}, path={self.path!r})"

    @property
    def fingerprint(self) -> str:
        """Names the cluster without revealing anything useful: a hash of the public half."""
        return hashlib.sha256(b"zmesh-cluster:" + self.public).hexdigest()[:16]

    @classmethod
    def generate(cls) -> ClusterKey:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def save(self, path: str | os.PathLike[str], *, make_parents: bool = False) -> Path:
        """Write the key to a new file of mode 0600; refuses to overwrite one.

        Missing directories are made only for the per-user key: a typo in a path given
        by hand should fail, not scatter key files in new folders.
        """
        target = Path(path).expanduser()
        if make_parents:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(_HEADER)
            out.write(f"public = {self.public.decode()}\nsecret = {self.secret.decode()}\n")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClusterKey:
        source = Path(path).expanduser()
        try:
            info = source.stat()
            text = source.read_text()
        except OSError as exc:
            raise ClusterKeyError(f"cannot read cluster key file {source}: {exc.strerror}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ClusterKeyError(
                f"cluster key file {source} is accessible by other users (mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {source}"
            )
        fields: dict[str, str] = {}
        for line in text.splitlines():
            name, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                fields[name.strip()] = value.strip()
        try:
            public, secret = fields["public"].encode(), fields["secret"].encode()
            if zmq.curve_public(secret) != public:
                raise ValueError("the halves do not match")
        except (KeyError, ValueError, zmq.ZMQError) as exc:
            raise ClusterKeyError(f"{source} is not a zmesh cluster key file ({exc}); make one with `zmesh keygen`") from None
        return cls(public, secret, str(source))


def default_key_path() -> Path:
    """The per-user key made on first use: ``$XDG_CONFIG_HOME/zmesh/cluster.key``."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "zmesh" / "cluster.key"


def resolve_key(path: str | os.PathLike[str] | None = None) -> tuple[ClusterKey, bool]:
    """The key to use and whether it was given explicitly (argument or ``$ZMESH_CLUSTER_KEY_FILE``).

    With neither, the per-user default key, created on first use.
    """
    explicit = path if path is not None else os.environ.get(KEY_ENV) or None
    if explicit is not None:
        return ClusterKey.load(explicit), True
    target = default_key_path()
    try:
        return ClusterKey.load(target), False
    except ClusterKeyError:
        if target.exists():
            raise
    try:
        ClusterKey.generate().save(target, make_parents=True)
    except FileExistsError:
        pass  # another process made it first
    return ClusterKey.load(target), False


DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**30  # per frame; large arguments travel as frames of their own
MAX_MESSAGE_ENV = "ZMESH_MAX_MESSAGE_BYTES"


def max_message_bytes() -> int:
    text = os.environ.get(MAX_MESSAGE_ENV)
    return int(text) if text else DEFAULT_MAX_MESSAGE_BYTES


@dataclasses.dataclass(frozen=True)
class Security:
    """How one process's sockets are secured: with a cluster key, or (for measuring) not at all."""

    key: ClusterKey | None
    max_message_bytes: int = dataclasses.field(default_factory=max_message_bytes)

    @property
    def insecure(self) -> bool:
        return self.key is None

    def server(self, sock: zmq.Socket[Any]) -> None:
        if self.key is not None:
            sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.key.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.key.secret)

    def client(self, sock: zmq.Socket[Any]) -> None:
        if self.key is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.key.public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.key.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.key.secret)

    def spawn_env(self) -> dict[str, Any]:
        """What a forked worker needs to secure its sockets; sent only over the zygote's private pipe."""
        env: dict[str, Any] = {"max_message_bytes": self.max_message_bytes}
        if self.key is not None:
            env.update(public=self.key.public.decode(), secret=self.key.secret.decode())
        return env

    @classmethod
    def from_spawn_env(cls, env: dict[str, Any]) -> Security:
        key = ClusterKey(env["public"].encode(), env["secret"].encode()) if "public" in env else None
        return cls(key, int(env["max_message_bytes"]))


# Monitor events of a client whose handshake a server ended: the peer is there but will not talk to us.
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH


def handshake_refusal(event: int, key: ClusterKey | None) -> str:
    """Why a server ended our handshake, for the user: the key is named by its fingerprint, never shown.

    With CURVE, a server that holds another key cannot even read our hello and just hangs up
    (no detail): the likely cause is the key, which is what the words say.
    """
    failed = "the CurveZMQ handshake failed"
    if key is None:
        return f"{failed}: it requires CurveZMQ and this process connects without ($ZMESH_INSECURE=1, or an --insecure node's record)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"{failed}: it does not speak CurveZMQ (it runs --insecure, or is not a zmesh node)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        why = f"it does not accept the cluster key this process used (fingerprint {key.fingerprint})"
    else:
        why = f"it holds another cluster key than the one this process used (fingerprint {key.fingerprint}), or runs --insecure"
    return f"{failed}: {why}; give the cluster's key file (cluster_key=, --cluster-key or ${KEY_ENV})"


class ZapHandler:
    """Answers the ZAP requests of one ZeroMQ context: only CURVE clients holding the cluster key get in.

    The owner polls ``socket`` and calls ``handle`` when it is readable.
    """

    def __init__(self, ctx: zmq.Context[Any], security: Security) -> None:
        self.security = security
        self.socket: zmq.Socket[Any] = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)
        self.refused = 0
        self._last_log: dict[str, float] = {}

    def handle(self) -> None:
        while int(self.socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            request = self.socket.recv_multipart()
            self.socket.send_multipart(self._answer(request))

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            return [b"1.0", b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        key = self.security.key
        ok = key is not None and mechanism == b"CURVE" and len(credentials) == 1 and z85.encode(credentials[0]) == key.public
        if ok:
            return [version, request_id, b"200", b"OK", b"peer", b""]
        self.refused += 1
        peer = address.decode(errors="replace")
        now = time.monotonic()
        if now - self._last_log.get(peer, -1e9) >= 60:
            self._last_log[peer] = now
            logger.warning("refused a connection from %s: it does not hold this cluster's key", peer)
        return [version, request_id, b"400", b"not a member of this cluster", b"", b""]

    def close(self) -> None:
        self.socket.close(linger=0)
