"""CLI: protect, vsc export/show/verify, cert new (thin layer over catalog/, pipeline/, signers/)."""

from __future__ import annotations

import sys
from typing import Any

import click

from . import policy
from .common import emit, json_option, stderr
from .policy import OUTPUT_FILE, OUTPUT_PREFIX, Out

_SIGNER_HELP = "FILE.pfx | pem:KEY,CERT[,CHAIN] | pkcs11:URI (RFC 7512)."


def _problems_text(probs: list[Any]) -> str:
    return "\n".join(f"  - {p.what}\n    fix: {p.hint}" for p in probs)


@click.command("protect")
@click.argument("golden", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", type=OUTPUT_FILE, help="The new template disk (.vhdx).")
@click.option("--name", help="Template name (exact match in volume ID qualifiers).")
@click.option("--version", "version", help="Template version a.b.c.d (each part < 65536).")
@click.option("--signer", help=f"Signing identity: {_SIGNER_HELP}")
@click.option("--password-env", metavar="VAR", help="Environment variable holding the PFX/key password.")
@click.option(
    "--pin-env", metavar="VAR", help="Environment variable holding the PKCS#11 PIN (default TEMPLATETOOL_PKCS11_PIN)."
)
@click.option("--pss", is_flag=True, help="Sign with RSASSA-PSS (RSA keys).")
@click.option("--block-size", default="1M", show_default=True, help="Measurement block size.")
@click.option("--check", is_flag=True, help="Only run the preflight checks; list every problem; exit 6 if any.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option(
    "--subformat",
    type=click.Choice(["fixed", "dynamic"]),
    default=None,
    help="VHDX subformat of the output (default: the input's; dynamic for a raw input).",
)
@click.option(
    "--in-place",
    "in_place",
    is_flag=True,
    help="Modify GOLDEN itself (not atomic; default is a new disk) instead of writing -o.",
)
@click.option(
    "--os",
    "os_",
    type=click.Choice(["windows", "linux"]),
    default="windows",
    show_default=True,
    help="linux: LUKS2 root + the ESP measured (as 'luks protect').",
)
@click.option("--luks-passphrase-env", metavar="VAR", help="With --os linux: the LUKS2 passphrase from $VAR.")
@json_option
@policy.derived_outputs(
    lambda p: (
        [Out("the catalog (OUTPUT.vsc)", p["output"] + ".vsc")]
        if p.get("output")
        and not p.get("in_place")
        and not p.get("check")
        and not p["output"].lower().endswith(".vhdx")
        else []
    )
)
def protect_cmd(
    golden: str,
    output: str | None,
    name: str | None,
    version: str | None,
    signer: str | None,
    password_env: str | None,
    pin_env: str | None,
    pss: bool,
    block_size: str,
    check: bool,
    overwrite: bool,
    subformat: str | None,
    in_place: bool,
    os_: str,
    luks_passphrase_env: str | None,
    as_json: bool,
) -> None:
    """Make a signed template disk from GOLDEN (a new disk; GOLDEN is never modified)."""
    if os_ == "linux":
        from .linux_cmd import protect_linux_cli

        return protect_linux_cli(
            golden,
            output,
            name,
            version,
            signer,
            password_env,
            pin_env,
            pss,
            block_size,
            check,
            overwrite,
            subformat,
            in_place,
            luks_passphrase_env,
            as_json,
        )
    from .. import api
    from ..errors import PolicyError, UsageError
    from .common import parse_size
    from .signer_opts import open_signer

    if check:
        pf = api.preflight(golden)
        probs = pf.problems
        if probs and not as_json:
            for p in probs:
                stderr(f"templatetool: preflight: {p.what}; {p.hint}")
        emit(
            pf.to_json(),
            as_json,
            lambda r: f"{golden}: ready to protect" if not probs else "",
            error=PolicyError(f"{len(probs)} preflight problem(s)", golden) if probs else None,
        )
        return
    need = (("--name", name), ("--version", version), ("--signer", signer)) + (() if in_place else (("-o", output),))
    missing = [o for o, v in need if not v]
    if missing:
        raise UsageError(
            f"missing {', '.join(missing)}",
            hint="protect GOLDEN -o TEMPLATE.vhdx --name N --version A.B.C.D --signer SPEC",
        )
    assert name is not None and version is not None and signer is not None
    s = open_signer(signer, password_env, pin_env)
    res = api.protect(
        golden,
        output,
        name=name,
        version=version,
        signer=s,
        block_size=parse_size(block_size),
        pss=pss,
        overwrite=overwrite,
        in_place=in_place,
        subformat=subformat,
    )
    emit(
        res.to_json(),
        as_json,
        lambda r: (
            f"protected {golden} -> {r['output']}\n  template {r['name']} {r['version']} signed by {r['signer']}\n"
            f"  root {r['root']} ({r['block_count']} blocks of {r['block_size']} bytes)"
            + (f"\n  catalog {r['vsc']}" if r["vsc"] else "")
        ),
    )


@click.group("vsc")
def vsc_group() -> None:
    """Volume signature catalogs: export, show, verify."""


@vsc_group.command("export")
@click.argument("template", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="The .vsc file to write.")
@json_option
def vsc_export(template: str, output: str, as_json: bool) -> None:
    """Write TEMPLATE's signed catalog to a .vsc file (checks its signature first)."""
    from .. import api

    emit(
        api.export_vsc(template, output).to_json(),
        as_json,
        lambda r: f"wrote {r['output']} ({r['size']} bytes): {r['name']} {r['version']}",
    )


def _show_text(info: Any) -> str:
    d = info.document
    v = d.volume
    c = info.cms
    lines = [
        f"template   {d.name} {d.version_str}",
        f"signer     {c.signer_cert.subject.rfc4514_string()}",
        f"  issuer   {c.signer_cert.issuer.rfc4514_string()}",
        f"  sha1     {info.signer_thumbprint}",
        f"  valid    {c.signer_cert.not_valid_before_utc:%Y-%m-%d} .. {c.signer_cert.not_valid_after_utc:%Y-%m-%d}",
        f"signed     {c.signing_time.isoformat() if c.signing_time else '?'} ({c.signature_algorithm}, {c.digest_algorithm})",
        f"created    {d.created} by templatetool {d.tool_version}",
        f"volume     {v.size} bytes, {v.filesystem}, cluster {v.cluster_size}, sector {v.sector_size}",
    ]
    if v.partition_index is not None:
        lines.append(
            f"partition  {v.partition_index} at {v.partition_offset}, guid {v.partition_guid}, type {v.partition_type}"
        )
    lines += [
        f"measure    sha256 merkle, {d.block_count} blocks of {d.block_size}, free space: {d.free_space}",
        f"root       {d.root.hex()}",
        f"detail     level {d.detail_level} ({len(d.detail)} hashes)",
    ]
    return "\n".join(lines)


@vsc_group.command("show")
@click.argument("source", type=click.Path(dir_okay=False))
@json_option
def vsc_show(source: str, as_json: bool) -> None:
    """Show a catalog from a .vsc file or a template disk (its signature is checked)."""
    from ..catalog import open_vsc, read_vsc_bytes

    info = open_vsc(read_vsc_bytes(source))
    emit(info.to_json(), as_json, lambda _: _show_text(info))


@vsc_group.command("verify")
@click.argument("template", type=click.Path(dir_okay=False))
@click.option(
    "--vsc", "vsc_file", type=click.Path(dir_okay=False), help="Verify against this .vsc instead of the embedded one."
)
@click.option(
    "--trust",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Trusted certificate (CA or signer), PEM/DER; repeatable.",
)
@json_option
def vsc_verify(template: str, vsc_file: str | None, trust: tuple[str, ...], as_json: bool) -> None:
    """Verify TEMPLATE: catalog signature, certificate, and the disk content (exit 4 on mismatch)."""
    from .. import api
    from ..errors import IntegrityError
    from ..signers import load_certificates

    anchors = [c for t in trust for c in load_certificates(t)] or None
    rep = api.verify_vsc(template, vsc=vsc_file, trust=anchors)

    def text(d: Any) -> str:
        if rep.ok:
            return (
                f"OK: {rep.name} {rep.version} signed by {rep.signer}; volume matches the catalog "
                f"(root {rep.actual_root})"
            )
        out = [f"MISMATCH: {rep.name} {rep.version}: the volume differs from the catalog"]
        out += [f"  changed bytes {off}..{off + n - 1} of the volume" for off, n in rep.changed[:50]]
        out += [f"  affected: {f['path']} ({f['attribute']})" for f in d["files"][:50]]
        return "\n".join(out)

    emit(
        rep.to_json(),
        as_json,
        text,
        error=None
        if rep.ok
        else IntegrityError(f"{len(rep.changed)} changed region(s): the volume differs from the catalog", template),
    )


def _cert_base(output: str) -> str:
    return output[:-4] if output.lower().endswith(".pfx") else output


@click.group("cert")
def cert_group() -> None:
    """Certificates for test and lab use."""


@cert_group.command("new")
@click.option("--signing", "usage", flag_value="signing", help="A signing certificate (digitalSignature).")
@click.option(
    "--encryption", "usage", flag_value="encryption", help="An encryption certificate (keyEncipherment / keyAgreement)."
)
@click.option("--subject", required=True, help='Subject, e.g. "CN=Template Signer".')
@click.option(
    "-o",
    "--output",
    required=True,
    type=OUTPUT_PREFIX,
    help="Output NAME (writes NAME.pfx and NAME.crt unless NAME ends in .pfx).",
)
@click.option(
    "--key",
    "key_kind",
    default="rsa3072",
    show_default=True,
    type=click.Choice(["rsa2048", "rsa3072", "rsa4096", "ec-p256", "ec-p384"]),
    help="Key kind.",
)
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1, 36500), help="Validity in days.")
@click.option(
    "--password-env", metavar="VAR", help="Environment variable with the PFX password (else prompt; empty = none)."
)
@json_option
@policy.derived_outputs(
    lambda p: [
        Out("-o (NAME.pfx)", _cert_base(p["output"]) + ".pfx", "key"),
        Out("-o (NAME.crt)", _cert_base(p["output"]) + ".crt", "key"),
    ]
)
def cert_new(
    usage: str | None, subject: str, output: str, key_kind: str, days: int, password_env: str | None, as_json: bool
) -> None:
    """Create a key and a self-signed certificate; write a PFX (mode 0600) and the certificate (PEM)."""

    from cryptography.hazmat.primitives.serialization import Encoding

    from ..atomic import write_bytes_atomic
    from ..errors import UsageError
    from ..secrets import read_secret
    from ..signers import new_key, self_signed, thumbprint, write_pfx

    if usage is None:
        raise UsageError("choose --signing or --encryption")
    base = _cert_base(output)
    if password_env:
        pw: bytes | None = read_secret(password_env, "").encode("utf-8")
    elif sys.stdin.isatty():
        pw = read_secret(None, "PFX password (empty for none): ", confirm=True).encode("utf-8") or None
    else:
        raise UsageError("a PFX password is needed", hint="pass --password-env VAR (or run on a terminal)")
    key = new_key(key_kind)
    cert = self_signed(subject, key, usage, days=days)
    write_pfx(base + ".pfx", key, cert, pw)
    write_bytes_atomic(base + ".crt", cert.public_bytes(Encoding.PEM))
    emit(
        {
            "pfx": base + ".pfx",
            "certificate": base + ".crt",
            "subject": subject,
            "usage": usage,
            "key": key_kind,
            "thumbprint": thumbprint(cert),
        },
        as_json,
        lambda r: (
            f"wrote {r['pfx']} (0600) and {r['certificate']}: {r['subject']} [{r['usage']}, {r['key']}] sha1 {r['thumbprint']}"
        ),
    )


def register(cli: click.Group) -> None:
    """Add protect, vsc and cert to the templatetool command."""
    cli.add_command(protect_cmd)
    cli.add_command(vsc_group)
    cli.add_command(cert_group)
