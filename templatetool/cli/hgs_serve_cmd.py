"""`templatetool hgs serve`: the Host Guardian Service as an HTTP service (docs/formats/hgs-service.md)."""

from __future__ import annotations

import socket
import sys

import click

from ..errors import ResourceError, UsageError
from .common import emit, json_option


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 = any free port); ResourceError when the address is unusable."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    fam, _t, _p, _c, addr = infos[0]
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ResourceError(f"cannot listen on {host}:{port}: {e.strerror}", hint="choose another --port") from None
    sock.set_inheritable(True)
    return sock


def _check_tls(cert: str, key: str) -> None:
    """Load the TLS pair now, so a bad file is one clear error line rather than a uvicorn traceback."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as e:
        from ..errors import FormatError

        raise FormatError(
            f"unusable TLS certificate or key: {e.__class__.__name__}",
            cert,
            "give a PEM certificate and its unencrypted PEM private key",
        ) from None


def register(cli: click.Group) -> None:
    hgs = cli.commands.get("hgs")
    if not isinstance(hgs, click.Group):  # hgs_cmd not loaded
        return

    @hgs.command("serve")
    @click.argument("guardian_dir", type=click.Path(file_okay=False, exists=True))
    @click.option(
        "--db",
        "db_url",
        metavar="URL",
        help="State database (SQLAlchemy URL; default: sqlite file "
        "hgs-state.sqlite in GUARDIAN_DIR; postgresql+psycopg://... for several nodes).",
    )
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
    @click.option(
        "--port",
        default=8080,
        show_default=True,
        type=click.IntRange(0, 65535),
        help="TCP port (0 = any free port, printed on start).",
    )
    @click.option("--node", default=None, help="Node name in the audit log (default HOST:PORT).")
    @click.option("--password-env", metavar="VAR", help="Environment variable with the guardian's PFX password.")
    @click.option("--access-log", is_flag=True, help="Log every request (paths and status only).")
    @click.option(
        "--tls-cert",
        type=click.Path(dir_okay=False, exists=True),
        help="Serve HTTPS with this PEM certificate (chain) ...",
    )
    @click.option(
        "--tls-key-file",
        type=click.Path(dir_okay=False, exists=True),
        help="... and this PEM private key file (unencrypted, 0600).",
    )
    def serve(
        guardian_dir: str,
        db_url: str | None,
        host: str,
        port: int,
        node: str | None,
        password_env: str | None,
        access_log: bool,
        tls_cert: str | None,
        tls_key_file: str | None,
    ) -> None:
        """Serve attestation ([MS-HGSA]) and key protection ([MS-KPS]) for GUARDIAN_DIR over HTTP.

        GUARDIAN_DIR needs `hgs init` and the guardian's private keys. Runs until interrupted.
        """
        try:
            import uvicorn
        except ImportError:
            raise ResourceError("`hgs serve` needs uvicorn", hint="pip install 'templatetool[hgs]'") from None
        from ..hgs.service import create_app, load_service_state

        if bool(tls_cert) != bool(tls_key_file):
            raise UsageError("give --tls-cert and --tls-key-file together")
        tls = bool(tls_cert and tls_key_file)
        if tls_cert and tls_key_file:
            _check_tls(tls_cert, tls_key_file)
        sock = bind_socket(host, port)
        actual = sock.getsockname()[1]
        state = load_service_state(guardian_dir, db_url, password_env=password_env, node=node or f"{host}:{actual}")
        app = create_app(state)
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=access_log,
            lifespan="off",
            ssl_certfile=tls_cert if tls else None,
            ssl_keyfile=tls_key_file if tls else None,
        )
        server = uvicorn.Server(config)
        click.echo(
            f"templatetool hgs: serving {guardian_dir} on {'https' if tls else 'http'}://{host}:{actual} "
            f"(state {state.store.engine.url.render_as_string(hide_password=True)})",
            err=True,
        )
        sys.stderr.flush()
        try:
            server.run(sockets=[sock])
        finally:
            state.store.close()
            sock.close()

    @hgs.command("audit")
    @click.argument("guardian_dir", type=click.Path(file_okay=False, exists=True))
    @click.option("--db", "db_url", metavar="URL", help="State database (default: GUARDIAN_DIR/hgs-state.sqlite).")
    @click.option(
        "--limit", default=100, show_default=True, type=click.IntRange(1, 1_000_000), help="Latest N records."
    )
    @json_option
    def audit(guardian_dir: str, db_url: str | None, limit: int, as_json: bool) -> None:
        """Show the service's audit log: every attestation and key release, granted or refused."""
        from pathlib import Path

        from ..errors import NotFoundError
        from ..hgs.store import DB_FILE, Store, default_url

        if db_url is None and not (Path(guardian_dir) / DB_FILE).exists():
            raise NotFoundError(
                "no service state in this guardian folder", guardian_dir, "run `hgs serve` first or give --db"
            )
        store = Store(db_url or default_url(guardian_dir))
        try:
            store.migrate()
            rows = store.audit_log(limit)
        finally:
            store.close()
        emit(
            {"records": rows},
            as_json,
            lambda r: (
                "\n".join(
                    f"{x['at']} {x['node']:<16} {x['event']:<7} {x['outcome']:<7} {x['host'] or '-':<20} {x['detail'][:80]}"
                    for x in r["records"]
                )
                or "(no records)"
            ),
        )
