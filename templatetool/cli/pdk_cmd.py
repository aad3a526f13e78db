"""``templatetool pdk`` (shielding data) and ``templatetool kp`` (key protectors)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from cryptography import x509

from ..atomic import write_bytes_atomic
from ..errors import NotFoundError, PolicyError, ResourceError, UsageError
from ..secrets import write_secret_file
from .common import emit, guardian_password, json_option, stderr
from .guardian_cmd import (
    allow_expired_option,
    allow_untrusted_option,
    load_trust,
    password_env_option,
    read_input,
    trust_option,
)
from .policy import OUTPUT_DIR, OUTPUT_FILE, current_plan

if TYPE_CHECKING:
    from ..cms import RecipientKey
    from ..guardian import Guardian


def _load_guardians(
    paths: tuple[str, ...], allow_untrusted_root: bool, trust: list[x509.Certificate]
) -> list[Guardian]:
    from ..guardian import load_guardian

    return [load_guardian(p, allow_untrusted_root=allow_untrusted_root, trust=trust) for p in paths]


def _recipient_key(spec: str, password_env: str | None) -> tuple[RecipientKey, x509.Certificate]:
    """(private key, certificate) from a guardian folder or a signer spec."""
    if os.path.isdir(spec):
        from ..guardian import load_guardian

        g = load_guardian(spec, private=True, password=guardian_password(spec, password_env))
        assert g.encryption_key is not None  # load_guardian(private=True) loaded it
        return g.encryption_key, g.encryption_certificate
    from ..errors import UnsupportedError
    from ..signers import KeySigner
    from .signer_opts import open_signer

    s = open_signer(spec, password_env)
    if not isinstance(s, KeySigner):
        raise UnsupportedError("a PKCS#11 key cannot decrypt here", spec, "use the guardian folder or its PFX")
    return s.private_key(), s.certificate


# ------------------------------------------------------------------------------------------------
# pdk
# ------------------------------------------------------------------------------------------------


@click.group("pdk")
def pdk_group() -> None:
    """Shielding data files (.pdk): owner-signed clear part + encrypted secrets for guardians."""


def _pdk_text(d: dict[str, Any]) -> str:
    lines = [
        f"PDK v{d['version']}  policy {d['policy']}  created {d['created']}",
        f"  owner     {d['owner']['name']}: {d['owner']['signing_certificate']['subject']}",
    ]
    for g in d["guardians"]:
        lines.append(f"  guardian  {g['name']}: {g['encryption_certificate']['subject']}")
    for q in d["volume_id_qualifiers"]:
        lines.append(f"  template  {q['name']} {q['rule']} {q['version']} signed by {q['signer_thumbprint']}")
    lines.append(f"  signature verified ({d['signature']['owner_trust']})")
    sp = d.get("secret")
    if sp:
        af = sp["answer_file"]
        lines.append(f"  answer file  {af['name']} ({af['size']} bytes)" if af else "  answer file  none")
        for f in sp["other_files"]:
            lines.append(f"  other file   {f['name']} ({f['size']} bytes)")
        for k, v in sp["specialization_values"].items():
            lines.append(f"  value        {k} = {v}")
    else:
        lines.append(f"  secret part  sealed to {len(d['secret_part']['recipients'])} recipients")
    return "\n".join(lines)


@pdk_group.command("new")
@click.option("-o", "--output", "out", required=True, type=OUTPUT_FILE, help="PDK file to write.")
@click.option("--owner", required=True, type=click.Path(), help="Owner guardian folder (with its keys).")
@click.option(
    "--guardian", "guardians", multiple=True, type=click.Path(), help="Guardian folder or HGS metadata XML; repeatable."
)
@click.option(
    "--vsc",
    "vscs",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Signed catalog (.vsc) or template disk to trust; repeatable.",
)
@click.option(
    "--version-rule",
    "rules",
    multiple=True,
    type=click.Choice(["eq", "ge", "gt"]),
    help="Version rule for the --vsc (once for all, or once per --vsc).",
)
@click.option("--answer-file", type=click.Path(dir_okay=False), help="Answer file (unattend.xml).")
@click.option(
    "--other-file",
    "other_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Other file to carry (total at most 384 KB); repeatable.",
)
@click.option(
    "--spec-value",
    "spec_values",
    multiple=True,
    metavar="@KEY@=VALUE",
    help="Specialization value, e.g. @ComputerName@=WEB01; repeatable.",
)
@click.option(
    "--policy",
    required=True,
    type=click.Choice(["shielded", "encryption-supported"]),
    help="Shielded (no console, no debugging) or encryption-supported.",
)
@password_env_option
@allow_expired_option
@allow_untrusted_option
@trust_option
@json_option
def pdk_new(
    out: str,
    owner: str,
    guardians: tuple[str, ...],
    vscs: tuple[str, ...],
    rules: tuple[str, ...],
    answer_file: str | None,
    other_files: tuple[str, ...],
    spec_values: tuple[str, ...],
    policy: str,
    password_env: str | None,
    allow_expired: bool,
    allow_untrusted_root: bool,
    trust: tuple[str, ...],
    as_json: bool,
) -> None:
    """Create a shielding data file signed by the owner (like New-ShieldingDataFile)."""
    from .. import api
    from ..pdk import OTHER_FILES_LIMIT, NamedFile, SecretPart

    if rules and len(rules) not in (1, len(vscs)):
        raise UsageError("give --version-rule once, or once per --vsc")
    if vscs and not rules:
        raise UsageError("--vsc needs --version-rule", hint="eq, ge or gt")
    trust_certs = load_trust(trust)
    # sizes first, so an oversized set fails before anything is read or decrypted
    sizes = []
    for f in other_files:
        try:
            sizes.append(os.path.getsize(f))
        except OSError:
            raise NotFoundError("other file not found", f) from None
    if sum(sizes) > OTHER_FILES_LIMIT:
        SecretPart(
            other_files=[NamedFile(Path(f).name, b"\0" * s) for f, s in zip(other_files, sizes, strict=True)]
        ).validate()
    values: dict[str, str] = {}
    for sv in spec_values:
        k, sep, v = sv.partition("=")
        if not sep:
            raise UsageError(f"bad --spec-value {sv!r}", hint="use @KEY@=VALUE")
        values[k.strip()] = v
    answer = read_input(answer_file, "answer file", 1 << 20) if answer_file else None
    others = [NamedFile(Path(f).name, read_input(f, "other file", OTHER_FILES_LIMIT)) for f in other_files]
    res = api.new_pdk(
        out,
        owner=owner,
        policy=policy,
        owner_password=guardian_password(owner, password_env),
        guardians=guardians,
        templates=vscs,
        version_rule=rules or "eq",
        answer_file=answer,
        answer_file_name=Path(answer_file).name if answer_file else "unattend.xml",
        other_files=others,
        spec_values=values,
        allow_expired=allow_expired,
        allow_untrusted_root=allow_untrusted_root,
        trust=trust_certs,
    )
    for w in res.warnings:
        stderr(f"templatetool: warning: {w}")
    emit(
        res.to_json(),
        as_json,
        f"wrote {out} ({len(res.der)} bytes): owner {res.owner}, {len(res.guardians)} guardian(s), "
        f"{len(res.report['qualifiers'])} qualifier(s)",  # type: ignore[arg-type]
    )


@pdk_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--key",
    "key_spec",
    help="Recipient key to open the secret part: a guardian folder, FILE.pfx, pem:KEY,CERT or pkcs11:URI.",
)
@password_env_option
@click.option("--extract", type=OUTPUT_DIR, help="Write the secret files into this folder (0600).")
@allow_expired_option
@json_option
def pdk_show(
    file: str, key_spec: str | None, password_env: str | None, extract: str | None, allow_expired: bool, as_json: bool
) -> None:
    """Show a PDK's clear part (always verified) and, given a recipient key, its secret part."""
    from ..pdk import open_pdk_secret, read_pdk

    info = read_pdk(read_input(file, "PDK"), file, allow_expired=allow_expired)
    d = info.to_json()
    if extract and not key_spec:
        raise UsageError("--extract needs --key")
    if key_spec:
        key, cert = _recipient_key(key_spec, password_env)
        sp = open_pdk_secret(info, key, cert, file)
        d["secret"] = sp.to_json()
        if extract:
            folder = Path(extract)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ResourceError(f"cannot create the folder: {e.strerror}", extract) from None
            files = ([sp.answer_file] if sp.answer_file else []) + sp.other_files
            plan = current_plan()
            for f in files:  # names come from the PDK: checked like any output before the first write
                if plan is not None:
                    plan.check_late(str(folder / f.name), f"--extract file {f.name}")
            for f in files:
                write_secret_file(str(folder / f.name), f.data)
            d["extracted_to"] = extract
    emit(d, as_json, _pdk_text)


@pdk_group.command("verify")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--template", type=click.Path(dir_okay=False), help="Template disk whose catalog must qualify.")
@click.option("--vsc", type=click.Path(dir_okay=False), help="Signed catalog (.vsc) that must qualify.")
@click.option(
    "--owner",
    type=click.Path(),
    help="Expected owner: guardian folder or its signing certificate (PEM/DER); pins the signer.",
)
@allow_expired_option
@trust_option
@json_option
def pdk_verify(
    file: str,
    template: str | None,
    vsc: str | None,
    owner: str | None,
    allow_expired: bool,
    trust: tuple[str, ...],
    as_json: bool,
) -> None:
    """Verify the owner signature and every certificate; with --template/--vsc, check that the
    template satisfies a volume ID qualifier (exit 6 with the reason when it does not)."""
    from ..catalog import read_vsc_bytes
    from ..guardian import load_guardian
    from ..pdk import check_template, read_pdk

    if template and vsc:
        raise UsageError("give --template or --vsc, not both")
    trust_certs = load_trust(trust)
    owner_cert = None
    if owner:
        if os.path.isfile(owner):
            from ..signers import load_certificates

            owner_cert = load_certificates(owner)[0]
        else:
            owner_cert = load_guardian(owner).signing_certificate
    info = read_pdk(
        read_input(file, "PDK"),
        file,
        allow_expired=allow_expired,
        trust=trust_certs or None,
        owner_certificate=owner_cert,
    )
    d = {
        "pdk": file,
        "signature": "verified",
        "owner_trust": info.owner_trust,
        "certificates": 2 * (1 + len(info.guardians)),
        "policy": info.policy,
    }
    target = template or vsc
    if target:
        rep = check_template(info, read_vsc_bytes(target), target, trust=trust_certs or None)
        d["template"] = rep
        if not rep["qualified"]:
            raise PolicyError("the template does not satisfy any volume ID qualifier of the PDK", target, rep["reason"])
    emit(
        d,
        as_json,
        lambda r: (
            f"{file}: owner signature and {r['certificates']} certificates verified; "
            f"owner {r['owner_trust']}" + (f"\n  template qualifies: {r['template']['reason']}" if target else "")
        ),
    )


# ------------------------------------------------------------------------------------------------
# kp
# ------------------------------------------------------------------------------------------------


@click.group("kp")
def kp_group() -> None:
    """Key protectors ([MS-KPS] Protector XML): a secret wrapped to an owner and guardians."""


def _kp_text(d: dict[str, Any]) -> str:
    o = d["owner"]
    lines = [f"key protector: owner wrapping {o['id']}: {o['signing_certificate']['subject']}"]
    for g in d["guardians"]:
        lines.append(
            f"  guardian wrapping {g['id']}: {g['signing_certificate']['subject']}  "
            f"sha1 {g['signing_certificate']['sha1']}"
        )
    lines.append("  certificate chain and owner signature verified; MAC needs a key (kp unwrap)")
    return "\n".join(lines)


@kp_group.command("new")
@click.option("-o", "--output", "out", required=True, type=OUTPUT_FILE, help="Key protector file to write.")
@click.option("--owner", required=True, type=click.Path(), help="Owner guardian folder (with its keys).")
@click.option("--guardian", "guardians", multiple=True, type=click.Path(), help="Guardian folder or metadata XML.")
@click.option(
    "--secret-file", required=True, type=click.Path(dir_okay=False), help="The secret to protect (16 B..64 KiB)."
)
@password_env_option
@allow_untrusted_option
@trust_option
@json_option
def kp_new(
    out: str,
    owner: str,
    guardians: tuple[str, ...],
    secret_file: str,
    password_env: str | None,
    allow_untrusted_root: bool,
    trust: tuple[str, ...],
    as_json: bool,
) -> None:
    """Create a key protector for a secret (owner + guardians)."""
    from ..guardian import load_guardian
    from ..kp import create_kp

    secret = read_input(secret_file, "secret file", 64 * 1024 + 1)
    gs = _load_guardians(guardians, allow_untrusted_root, load_trust(trust))
    og = load_guardian(owner, private=True, password=guardian_password(owner, password_env))
    xml = create_kp(secret, og, gs)
    write_bytes_atomic(out, xml)
    emit(
        {"output": out, "owner": og.name, "guardians": [g.name for g in gs]},
        as_json,
        f"wrote {out}: owner {og.name}, {len(gs)} guardian(s)",
    )


@kp_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
def kp_show(file: str, as_json: bool) -> None:
    """Verify a key protector's structure and signatures and list its owner and guardians."""
    from ..kp import inspect_kp

    emit(inspect_kp(read_input(file, "key protector", 16 << 20), file), as_json, _kp_text)


@kp_group.command("grant")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--owner", required=True, type=click.Path(), help="Owner guardian folder (with its keys).")
@click.option("--guardian", required=True, type=click.Path(), help="Guardian folder or metadata XML to add.")
@click.option("-o", "--output", "out", required=True, type=OUTPUT_FILE, help="Key protector file to write.")
@password_env_option
@allow_untrusted_option
@trust_option
@json_option
def kp_grant(
    file: str,
    owner: str,
    guardian: str,
    out: str,
    password_env: str | None,
    allow_untrusted_root: bool,
    trust: tuple[str, ...],
    as_json: bool,
) -> None:
    """Give a guardian access (needs the owner's keys), like Grant-HgsKeyProtectorAccess."""
    from ..guardian import load_guardian
    from ..kp import grant

    data = read_input(file, "key protector", 16 << 20)
    g = _load_guardians((guardian,), allow_untrusted_root, load_trust(trust))[0]
    og = load_guardian(owner, private=True, password=guardian_password(owner, password_env))
    write_bytes_atomic(out, grant(data, og, g, file))
    emit({"output": out, "granted": g.name}, as_json, f"wrote {out}: granted {g.name}")


@kp_group.command("revoke")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--owner", required=True, type=click.Path(), help="Owner guardian folder (with its keys).")
@click.option("--guardian", required=True, help="Guardian folder, name or certificate thumbprint to remove.")
@click.option("-o", "--output", "out", required=True, type=OUTPUT_FILE, help="Key protector file to write.")
@password_env_option
@json_option
def kp_revoke(file: str, owner: str, guardian: str, out: str, password_env: str | None, as_json: bool) -> None:
    """Remove a guardian's access (needs the owner's keys), like Revoke-HgsKeyProtectorAccess."""
    from ..guardian import load_guardian
    from ..kp import revoke

    data = read_input(file, "key protector", 16 << 20)
    target = load_guardian(guardian) if os.path.isdir(guardian) else guardian
    og = load_guardian(owner, private=True, password=guardian_password(owner, password_env))
    write_bytes_atomic(out, revoke(data, og, target, file))
    name = getattr(target, "name", target)
    emit({"output": out, "revoked": name}, as_json, f"wrote {out}: revoked {name}")


@kp_group.command("unwrap")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--guardian", required=True, type=click.Path(file_okay=False), help="Guardian (or owner) folder with keys."
)
@click.option("-o", "--output", "out", required=True, type=OUTPUT_FILE, help="Secret output (0600).")
@password_env_option
@json_option
def kp_unwrap(file: str, guardian: str, out: str, password_env: str | None, as_json: bool) -> None:
    """Recover the protected secret with a guardian's or the owner's keys (written 0600)."""
    from ..guardian import load_guardian
    from ..kp import unwrap

    data = read_input(file, "key protector", 16 << 20)
    g = load_guardian(guardian, private=True, password=guardian_password(guardian, password_env))
    secret = unwrap(data, g, file)
    write_secret_file(out, secret)
    emit(
        {"output": out, "size": len(secret), "guardian": g.name},
        as_json,
        f"wrote the {len(secret)}-byte secret to {out} (unwrapped by {g.name})",
    )


def register(cli: click.Group) -> None:
    """Add the pdk and kp groups to the CLI."""
    cli.add_command(pdk_group)
    cli.add_command(kp_group)
