"""Start and stop the CNCF distribution registry (Debian ``docker-registry``) for tests, demo, bench.

The registry runs as a child process on a free loopback port, with filesystem storage in a
directory this helper owns (a temporary one unless given), optionally behind htpasswd basic
auth. ``stop()`` terminates it and waits, so nothing outlives the ``with`` block. The process
can run inside a network namespace (``wrap=["ip", "netns", "exec", NS]``, ``host=<ns address>``)
so that benchmarks can throttle the link with tc.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from tidal import proc
from tidal.errors import RegistryServerError

REGISTRY_BINARY = "docker-registry"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
NAMESPACE_PORT = 5000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the registry binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd entry (the only hash the registry accepts), made with ``htpasswd``.

    The password goes through stdin, never the command line where ``ps`` would show it.
    """
    done = proc.run(
        ["htpasswd", "-niB", user],
        input=password + "\n",
        what=f"making an htpasswd entry for user {user!r}",
        error=RegistryServerError,
        install_hint="apt-get install apache2-utils; make deps does",
    )
    return str(done.stdout).strip()


@dataclass(frozen=True)
class TokenAuth:
    """Bearer-token auth: the registry trusts JWTs from ``issuer`` signed under ``root_cert``."""

    realm: str
    service: str
    issuer: str
    root_cert: Path


_ACCESS_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')
"""A request in the registry's access log (Apache combined format)."""


class RegistryServer:
    """A CNCF registry child process; use as a context manager.

    ``url`` is ``http://HOST:PORT``; ``address`` is ``HOST:PORT`` (what references use).
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        users: dict[str, str] | None = None,
        tls: bool = False,
        token_auth: TokenAuth | None = None,
        wrap: Sequence[str] = (),
        binary: str = REGISTRY_BINARY,
        access_log: bool = False,
    ) -> None:
        self.access_log = access_log
        """Log every request (read back with :meth:`requests`): tests count blob transfers."""
        self.host = host
        self.port = port
        self._users = dict(users or {})
        self.tls = tls
        self.token_auth = token_auth
        self._wrap = list(wrap)
        self._binary = binary
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._given_storage = Path(storage_dir) if storage_dir is not None else None
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: object | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    @property
    def ca_file(self) -> Path:
        """The self-signed certificate a TLS registry serves (trust it as a CA)."""
        if self.workdir is None or not self.tls:
            raise RegistryServerError("only a started TLS registry has a certificate")
        return self.workdir / "cert.pem"

    def _make_certificate(self) -> None:
        """A one-day self-signed certificate for ``host`` (IP or name), made with openssl."""
        assert self.workdir is not None
        try:
            ipaddress.ip_address(self.host)
            san = f"IP:{self.host}"
        except ValueError:
            san = f"DNS:{self.host}"
        proc.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=tidal-test-registry", "-addext", f"subjectAltName={san}",
             "-keyout", str(self.workdir / "key.pem"), "-out", str(self.workdir / "cert.pem")],
            what=f"making a self-signed certificate for {self.host}",
            error=RegistryServerError,
            install_hint="apt-get install openssl",
        )  # fmt: skip

    @property
    def storage_dir(self) -> Path:
        if self._given_storage is not None:
            return self._given_storage
        if self.workdir is None:
            raise RegistryServerError("the registry has not been started")
        return self.workdir / "storage"

    @property
    def log_path(self) -> Path:
        if self.workdir is None:
            raise RegistryServerError("the registry has not been started")
        return self.workdir / "registry.log"

    def _config(self) -> dict[str, object]:
        assert self.workdir is not None
        cfg: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": not self.access_log}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.address, "secret": os.urandom(16).hex()},
        }
        if self.tls:
            cfg["http"]["tls"] = {  # type: ignore[index]
                "certificate": str(self.workdir / "cert.pem"),
                "key": str(self.workdir / "key.pem"),
            }
        if self.token_auth is not None:
            t = self.token_auth
            cfg["auth"] = {
                "token": {
                    "realm": t.realm,
                    "service": t.service,
                    "issuer": t.issuer,
                    "rootcertbundle": str(t.root_cert),
                }
            }
        elif self._users:
            htp = self.workdir / "htpasswd"
            htp.write_text("".join(htpasswd_line(u, p) + "\n" for u, p in self._users.items()))
            cfg["auth"] = {"htpasswd": {"realm": "tidal-registry", "path": str(htp)}}
        return cfg

    def start(self) -> RegistryServer:
        exe = shutil.which(self._binary)
        if exe is None:
            raise RegistryServerError(
                f"{self._binary} not found; install the Debian package docker-registry"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="tidal-registry-")
        self.workdir = Path(self._tmp.name)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            try:
                self._make_certificate()
            except BaseException:
                self._cleanup_dir()
                raise
        given_port = self.port
        if given_port is None and self._wrap:
            given_port = NAMESPACE_PORT  # a namespace of its own: nothing else listens there
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = given_port if given_port is not None else free_port(self.host)
            if not self._wrap and not _port_is_free(self.host, self.port):
                # Otherwise the readiness probe would be answered by whoever holds the port.
                last_error = f"port {self.port} on {self.host} is already in use"
                if given_port is not None:
                    break
                continue
            cfg_path = self.workdir / "config.yml"
            cfg_path.write_text(yaml.safe_dump(self._config()))
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            log = self.log_path.open("ab")
            self._log_fh = log
            # The registry serves until stopped: a spawned child, not a run to completion.
            self._proc = proc.spawn(
                [*self._wrap, exe, "serve", str(cfg_path)],
                what=f"starting the registry on {self.address}",
                error=RegistryServerError,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            try:
                self._wait_ready()
                return self
            except RegistryServerError as exc:
                last_error = str(exc)
                self._terminate()
                if given_port is not None:
                    break
        self._cleanup_dir()
        raise RegistryServerError(last_error)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        verify: bool | ssl.SSLContext = (
            ssl.create_default_context(cafile=str(self.ca_file)) if self.tls else True
        )
        with httpx.Client(timeout=1.0, verify=verify) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RegistryServerError(
                        f"registry on {self.address} exited with status {self._proc.returncode}: "
                        f"{self._log_tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    r = client.get(f"{self.url}/v2/")
                    if r.status_code in (200, 401) and self._proc.poll() is None:
                        return
                time.sleep(0.05)
        raise RegistryServerError(
            f"registry on {self.address} did not answer within {START_TIMEOUT_S:.0f} s: "
            f"{self._log_tail()}"
        )

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request so far, from the access log (needs
        ``access_log=True``): the registry's own count of what clients sent and fetched."""
        if not self.access_log:
            raise RegistryServerError("start the registry with access_log=True to count requests")
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = _ACCESS_RE.search(line)
            if m:
                found.append((m["method"], m["path"], int(m["status"])))
        return found

    def blob_uploads(self) -> int:
        """Blob uploads completed (the final ``PUT .../blobs/uploads/...?digest=``)."""
        return sum(
            1 for m, p, st in self.requests() if m == "PUT" and "/blobs/uploads/" in p and st == 201
        )

    def blob_fetches(self, digest: str | None = None) -> int:
        """``GET .../blobs/<digest>`` answered with data (ranges included)."""
        return sum(
            1
            for m, p, st in self.requests()
            if m == "GET"
            and "/blobs/sha256:" in p
            and st in (200, 206)
            and (digest is None or p.endswith(digest.split(":")[-1]))
        )

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty log)"

    def _terminate(self) -> None:
        child, self._proc = self._proc, None
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        elif child is not None:
            child.wait()
        fh, self._log_fh = self._log_fh, None
        if fh is not None:
            fh.close()  # type: ignore[attr-defined]

    def _cleanup_dir(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def stop(self) -> None:
        """Terminate the registry and remove its temporary files (idempotent)."""
        try:
            self._terminate()
        finally:
            self._cleanup_dir()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
