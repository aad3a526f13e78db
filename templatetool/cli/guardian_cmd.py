"""``templatetool guardian``: new, import, export, show."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from ..atomic import write_bytes_atomic
from ..secrets import read_secret
from .common import emit, guardian_password, json_option, read_small_file, stderr
from .policy import KEY_FOLDER, OUTPUT_FILE, current_plan

password_env_option = click.option(
    "--password-env", metavar="VAR", help="Environment variable holding the guardian's PFX password."
)
trust_option = click.option(
    "--trust",
    "trust",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Trusted root/CA certificate (PEM or DER); repeatable.",
)
allow_expired_option = click.option("--allow-expired", is_flag=True, help="Accept expired certificates.")
allow_untrusted_option = click.option(
    "--allow-untrusted-root", is_flag=True, help="Accept certificates chaining to an untrusted (e.g. self-signed) root."
)


def read_input(path: str, what: str, limit: int = 64 << 20) -> bytes:
    """Read a whole (small) input file with clean errors."""
    return read_small_file(path, what, limit)


def load_trust(paths: tuple[str, ...]) -> list[x509.Certificate]:
    """Certificates from --trust files."""
    from ..signers import load_certificates

    out: list[x509.Certificate] = []
    for p in paths:
        out.extend(load_certificates(p))
    return out


def _guardian_text(d: dict[str, Any]) -> str:
    lines = [f"guardian {d['name']} ({d['source']}, {'with' if d['has_private_keys'] else 'no'} private keys)"]
    for role in ("signing", "encryption"):
        c = d[f"{role}_certificate"]
        lines.append(
            f"  {role:10} {c['subject']}  {c['key']}  valid {c['not_before'][:10]}..{c['not_after'][:10]}"
            f"  sha1 {c['sha1']}"
        )
    return "\n".join(lines)


@click.group("guardian")
def guardian_group() -> None:
    """Guardians (owner or fabric): certificate pairs and HGS guardian metadata XML."""


@guardian_group.command("new")
@click.argument("name")
@click.option("-o", "--output", "out", required=True, type=KEY_FOLDER, help="Guardian folder to create.")
@click.option(
    "--key",
    "key",
    default="rsa3072",
    show_default=True,
    type=click.Choice(["rsa3072", "rsa2048", "rsa4096", "ec-p256", "ec-p384"]),
    help="Key kind for both certificates.",
)
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1, 36500), help="Validity in days.")
@password_env_option
@click.option("--no-password", is_flag=True, help="Store the private keys unencrypted (not recommended).")
@json_option
def guardian_new(
    name: str, out: str, key: str, days: int, password_env: str | None, no_password: bool, as_json: bool
) -> None:
    """Generate a guardian with self-signed signing and encryption certificates (like
    New-HgsGuardian -GenerateCertificates). Keys go to PFX files (0600) protected by the password
    from --password-env (or a prompt)."""
    from .. import api
    from ..errors import UsageError

    if no_password and password_env:
        raise UsageError("--no-password and --password-env exclude each other")
    plan = current_plan()
    force = bool(plan and plan.force_replace_keys)
    if (Path(out) / "guardian.json").exists() and not force:
        raise UsageError("a guardian already exists in this folder", out, "choose another folder")
    password = None if no_password else read_secret(password_env, "new guardian password: ", confirm=True)
    res = api.new_guardian(name, out, password=password, key=key, days=days, overwrite=force)
    if no_password:
        stderr("templatetool: warning: the guardian's private keys are stored unencrypted; protect the folder")
    emit(res.to_json(), as_json, lambda d: _guardian_text(d) + f"\n  saved in {out}")


@guardian_group.command("import")
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=KEY_FOLDER, help="Guardian folder to create.")
@click.option("--name", help="Guardian name (default: the file name without extension).")
@allow_untrusted_option
@allow_expired_option
@trust_option
@json_option
def guardian_import(
    metadata: str,
    out: str,
    name: str | None,
    allow_untrusted_root: bool,
    allow_expired: bool,
    trust: tuple[str, ...],
    as_json: bool,
) -> None:
    """Import HGS guardian metadata XML ([MS-KPS] §6.4) after verifying its XML signature and
    certificate signatures (like Import-HgsGuardian)."""
    from ..errors import UsageError
    from ..guardian import import_metadata, save_guardian

    plan = current_plan()
    force = bool(plan and plan.force_replace_keys)
    if (Path(out) / "guardian.json").exists() and not force:
        raise UsageError("a guardian already exists in this folder", out, "choose another folder")
    data = read_input(metadata, "guardian metadata", 4 << 20)
    g = import_metadata(
        data,
        name or Path(metadata).stem,
        metadata,
        allow_untrusted_root=allow_untrusted_root,
        allow_expired=allow_expired,
        trust=load_trust(trust),
    )
    save_guardian(g, out, None, overwrite=force)
    emit({**g.to_json(), "output": out}, as_json, lambda d: _guardian_text(d) + f"\n  imported into {out}")


@guardian_group.command("export")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("-o", "--output", "out", required=True, type=OUTPUT_FILE, help="Metadata XML to write.")
@click.option(
    "--signer",
    help="Signer of the XML signature: FILE.pfx | pem:KEY,CERT | pkcs11:URI (default: the guardian's own signing key).",
)
@click.option("--signer-password-env", metavar="VAR", help="Environment variable with the signer's password.")
@click.option("--pin-env", metavar="VAR", help="Environment variable with the PKCS#11 PIN.")
@password_env_option
@json_option
def guardian_export(
    folder: str,
    out: str,
    signer: str | None,
    signer_password_env: str | None,
    pin_env: str | None,
    password_env: str | None,
    as_json: bool,
) -> None:
    """Export a guardian we hold the keys of as signed HGS metadata XML."""
    from ..guardian import export_metadata, load_guardian

    g = load_guardian(folder, private=True, password=guardian_password(folder, password_env))
    if signer:
        from .signer_opts import open_signer

        s = open_signer(signer, signer_password_env, pin_env)
        cert = s.certificate
        xml = export_metadata(g, s)
    else:
        cert = g.signing_certificate
        assert g.signing_key is not None  # load_guardian(private=True) loaded it
        xml = export_metadata(g, g.signing_key, cert)
    write_bytes_atomic(out, xml)
    emit(
        {"guardian": g.name, "output": out, "signer": cert.subject.rfc4514_string(), "size": len(xml)},
        as_json,
        f"wrote {out} (signed by {cert.subject.rfc4514_string()})",
    )


@guardian_group.command("show")
@click.argument("path", type=click.Path())
@allow_expired_option
@json_option
def guardian_show(path: str, allow_expired: bool, as_json: bool) -> None:
    """Show a guardian folder, or verify and show guardian metadata XML."""
    from ..guardian import import_metadata, load_guardian

    if os.path.isfile(path) and path.lower().endswith(".xml"):
        data = read_input(path, "guardian metadata", 4 << 20)
        g = import_metadata(data, Path(path).stem, path, allow_untrusted_root=True, allow_expired=allow_expired)
        d = {**g.to_json(), "source": "metadata", "xml_signature": "verified (root not checked: use guardian import)"}
    else:
        g = load_guardian(path)
        d = g.to_json()
        try:
            import json as _json

            meta = _json.loads((Path(g.path or path) / "guardian.json").read_text())
            d["has_private_keys"] = bool(meta.get("signing_pfx"))
            d["pfx_encrypted"] = meta.get("pfx_encrypted")
        except (OSError, ValueError):
            pass
    emit(d, as_json, _guardian_text)


def register(cli: click.Group) -> None:
    """Add the guardian group to the CLI."""
    cli.add_command(guardian_group)
