"""`templatetool luks ...`: LUKS2 root volumes for Linux shielded templates (docs/formats/luks2.md)."""

from __future__ import annotations

from typing import Any

import click

from ..errors import UsageError
from ..secrets import read_secret
from . import policy
from .common import emit, human_size, json_option
from .policy import OUTPUT_FILE, Out


def _kdf(pbkdf: str, memory: int, time_cost: int, parallel: int, iterations: int) -> Any:
    from ..luks import KdfParams

    if pbkdf == "pbkdf2":
        return KdfParams("pbkdf2", iterations=iterations)
    return KdfParams("argon2id", time=time_cost, memory=memory, cpus=parallel)


def _kdf_options(f: Any) -> Any:
    """The keyslot-0 KDF options shared by ``luks encrypt`` and ``luks protect``."""
    for opt in reversed(
        [
            click.option(
                "--pbkdf",
                type=click.Choice(["argon2id", "pbkdf2"]),
                default="argon2id",
                show_default=True,
                help="Keyslot 0's KDF.",
            ),
            click.option(
                "--pbkdf-memory",
                type=click.IntRange(64, 4 << 20),
                default=262144,
                show_default=True,
                help="Argon2id memory in KiB.",
            ),
            click.option(
                "--pbkdf-time", type=click.IntRange(1, 1000), default=4, show_default=True, help="Argon2id passes."
            ),
            click.option(
                "--pbkdf-parallel", type=click.IntRange(1, 16), default=2, show_default=True, help="Argon2id lanes."
            ),
            click.option(
                "--pbkdf-iterations",
                type=click.IntRange(1000, 1 << 31),
                default=600_000,
                show_default=True,
                help="PBKDF2-SHA256 iterations (--pbkdf pbkdf2).",
            ),
        ]
    ):
        f = opt(f)
    return f


def _pcrs(text: str) -> list[int]:
    try:
        return [int(p) for p in text.replace("+", ",").split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"--tpm2-pcrs {text!r} is not a list of PCR numbers", hint="e.g. 7 or 0,7") from None


def _pcr_values(spec: str | None, bank: str) -> dict[int, bytes] | None:
    if spec is None:
        return None
    from ..tpm.policy import parse_pcr_values

    return parse_pcr_values(spec, bank)


def _tpm2_policy_options(f: Any) -> Any:
    """The systemd-tpm2 token's policy options shared by ``luks encrypt`` and ``luks enroll-tpm2``."""
    for opt in reversed(
        [
            click.option("--tpm2-pcrs", default="7", show_default=True, help="PCRs the token is sealed to."),
            click.option(
                "--tpm2-pcr-values",
                metavar="SPEC",
                default=None,
                help="Seal to these PCR values (7=HEX,... or a file, e.g. replayed from a TCG log) "
                "instead of the TPM's current ones.",
            ),
            click.option(
                "--tpm2-pcr-bank",
                type=click.Choice(["sha256", "sha1", "sha384"]),
                default="sha256",
                show_default=True,
                help="PCR bank of the token's policy.",
            ),
            click.option(
                "--tpm2-primary-alg",
                type=click.Choice(["ecc", "rsa"]),
                default="ecc",
                show_default=True,
                help="systemd's primary key: ECC P-256 or RSA-2048.",
            ),
        ]
    ):
        f = opt(f)
    return f


def _token_spec(device: str, pcrs: str, pcr_values: str | None, bank: str, primary_alg: str) -> Any:
    """The keyslot spec of a systemd-tpm2 token sealed in ``device`` from the CLI's option values."""
    from ..luks.tpm2 import token_keyslot

    return token_keyslot(device, _pcrs(pcrs), bank, primary_alg, _pcr_values(pcr_values, bank))


def _dump_text(d: dict[str, Any]) -> str:
    lines = [
        f"{d['path']}: LUKS2, uuid {d['uuid']}, header {d['hdr_size']} bytes x2 ({d['checksum']}), "
        f"seqid {d['seqid']}, copies " + ", ".join(f"{k} {'ok' if v else 'BAD'}" for k, v in d["copies"].items())
    ]
    for k, s in d["segments"].items():
        how = f"{s.get('encryption')} sector {s.get('sector_size')}" if s.get("type") == "crypt" else "not encrypted"
        lines.append(f"  segment {k}: {s.get('type')}, {how}, offset {s.get('offset')} size {s.get('size')}")
    for k, ks in d["keyslots"].items():
        kd = ks["kdf"]
        params = ", ".join(f"{x} {y}" for x, y in kd.items() if x != "type")
        lines.append(
            f"  keyslot {k}: {ks['key_bits']}-bit key, {kd.get('type')} ({params}), "
            f"AF {ks['af'].get('stripes')} x {ks['af'].get('hash')}, area {ks['area'].get('offset')}"
            f"+{ks['area'].get('size')}"
        )
    for k, t in d["tokens"].items():
        extra = ", ".join(f"{x} {y}" for x, y in t.items() if x not in ("type", "keyslots"))
        lines.append(
            f"  token {k}: {t.get('type')} -> keyslots {','.join(t.get('keyslots', []))}"
            + (f" ({extra})" if extra else "")
        )
    return "\n".join(lines)


def _protect(
    golden: str,
    dst: str,
    name: str,
    version: str,
    signer: str,
    password_env: str | None,
    pin_env: str | None,
    pss: bool,
    passphrase_env: str | None,
    kdf: Any,
    root_partition: int | None,
    block_size: str,
    subformat: str | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    from ..luks import KeyslotSpec
    from ..pipeline.protect_linux import protect_linux
    from .common import parse_size
    from .signer_opts import open_signer

    s = open_signer(signer, password_env, pin_env)
    pw = read_secret(passphrase_env, "LUKS passphrase: ", confirm=True).encode()
    res = protect_linux(
        golden,
        dst,
        name,
        version,
        s,
        [KeyslotSpec(pw, kdf)],
        block_size=parse_size(block_size),
        pss=pss,
        overwrite=overwrite,
        root_partition=root_partition,
        subformat=subformat,
    )
    emit(
        res,
        as_json,
        lambda r: (
            f"protected {golden} -> {r['output']}\n  template {r['name']} {r['version']} signed by {r['signer']}\n"
            f"  ESP partition {r['esp']['index']} measured: root {r['root']}\n"
            f"  root partition {r['luks']['partition']}: LUKS2, {human_size(r['luks']['data_size'])} data"
            + (f"\n  catalog {r['vsc']}" if r["vsc"] else "")
        ),
    )


def protect_linux_cli(
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
    passphrase_env: str | None,
    as_json: bool,
) -> None:
    """``protect --os linux``: the main protect command's options, run as ``luks protect`` with the
    default Argon2id keyslot."""
    from ..luks import KdfParams

    if check or in_place:
        raise UsageError(
            "--check and --in-place are for Windows templates", hint="a Linux template is always a new disk"
        )
    missing = [o for o, v in (("-o", output), ("--name", name), ("--version", version), ("--signer", signer)) if not v]
    if missing:
        raise UsageError(
            f"missing {', '.join(missing)}",
            hint="protect GOLDEN --os linux -o T.vhdx --name N --version A.B.C.D --signer SPEC",
        )
    assert output and name and version and signer
    _protect(
        golden,
        output,
        name,
        version,
        signer,
        password_env,
        pin_env,
        pss,
        passphrase_env,
        KdfParams(),
        None,
        block_size,
        subformat,
        overwrite,
        as_json,
    )


def register(cli: click.Group) -> None:
    """Add the ``luks`` command group to ``cli``."""

    @cli.group("luks")
    def luks() -> None:
        """LUKS2 volumes written natively: encrypt a root image, dump, decrypt, systemd-tpm2 tokens."""

    @luks.command("encrypt")
    @click.argument("src", type=click.Path(dir_okay=False))
    @click.option("-o", "--output", "dst", type=OUTPUT_FILE, required=True, help="The new LUKS2 image.")
    @click.option(
        "--passphrase-env",
        metavar="VAR",
        default=None,
        help="Keyslot 0's passphrase from $VAR (prompted when omitted).",
    )
    @click.option(
        "--sector-size",
        type=click.Choice(["512", "4096"]),
        default=None,
        help="Encryption unit (default 4096 when SRC is a whole number of 4 KiB, else 512).",
    )
    @_kdf_options
    @click.option(
        "--tpm2-device",
        metavar="TCTI",
        default=None,
        help="Also seal a systemd-tpm2 token in this TPM (e.g. swtpm:host=127.0.0.1,port=2321).",
    )
    @_tpm2_policy_options
    @click.option("--label", default="", help="LUKS2 label.")
    @json_option
    def encrypt_cmd(
        src: str,
        dst: str,
        passphrase_env: str | None,
        sector_size: str | None,
        pbkdf: str,
        pbkdf_memory: int,
        pbkdf_time: int,
        pbkdf_parallel: int,
        pbkdf_iterations: int,
        tpm2_device: str | None,
        tpm2_pcrs: str,
        tpm2_pcr_values: str | None,
        tpm2_pcr_bank: str,
        tpm2_primary_alg: str,
        label: str,
        as_json: bool,
    ) -> None:
        """Encrypt the raw root image SRC (ext4, ...) into a new LUKS2 image (SRC is not changed)."""
        from ..luks import KeyslotSpec, encrypt_image

        if len(label) > 47:
            raise UsageError("--label is longer than 47 characters")
        pw = read_secret(passphrase_env, "LUKS passphrase: ", confirm=True).encode()
        slots = [KeyslotSpec(pw, _kdf(pbkdf, pbkdf_memory, pbkdf_time, pbkdf_parallel, pbkdf_iterations))]
        if tpm2_device:
            slots.append(_token_spec(tpm2_device, tpm2_pcrs, tpm2_pcr_values, tpm2_pcr_bank, tpm2_primary_alg))
        res = encrypt_image(src, dst, slots, sector_size=int(sector_size) if sector_size else None, label=label)
        emit(
            res,
            as_json,
            lambda r: (
                f"{r['output']}: LUKS2 {r['cipher']} {r['key_bits']}-bit, "
                f"{human_size(r['data_size'])} data at {human_size(r['data_offset'])}, sector {r['sector_size']}, "
                f"{r['keyslots']} keyslot(s)"
            ),
        )

    @luks.command("protect")
    @click.argument("golden", type=click.Path(dir_okay=False))
    @click.option(
        "-o", "--output", "dst", type=OUTPUT_FILE, required=True, help="The new template disk (.vhdx or raw)."
    )
    @click.option("--name", required=True, help="Template name.")
    @click.option("--version", "version", required=True, help="Template version a.b.c.d.")
    @click.option("--signer", required=True, help="Signing identity: FILE.pfx | pem:KEY,CERT[,CHAIN] | pkcs11:URI.")
    @click.option("--password-env", metavar="VAR", help="Environment variable holding the PFX/key password.")
    @click.option("--pin-env", metavar="VAR", help="Environment variable holding the PKCS#11 PIN.")
    @click.option("--pss", is_flag=True, help="Sign with RSASSA-PSS (RSA keys).")
    @click.option(
        "--passphrase-env",
        metavar="VAR",
        default=None,
        help="The LUKS2 passphrase (keyslot 0) from $VAR (prompted when omitted).",
    )
    @_kdf_options
    @click.option("--root-partition", type=int, default=None, help="The root partition (default: the one Linux ext).")
    @click.option("--block-size", default="1M", show_default=True, help="Catalog measurement block size.")
    @click.option(
        "--subformat",
        type=click.Choice(["fixed", "dynamic"]),
        default=None,
        help="VHDX subformat of the output (default: the input's; dynamic for a raw input).",
    )
    @click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
    @json_option
    @policy.derived_outputs(
        lambda p: (
            [Out("the catalog (OUTPUT.vsc)", p["dst"] + ".vsc")]
            if p.get("dst") and not p["dst"].lower().endswith(".vhdx")
            else []
        )
    )
    def protect_cmd(
        golden: str,
        dst: str,
        name: str,
        version: str,
        signer: str,
        password_env: str | None,
        pin_env: str | None,
        pss: bool,
        passphrase_env: str | None,
        pbkdf: str,
        pbkdf_memory: int,
        pbkdf_time: int,
        pbkdf_parallel: int,
        pbkdf_iterations: int,
        root_partition: int | None,
        block_size: str,
        subformat: str | None,
        overwrite: bool,
        as_json: bool,
    ) -> None:
        """Make a signed Linux template from GOLDEN: LUKS2 root, the ESP measured into a VSC."""
        _protect(
            golden,
            dst,
            name,
            version,
            signer,
            password_env,
            pin_env,
            pss,
            passphrase_env,
            _kdf(pbkdf, pbkdf_memory, pbkdf_time, pbkdf_parallel, pbkdf_iterations),
            root_partition,
            block_size,
            subformat,
            overwrite,
            as_json,
        )

    @luks.command("enroll-tpm2")
    @click.argument("image", type=click.Path(dir_okay=False))
    @click.option(
        "-o", "--output", "dst", type=OUTPUT_FILE, required=True, help="The new image: IMAGE plus the token's keyslot."
    )
    @click.option("--passphrase-env", metavar="VAR", default=None, help="An existing passphrase from $VAR.")
    @click.option(
        "--tpm2-device", metavar="TCTI", required=True, help="The TPM to seal in (e.g. swtpm:host=127.0.0.1,port=2321)."
    )
    @_tpm2_policy_options
    @json_option
    def enroll_cmd(
        image: str,
        dst: str,
        passphrase_env: str | None,
        tpm2_device: str,
        tpm2_pcrs: str,
        tpm2_pcr_values: str | None,
        tpm2_pcr_bank: str,
        tpm2_primary_alg: str,
        as_json: bool,
    ) -> None:
        """Copy IMAGE with a systemd-tpm2 token added (systemd-cryptenroll --tpm2-device, offline)."""
        from ..luks.volume import add_keyslot

        pw = read_secret(passphrase_env, "LUKS passphrase: ").encode()
        spec = _token_spec(tpm2_device, tpm2_pcrs, tpm2_pcr_values, tpm2_pcr_bank, tpm2_primary_alg)
        res = add_keyslot(image, dst, pw, spec)
        emit(res, as_json, lambda r: f"{r['output']}: systemd-tpm2 token enrolled as keyslot {r['keyslot']}")

    @luks.command("dump")
    @click.argument("image", type=click.Path(dir_okay=False))
    @json_option
    def dump_cmd(image: str, as_json: bool) -> None:
        """Show the LUKS2 header of IMAGE (salts, digests and sealed blobs left out)."""
        from ..luks import describe

        emit(describe(image), as_json, _dump_text)

    @luks.command("decrypt")
    @click.argument("image", type=click.Path(dir_okay=False))
    @click.option("-o", "--output", "dst", type=OUTPUT_FILE, required=True, help="The plaintext image.")
    @click.option("--passphrase-env", metavar="VAR", default=None, help="The passphrase from $VAR.")
    @click.option(
        "--tpm2-device",
        metavar="TCTI",
        default=None,
        help="Unlock with the image's systemd-tpm2 token in this TPM instead.",
    )
    @json_option
    def decrypt_cmd(image: str, dst: str, passphrase_env: str | None, tpm2_device: str | None, as_json: bool) -> None:
        """Write the plaintext of IMAGE's data segment to a new file (IMAGE is not changed)."""
        from ..luks import decrypt_image

        if tpm2_device and passphrase_env:
            raise UsageError("give --passphrase-env or --tpm2-device, not both")
        if tpm2_device:
            pw = _token_passphrase(image, tpm2_device)
        else:
            pw = read_secret(passphrase_env, "LUKS passphrase: ").encode()
        res = decrypt_image(image, dst, pw)
        emit(res, as_json, lambda r: f"{r['output']}: {human_size(r['data_size'])} decrypted (keyslot {r['keyslot']})")


def _token_passphrase(image: str, tcti: str) -> bytes:
    from ..errors import NotFoundError
    from ..luks import read_header
    from ..luks.tpm2 import tokens_of, unseal_token

    try:
        f = open(image, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise NotFoundError("image not found", image) from None
    with f:
        toks = tokens_of(read_header(f, image).metadata)
    if not toks:
        raise NotFoundError("the image has no systemd-tpm2 token", image, "use --passphrase-env")
    return unseal_token(tcti, toks[0][1])
