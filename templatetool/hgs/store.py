"""State of the HGS network service in SQL (SQLAlchemy Core; SQLite default, PostgreSQL by URL).

Tables (docs/formats/hgs-service.md): ``schema_version``, ``settings``, ``hosts`` (host keys and
TPM EKs, public only), ``pcr_baselines``, ``ci_policies``, ``nonces`` (server nonces, single
use), ``tpm_challenges`` (MakeCredential rounds), ``health_certificates`` (issued, by fingerprint),
``vm_states`` (the vTPM state ledger: the latest state of each VM, hgs/ledger.py) and ``audit``
(every attestation, key release and state report, granted or refused). Private keys never enter the database: they stay in the
guardian folder's files (0600).
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import FormatError, IntegrityError, PolicyError, ResourceError, UsageError
from .attest import DEFAULT_HOURS, MAX_HOURS, AttestationPolicy
from .ledger import STATE_CODE

_T = TypeVar("_T")

SCHEMA_VERSION = 2
#: Older schema versions this code upgrades in place (version 1 had no ``vm_states``).
UPGRADABLE = (1,)
#: A server nonce is valid this long after Getinfo handed it out.
NONCE_SECONDS = 300
DB_FILE = "hgs-state.sqlite"


def _sa() -> Any:
    try:
        import sqlalchemy
    except ImportError:
        raise ResourceError("the HGS service needs SQLAlchemy", hint="pip install 'templatetool[hgs]'") from None
    return sqlalchemy


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0)


def _iso(t: _dt.datetime) -> str:
    return t.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _metadata(sa: Any) -> Any:
    md = sa.MetaData()
    S, Int, T = sa.String, sa.Integer, sa.Text
    sa.Table("schema_version", md, sa.Column("version", Int, nullable=False))
    sa.Table("settings", md, sa.Column("name", S(64), primary_key=True), sa.Column("value", T, nullable=False))
    sa.Table(
        "hosts",
        md,
        sa.Column("name", S(64), primary_key=True),
        sa.Column("mode", S(16), nullable=False),  # host-key | tpm
        sa.Column("public_key_pem", T, nullable=False),  # host key, or the TPM EK public key
        sa.Column("registered", S(20), nullable=False),
    )
    sa.Table(
        "pcr_baselines",
        md,
        sa.Column("bank", S(16), primary_key=True),
        sa.Column("pcr", Int, primary_key=True),
        sa.Column("digest_hex", S(128), nullable=False),
    )
    sa.Table("ci_policies", md, sa.Column("digest_hex", S(128), primary_key=True))
    sa.Table(
        "nonces",
        md,
        sa.Column("nonce", S(64), primary_key=True),
        sa.Column("issued", S(20), nullable=False),
        sa.Column("expires", S(20), nullable=False),
        sa.Column("used", S(20), nullable=True),
    )
    sa.Table(
        "tpm_challenges",
        md,
        sa.Column("nonce", S(64), primary_key=True),
        sa.Column("ak_name", S(140), nullable=False),  # hex TPM Name of the AK
        sa.Column("credential_sha256", S(64), nullable=False),  # never the credential itself
        sa.Column("evidence_sha256", S(64), nullable=False),  # round 2 must send the same evidence
        sa.Column("expires", S(20), nullable=False),
    )
    sa.Table(
        "health_certificates",
        md,
        sa.Column("fingerprint", S(64), primary_key=True),
        sa.Column("host", S(64), nullable=False),
        sa.Column("issued", S(20), nullable=False),
        sa.Column("expires", S(20), nullable=False),
    )
    sa.Table(
        "vm_states",
        md,
        sa.Column("vm", S(64), primary_key=True),  # ledger.vm_id: SHA-256 over K, never K
        sa.Column("state_sha256", S(64), nullable=False),  # the latest reported vTPM state
        sa.Column("generation", Int, nullable=False),  # reports accepted so far
        sa.Column("updated", S(20), nullable=False),
        sa.Column("host", S(64), nullable=True),  # the host that reported it
    )
    sa.Table(
        "audit",
        md,
        sa.Column("id", Int, primary_key=True, autoincrement=True),
        sa.Column("at", S(20), nullable=False),
        sa.Column("node", S(64), nullable=False),
        sa.Column("event", S(16), nullable=False),  # attest | release | vtpm-state
        sa.Column("outcome", S(16), nullable=False),  # granted | refused
        sa.Column("host", S(64), nullable=True),
        sa.Column("health_certificate", S(64), nullable=True),
        sa.Column("key_protector", S(64), nullable=True),  # SHA-256 of the ingress KP
        sa.Column("detail", T, nullable=False),
    )
    return md


def default_url(guardian_dir: str | os.PathLike[str]) -> str:
    """The SQLite database inside the guardian folder."""
    return f"sqlite:///{Path(guardian_dir).resolve() / DB_FILE}"


class Store:
    """The service's state store. Every method is one transaction; safe for several processes."""

    def __init__(self, url: str, node: str = "hgs") -> None:
        sa = _sa()
        self._sa = sa
        self.node = node
        self.url = url
        try:
            if url.startswith("sqlite"):
                self.engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

                def _wal(dbapi_conn: Any, _rec: Any) -> None:  # readers do not block the writer; still fsynced
                    cur = dbapi_conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA synchronous=FULL")
                    cur.close()

                sa.event.listen(self.engine, "connect", _wal)
            else:
                self.engine = sa.create_engine(url, pool_pre_ping=True)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError, ValueError) as e:
            raise UsageError(
                f"unusable database URL: {type(e).__name__}",
                hint="e.g. sqlite:///path or postgresql+psycopg://user@host/db",
            ) from None
        self.md = _metadata(sa)
        self.t = self.md.tables

    # -- schema ---------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Create the schema (version 2), upgrade a version 1 one in place (adds ``vm_states``), or
        check an existing one; returns the schema version."""
        sa = self._sa
        try:
            with self.engine.begin() as c:
                self._serialize(c)
                self.md.create_all(c, checkfirst=True)
                rows = c.execute(sa.select(self.t["schema_version"].c.version)).scalars().all()
                if not rows:
                    c.execute(self.t["schema_version"].insert().values(version=SCHEMA_VERSION))
                    return SCHEMA_VERSION
                if len(rows) == 1 and rows[0] in UPGRADABLE:  # create_all above added the new tables
                    c.execute(self.t["schema_version"].update().values(version=SCHEMA_VERSION))
                    return SCHEMA_VERSION
                if len(rows) != 1 or rows[0] != SCHEMA_VERSION:
                    raise FormatError(
                        f"HGS database schema version {rows} is not {SCHEMA_VERSION}",
                        self._where(),
                        "use a database made by this templatetool version",
                    )
                return int(rows[0])
        except sa.exc.SQLAlchemyError as e:
            raise ResourceError(f"cannot open the HGS database: {type(e).__name__}", self._where()) from None

    def _serialize(self, c: Any) -> None:
        """Serialize schema and policy writers across nodes (PostgreSQL advisory lock; SQLite
        serializes writers itself)."""
        if self.engine.dialect.name == "postgresql":
            c.execute(self._sa.text("SELECT pg_advisory_xact_lock(716007)"))

    def _where(self) -> str:
        return str(self.engine.url.render_as_string(hide_password=True))

    def _tx(self) -> Any:
        return self.engine.begin()

    def _run(self, fn: Callable[[Any], _T]) -> _T:
        sa = self._sa
        try:
            with self._tx() as c:
                return fn(c)
        except sa.exc.SQLAlchemyError as e:
            raise ResourceError(f"HGS database error: {type(e).__name__}", self._where()) from None

    # -- policy ---------------------------------------------------------------------------------
    def import_policy(self, pol: AttestationPolicy) -> None:
        """Make the store's policy that of a guardian folder's ``attestation.json`` (one transaction).

        Hosts, PCR baseline and CI policies are replaced, so a host removed from the folder is no
        longer trusted once the service restarts; registration times of kept hosts are kept.
        """
        t, sa = self.t, self._sa

        def fn(c: Any) -> None:
            self._serialize(c)
            now = _iso(_now())
            h = t["hosts"]
            old = {r["name"]: r for r in c.execute(sa.select(h)).mappings()}
            c.execute(h.delete())
            for mode, hosts in (("host-key", pol.host_keys), ("tpm", pol.tpm_hosts)):
                for name, pem in hosts.items():
                    o = old.get(name)
                    kept = o is not None and o["mode"] == mode and o["public_key_pem"] == pem
                    c.execute(
                        h.insert().values(
                            name=name,
                            mode=mode,
                            public_key_pem=pem,
                            registered=o["registered"] if kept and o is not None else now,
                        )
                    )
            c.execute(t["pcr_baselines"].delete())
            for pcr, v in sorted(pol.pcr_baseline.items()):
                c.execute(t["pcr_baselines"].insert().values(bank=pol.pcr_bank, pcr=pcr, digest_hex=v.lower()))
            c.execute(t["ci_policies"].delete())
            for d in sorted(set(pol.ci_policies)):
                c.execute(t["ci_policies"].insert().values(digest_hex=d))
            c.execute(t["settings"].delete().where(t["settings"].c.name == "health_hours"))
            c.execute(t["settings"].insert().values(name="health_hours", value=str(pol.health_hours)))

        self._run(fn)

    def policy(self) -> AttestationPolicy:
        """The attestation policy as stored now (what every node attests against)."""
        t, sa = self.t, self._sa

        def fn(c: Any) -> AttestationPolicy:
            pol = AttestationPolicy()
            for r in c.execute(sa.select(t["hosts"])).mappings():
                (pol.host_keys if r["mode"] == "host-key" else pol.tpm_hosts)[r["name"]] = r["public_key_pem"]
            rows = c.execute(sa.select(t["pcr_baselines"])).mappings().all()
            if rows:
                pol.pcr_bank = rows[0]["bank"]
                pol.pcr_baseline = {int(r["pcr"]): r["digest_hex"] for r in rows if r["bank"] == pol.pcr_bank}
            pol.ci_policies = sorted(c.execute(sa.select(t["ci_policies"].c.digest_hex)).scalars())
            h = c.execute(sa.select(t["settings"].c.value).where(t["settings"].c.name == "health_hours")).scalar()
            hours = int(h) if h is not None else DEFAULT_HOURS
            pol.health_hours = hours if 1 <= hours <= MAX_HOURS else DEFAULT_HOURS
            return pol

        return self._run(fn)

    # -- nonces ---------------------------------------------------------------------------------
    def new_nonce(self, seconds: int = NONCE_SECONDS) -> tuple[str, _dt.datetime]:
        """A fresh single-use server nonce (base64url text) and its expiry."""
        n = secrets.token_urlsafe(32)
        now = _now()
        exp = now + _dt.timedelta(seconds=seconds)
        self._run(lambda c: c.execute(self.t["nonces"].insert().values(nonce=n, issued=_iso(now), expires=_iso(exp))))
        return n, exp

    def consume_nonce(self, nonce: str) -> None:
        """Mark a nonce used; PolicyError when it is unknown, expired or already used (a replay).

        One conditional UPDATE, so two nodes sharing the database cannot both accept it.
        """
        t, sa = self.t["nonces"], self._sa
        now = _iso(_now())

        def fn(c: Any) -> int:
            r = c.execute(
                t.update().where(sa.and_(t.c.nonce == nonce, t.c.used.is_(None), t.c.expires > now)).values(used=now)
            )
            # purge nonces long expired (bounded table)
            c.execute(t.delete().where(t.c.expires < _iso(_now() - _dt.timedelta(days=1))))
            return int(r.rowcount)

        if not isinstance(nonce, str) or len(nonce) > 64 or self._run(fn) != 1:
            raise PolicyError(
                "server nonce is unknown, expired or already used",
                "evidence nonce",
                "get a fresh nonce from GET /Attestation/Getinfo and attest once with it",
            )

    # -- TPM challenges (MakeCredential rounds) -----------------------------------------------------
    def open_nonce(self, nonce: str) -> None:
        """PolicyError unless ``nonce`` was issued, is unexpired and unused (it stays unused)."""
        t, sa = self.t["nonces"], self._sa
        now = _iso(_now())
        ok = (
            isinstance(nonce, str)
            and len(nonce) <= 64
            and self._run(
                lambda c: c.execute(
                    sa.select(t.c.nonce).where(sa.and_(t.c.nonce == nonce, t.c.used.is_(None), t.c.expires > now))
                ).first()
            )
        )
        if not ok:
            raise PolicyError(
                "server nonce is unknown, expired or already used",
                "evidence nonce",
                "get a fresh nonce from GET /Attestation/Getinfo and attest once with it",
            )

    def put_challenge(
        self, nonce: str, ak_name: bytes, credential_sha256: str, evidence_sha256: str, expires: _dt.datetime
    ) -> None:
        """Remember the credential challenge of an attestation round (one per nonce)."""
        t = self.t["tpm_challenges"]

        def fn(c: Any) -> None:
            c.execute(t.delete().where(t.c.nonce == nonce))
            c.execute(
                t.insert().values(
                    nonce=nonce,
                    ak_name=ak_name.hex(),
                    credential_sha256=credential_sha256,
                    evidence_sha256=evidence_sha256,
                    expires=_iso(expires),
                )
            )
            c.execute(t.delete().where(t.c.expires < _iso(_now() - _dt.timedelta(days=1))))

        self._run(fn)

    def take_challenge(self, nonce: str) -> tuple[bytes, str, str] | None:
        """(AK Name, credential SHA-256 hex, evidence SHA-256 hex) of an unexpired challenge, deleted as read."""
        t, sa = self.t["tpm_challenges"], self._sa
        now = _iso(_now())

        def fn(c: Any) -> tuple[bytes, str, str] | None:
            r = c.execute(sa.select(t).where(sa.and_(t.c.nonce == nonce, t.c.expires > now))).mappings().first()
            c.execute(t.delete().where(t.c.nonce == nonce))
            return (bytes.fromhex(r["ak_name"]), r["credential_sha256"], r["evidence_sha256"]) if r else None

        return self._run(fn)

    # -- records --------------------------------------------------------------------------------
    def record_health_certificate(
        self, fingerprint: str, host: str, issued: _dt.datetime, expires: _dt.datetime
    ) -> None:
        """Remember an issued health certificate."""
        self._run(
            lambda c: c.execute(
                self.t["health_certificates"]
                .insert()
                .values(fingerprint=fingerprint, host=host[:64], issued=_iso(issued), expires=_iso(expires))
            )
        )

    def record_attestation(
        self, fingerprint: str, host: str, issued: _dt.datetime, expires: _dt.datetime, detail: str
    ) -> None:
        """Record an issued health certificate and its granted-attestation audit row in one transaction
        (a certificate the KPS honours always has its audit record)."""

        def fn(c: Any) -> None:
            c.execute(
                self.t["health_certificates"]
                .insert()
                .values(fingerprint=fingerprint, host=host[:64], issued=_iso(issued), expires=_iso(expires))
            )
            c.execute(
                self.t["audit"]
                .insert()
                .values(
                    at=_iso(_now()),
                    node=self.node[:64],
                    event="attest",
                    outcome="granted",
                    host=host[:64] or None,
                    health_certificate=fingerprint,
                    key_protector=None,
                    detail=detail[:2000],
                )
            )

        self._run(fn)

    def health_certificate_host(self, fingerprint: str) -> str | None:
        """The host a health certificate was issued to by any node, or None."""
        t, sa = self.t["health_certificates"], self._sa
        host = self._run(lambda c: c.execute(sa.select(t.c.host).where(t.c.fingerprint == fingerprint)).scalar())
        return None if host is None else str(host)

    # -- the vTPM state ledger (hgs/ledger.py) -----------------------------------------------------
    def vm_state(self, vm: str) -> tuple[str, int] | None:
        """(latest state SHA-256, generation) the ledger holds for ``vm``, or None before its first report."""
        t, sa = self.t["vm_states"], self._sa
        r = self._run(lambda c: c.execute(sa.select(t.c.state_sha256, t.c.generation).where(t.c.vm == vm)).first())
        return None if r is None else (str(r[0]), int(r[1]))

    def advance_vm_state(self, vm: str, previous: str, current: str, initial: str, host: str | None) -> int:
        """Compare-and-swap the ledger from ``previous`` to ``current``; returns the new generation.

        ``previous`` must be the latest state (or, before any report, ``initial``: the state shield
        wrote). A report already applied (latest == ``current``) is accepted again unchanged, so a
        host may resend one it is not sure arrived. Anything else is a fork or a replay:
        IntegrityError (code ``hgs.vtpm-state``), nothing changes.
        """
        t, sa = self.t["vm_states"], self._sa
        now = _iso(_now())

        def fn(c: Any) -> int | None:
            row = c.execute(sa.select(t.c.state_sha256, t.c.generation).where(t.c.vm == vm)).first()
            if row is None:
                if previous != initial:
                    return None
                c.execute(t.insert().values(vm=vm, state_sha256=current, generation=1, updated=now, host=host))
                return 1
            latest, gen = str(row[0]), int(row[1])
            if latest == current:
                return gen
            if latest != previous:
                return None
            r = c.execute(
                t.update()
                .where(sa.and_(t.c.vm == vm, t.c.state_sha256 == previous))
                .values(state_sha256=current, generation=gen + 1, updated=now, host=host)
            )
            return gen + 1 if r.rowcount == 1 else None

        try:
            gen = self._run(fn)
        except ResourceError:
            # two nodes inserting the first report of one VM at once: the primary key lets one win
            gen = None if self.vm_state(vm) is not None else self._run(fn)
        if gen is None:
            raise IntegrityError(
                "vTPM state report refused: its previous state is not the latest the fabric recorded (a fork or a replay)",
                "vTPM state ledger",
                code=STATE_CODE,
            )
        return gen

    def audit(
        self,
        event: str,
        outcome: str,
        detail: str,
        *,
        host: str | None = None,
        health_certificate: str | None = None,
        key_protector: str | None = None,
    ) -> None:
        """Append an audit record (never any key material)."""
        self._run(
            lambda c: c.execute(
                self.t["audit"]
                .insert()
                .values(
                    at=_iso(_now()),
                    node=self.node[:64],
                    event=event,
                    outcome=outcome,
                    host=(host or None) and host[:64],
                    health_certificate=health_certificate,
                    key_protector=key_protector,
                    detail=detail[:2000],
                )
            )
        )

    def audit_log(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest audit records, oldest first."""
        t, sa = self.t["audit"], self._sa
        rows = self._run(
            lambda c: [dict(r) for r in c.execute(sa.select(t).order_by(t.c.id.desc()).limit(limit)).mappings()]
        )
        return rows[::-1]

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()


__all__ = ["DB_FILE", "NONCE_SECONDS", "SCHEMA_VERSION", "UPGRADABLE", "Store", "default_url"]
