"""`templatetool encrypt`, `templatetool decrypt` and `templatetool bitlocker info`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..bitlocker import bitlocker_summary
from ..errors import CredentialError, ResourceError, UsageError
from ..secrets import read_secret, write_secret_file
from . import policy
from .common import emit, human_size, json_option, read_small_file
from .policy import OUTPUT_FILE, Out
from .tpm_cmd import tpm_seal_options, vtpm_from_options

__all__ = ["bitlocker_summary", "register"]

METHODS = click.Choice(["xts-aes-128", "xts-aes-256"], case_sensitive=False)


def _info_text(r: dict[str, Any]) -> str:
    lines = [f"{r['disk']}" + (f" partition {r['partition']}" if r.get("partition") else " (bare volume)")]
    lines.append(f"  layout         {r['layout']}" + (" (BitLocker To Go)" if r["layout"] == "to-go" else ""))
    lines.append(f"  method         {r['method']} ({r['method_code']})")
    lines.append(f"  sector size    {r['sector_size']}")
    lines.append(f"  volume GUID    {r['volume_guid']}")
    lines.append(f"  state          {r['state']}, encrypted size {human_size(r['encrypted_size'])}")
    if r.get("description"):
        lines.append(f"  description    {r['description']}")
    for p in r["protectors"]:
        lines.append(f"  protector      {p['type']:<18} {{{p['guid']}}}  created {p['created'] or '-'}")
    for c in r["copies"]:
        state = "valid" if c["valid"] else f"INVALID: {c['error']}"
        lines.append(f"  metadata copy {c['copy']} @ {c['offset']:#x}: {state}")
    return "\n".join(lines)


#: Credential files are tiny (a .BEK is 156 bytes); refuse anything absurd before reading it.
MAX_CREDENTIAL_FILE = 1 << 20


def _read_file(path: str, what: str) -> bytes:
    return read_small_file(path, what, MAX_CREDENTIAL_FILE)


def _credential_options(f: Any) -> Any:
    f = click.option(
        "--startup-key", type=click.Path(dir_okay=False), help="Resume with this startup key file (.BEK)."
    )(f)
    f = click.option("--recovery-password-env", metavar="VAR", help="Resume with the recovery password in $VAR.")(f)
    f = click.option(
        "--recovery-password-file",
        type=click.Path(dir_okay=False),
        help="Resume with the recovery password in this file.",
    )(f)
    return f


def _credential(
    recovery_password_file: str | None,
    recovery_password_env: str | None,
    startup_key: str | None,
    password_env: str | None,
) -> dict[str, Any]:
    """The one credential given (as keyword arguments for unlocking); {} when none."""
    given = [bool(x) for x in (recovery_password_file, recovery_password_env, startup_key, password_env)]
    if sum(given) > 1:
        raise UsageError(
            "give only one credential",
            hint="--recovery-password-file, --recovery-password-env, --startup-key or --password-env",
        )
    if recovery_password_file:
        text_ = _read_file(recovery_password_file, "recovery password file").decode("utf-8", "replace").strip()
        if not text_:
            raise CredentialError("recovery password file is empty", recovery_password_file)
        return {"recovery_password": text_}
    if recovery_password_env:
        return {"recovery_password": read_secret(recovery_password_env, "recovery password: ")}
    if startup_key:
        return {"bek": _read_file(startup_key, "startup key file")}
    if password_env:
        return {"password": read_secret(password_env, "BitLocker password: ")}
    return {}


def _in_place_text(d: dict[str, Any]) -> str:
    verb = "resumed and finished" if d["resumed"] else "encrypted"
    lines = [
        f"{verb} {d['method']} volume in place ({human_size(d['volume_size'])}"
        + (f", partition {d['partition']}" if d.get("partition") else "")
        + f") in {d['disk']}"
    ]
    if d["resumed"]:
        lines.append(f"  resumed at {human_size(d['started_at'])}")
    if d.get("skipped_bytes"):
        lines.append(f"  left free space as it was: {human_size(d['skipped_bytes'])} (used space only)")
    for p in d["protectors"]:
        lines.append(f"  protector {p['type']:<18} {{{p['guid']}}}")
    if d.get("recovery_password_file"):
        lines.append(f"  recovery password written to {d['recovery_password_file']}")
    if d.get("startup_key_file"):
        lines.append(f"  startup key written to {d['startup_key_file']}")
    if d.get("recovery_password"):
        lines.append(f"  recovery password: {d['recovery_password']}")
    return "\n".join(lines)


def _encrypt_in_place(
    disk: str,
    partition: int | None,
    method: str,
    password: str | None,
    tpm_seal: Any,
    description: str | None,
    recovery_password_out: str | None,
    show_recovery_password: bool,
    startup_key_out: str | None,
    password_env: str | None,
    recovery_password_file: str | None,
    recovery_password_env: str | None,
    startup_key: str | None,
    as_json: bool,
    used_space_only: bool = False,
) -> None:
    from .. import api

    if not (recovery_password_out or startup_key_out or password_env):
        raise UsageError(
            "--in-place needs a durable key protector: a crash before the end must not lose the key",
            hint="give --recovery-password-out FILE, --startup-key-out FILE.bek or --password-env VAR",
        )
    cred = _credential(recovery_password_file, recovery_password_env, startup_key, None)
    if not cred:  # re-running the same command: the first run's key files are the credential
        if recovery_password_out and Path(recovery_password_out).is_file():
            cred = _credential(recovery_password_out, None, None, None)
        elif startup_key_out and Path(startup_key_out).is_file():
            cred = _credential(None, None, startup_key_out, None)
    shown: dict[str, Any] = {}

    def on_keys(keys: api.EncryptKeys) -> None:
        # Before the first byte of the volume changes: the keys must survive a crash.
        if recovery_password_out and keys.recovery_password:
            write_secret_file(recovery_password_out, (keys.recovery_password + "\n").encode())
            shown["recovery_password_file"] = recovery_password_out
        if startup_key_out and keys.startup_key is not None:
            write_secret_file(startup_key_out, keys.startup_key)
            shown["startup_key_file"] = startup_key_out
        if show_recovery_password:
            shown["recovery_password"] = keys.recovery_password

    # without a resume credential api.encrypt_in_place resumes with the password protector's value
    res = api.encrypt_in_place(
        disk,
        recovery_password=bool(recovery_password_out or show_recovery_password),
        startup_key=bool(startup_key_out),
        password=password,
        tpm_seal=tpm_seal,
        partition=partition,
        method=method,
        description=description,
        resume_recovery_password=cred.get("recovery_password"),
        resume_password=cred.get("password"),
        resume_startup_key=cred.get("bek"),
        on_keys=on_keys,
        used_space_only=used_space_only,
    )
    doc = res.to_json()
    doc.update(shown)
    emit(doc, as_json, _in_place_text)


def _encrypt_outputs(p: dict[str, Any]) -> list[Out]:
    """Re-running `encrypt --in-place` on a disk mid-conversion re-reads the first run's key files."""
    if not (p.get("in_place") and policy.converting(p.get("disk"))):
        return []
    return [
        Out(o, p[n], "resume")
        for o, n in (("--recovery-password-out", "recovery_password_out"), ("--startup-key-out", "startup_key_out"))
        if p.get(n)
    ]


def register(cli: click.Group) -> None:
    @cli.command("resume")
    @click.argument("disk", type=click.Path(dir_okay=False))
    @click.option("--partition", type=int, default=None, help="Partition number (default: the OS volume).")
    @_credential_options
    @click.option("--password-env", metavar="VAR", help="Resume with the password in $VAR.")
    @json_option
    def resume(
        disk: str,
        partition: int | None,
        recovery_password_file: str | None,
        recovery_password_env: str | None,
        startup_key: str | None,
        password_env: str | None,
        as_json: bool,
    ) -> None:
        """Finish an interrupted `encrypt --in-place` of DISK (needs one credential of the volume)."""
        from .. import api

        cred = _credential(recovery_password_file, recovery_password_env, startup_key, password_env)
        if not cred:
            raise UsageError(
                "resume needs the volume's credential",
                hint="--recovery-password-file, --recovery-password-env, --startup-key or --password-env",
            )
        res = api.resume(
            disk,
            partition=partition,
            recovery_password=cred.get("recovery_password"),
            password=cred.get("password"),
            startup_key=cred.get("bek"),
        )
        emit(res.to_json(), as_json, _in_place_text)

    @cli.command("encrypt")
    @click.argument("disk", type=click.Path(dir_okay=False))
    @click.option("-o", "--output", "out", type=OUTPUT_FILE, help="New disk to write.")
    @click.option(
        "--in-place",
        "in_place",
        is_flag=True,
        help="Convert DISK itself (resumable; needs the BitLocker reservation, e.g. from `protect`).",
    )
    @click.option(
        "--used-space-only",
        is_flag=True,
        help="With --in-place: leave spans free in NTFS and unallocated in DISK (reading as zeros) "
        "as they are; time and a dynamic VHDX's size then follow the used data.",
    )
    @click.option("--partition", type=int, default=None, help="Partition number (default: the OS volume).")
    @click.option("--method", type=METHODS, default="xts-aes-128", show_default=True, help="BitLocker cipher.")
    @click.option(
        "--recovery-password-out",
        type=OUTPUT_FILE,
        help="Add a recovery password and write it to this file (mode 0600).",
    )
    @click.option("--show-recovery-password", is_flag=True, help="Add a recovery password and print it.")
    @click.option(
        "--startup-key-out", type=OUTPUT_FILE, help="Add a startup key and write the .BEK file here (mode 0600)."
    )
    @click.option("--password-env", metavar="VAR", help="Add a password protector; password from $VAR.")
    @click.option("--description", help="Volume description stored in the metadata.")
    @_credential_options
    @tpm_seal_options
    @json_option
    @policy.derived_outputs(_encrypt_outputs)
    def encrypt(
        disk: str,
        out: str | None,
        in_place: bool,
        used_space_only: bool,
        partition: int | None,
        method: str,
        recovery_password_out: str | None,
        show_recovery_password: bool,
        startup_key_out: str | None,
        password_env: str | None,
        description: str | None,
        recovery_password_file: str | None,
        recovery_password_env: str | None,
        startup_key: str | None,
        as_json: bool,
        **tpm_opts: Any,
    ) -> None:
        """Encrypt the OS volume of DISK (raw or VHDX) with BitLocker into a new disk OUT, or in place.

        --tpm-parent adds a vTPM protector sealed offline to that (v)TPM key under the PCR policy
        (--pcrs with --pcr-values or --tcg-log, optional --pin-env); it needs a second protector
        (e.g. --recovery-password-out) so that a changed boot chain never locks the data away.

        With --in-place, re-running the same command after a crash resumes the conversion: the
        recovery password / startup key files written by the first run are the credential (or
        give --recovery-password-file/--recovery-password-env/--startup-key).
        """
        from ..bitlocker import ProtectorSpec

        if in_place and out:
            raise UsageError("--in-place converts DISK itself; do not also give -o/--output")
        if not in_place and not out:
            raise UsageError("no output given", hint="pass -o NEW_DISK, or --in-place to convert DISK itself")
        if used_space_only and not in_place:
            raise UsageError(
                "--used-space-only applies to --in-place",
                hint="a new disk (-o) already leaves free, unallocated space unwritten",
            )
        if not in_place and (recovery_password_file or recovery_password_env or startup_key):
            raise UsageError(
                "--recovery-password-file/--recovery-password-env/--startup-key resume an in-place "
                "conversion; they need --in-place"
            )

        specs: list[ProtectorSpec] = []
        password = read_secret(password_env, "BitLocker password: ") if password_env else None
        if recovery_password_out or show_recovery_password:
            specs.append(ProtectorSpec("recovery_password"))
        if startup_key_out:
            specs.append(ProtectorSpec("startup_key"))
        if password is not None:
            specs.append(ProtectorSpec("password", password))
        vtpm = vtpm_from_options(**tpm_opts)
        if vtpm is not None:
            if not specs:
                raise UsageError(
                    "a vTPM protector alone would lock the volume for good once a PCR changes",
                    hint="add --recovery-password-out FILE or --show-recovery-password "
                    "(or --startup-key-out / --password-env)",
                )
            specs.insert(0, ProtectorSpec("tpm", seal=vtpm[0]))
        if not specs:
            raise UsageError(
                "no key protector requested: the volume could never be unlocked",
                hint="give --recovery-password-out FILE, --show-recovery-password, "
                "--startup-key-out FILE.bek or --password-env VAR",
            )
        for p in (recovery_password_out, startup_key_out):
            if p and not Path(p).resolve().parent.is_dir():
                raise ResourceError("output folder does not exist", str(Path(p).parent))
        if in_place:
            _encrypt_in_place(
                disk,
                partition,
                method,
                password,
                vtpm[0] if vtpm is not None else None,
                description,
                recovery_password_out,
                show_recovery_password,
                startup_key_out,
                password_env,
                recovery_password_file,
                recovery_password_env,
                startup_key,
                as_json,
                used_space_only,
            )
            return
        assert out is not None
        from .. import api

        def save_keys(keys: api.EncryptKeys) -> None:
            # before the encrypted disk is renamed into place: a disk never exists without its keys
            try:
                if recovery_password_out and keys.recovery_password:
                    write_secret_file(recovery_password_out, (keys.recovery_password + "\n").encode())
                if startup_key_out and keys.startup_key is not None:
                    write_secret_file(startup_key_out, keys.startup_key)
            except OSError as e:
                raise ResourceError(
                    f"cannot write the key file: {e.strerror}",
                    hint="the encrypted disk was not written; free space and run again",
                ) from None

        res = api.encrypt(
            disk,
            out,
            recovery_password=bool(recovery_password_out or show_recovery_password),
            startup_key=bool(startup_key_out),
            password=password,
            tpm_seal=vtpm[0] if vtpm is not None else None,
            partition=partition,
            method=method,
            description=description,
            on_keys=save_keys,
        )
        doc = res.to_json()
        if show_recovery_password:
            doc["recovery_password"] = res.keys.recovery_password
        if recovery_password_out:
            doc["recovery_password_file"] = recovery_password_out
        if startup_key_out:
            doc["startup_key_file"] = startup_key_out
        if vtpm is not None:
            doc["vtpm"] = vtpm[1]

        def text(d: dict[str, Any]) -> str:
            lines = [
                f"encrypted {d['method']} volume ({human_size(d['volume_size'])}"
                + (f", partition {d['partition']}" if d.get("partition") else "")
                + f") -> {d['output']}"
            ]
            for p in d["protectors"]:
                lines.append(f"  protector {p['type']:<18} {{{p['guid']}}}")
            if d.get("recovery_password_file"):
                lines.append(f"  recovery password written to {d['recovery_password_file']}")
            if d.get("startup_key_file"):
                lines.append(f"  startup key written to {d['startup_key_file']}")
            if d.get("recovery_password"):
                lines.append(f"  recovery password: {d['recovery_password']}")
            if d.get("vtpm"):
                v = d["vtpm"]
                lines.append(
                    f"  vTPM sealed to parent {v['parent_name'][:20]}... ({v['bank']} PCRs "
                    f"{','.join(map(str, v['pcrs']))}{', PIN' if v['pin'] else ''})"
                )
            return "\n".join(lines)

        emit(doc, as_json, text)

    @cli.command("decrypt")
    @click.argument("disk", type=click.Path(dir_okay=False))
    @click.option("-o", "--output", "out", required=True, type=OUTPUT_FILE, help="New disk to write.")
    @click.option("--partition", type=int, default=None, help="Partition number (default: the BitLocker volume).")
    @click.option(
        "--recovery-password-file", type=click.Path(dir_okay=False), help="File holding the recovery password."
    )
    @click.option("--recovery-password-env", metavar="VAR", help="Recovery password from $VAR.")
    @click.option("--startup-key", type=click.Path(dir_okay=False), help="Startup key file (.BEK).")
    @click.option("--password-env", metavar="VAR", help="Password from $VAR.")
    @click.option("--clear-key", is_flag=True, help="Use the clear key (suspended protection).")
    @click.option(
        "--tpm",
        "tcti",
        metavar="TCTI",
        help="Unseal the vTPM protector through this (v)TPM, e.g. swtpm:host=127.0.0.1,port=2321.",
    )
    @click.option("--pin-env", metavar="VAR", help="With --tpm: the TPM PIN is in $VAR.")
    @click.option("-v", "--verbose", is_flag=True, help="Also say whether free space was skipped, and why not.")
    @json_option
    def decrypt(
        disk: str,
        out: str,
        partition: int | None,
        recovery_password_file: str | None,
        recovery_password_env: str | None,
        startup_key: str | None,
        password_env: str | None,
        clear_key: bool,
        tcti: str | None,
        pin_env: str | None,
        verbose: bool,
        as_json: bool,
    ) -> None:
        """Write a copy of DISK with its BitLocker volume decrypted.

        Works whatever the volume holds: free NTFS space left unallocated by a sparse encryption
        is skipped when the inner NTFS parses cleanly; anything else is decrypted whole
        (`--json` field `free_space`, and `-v`, say which).
        """
        from .. import api

        given = [
            bool(x) for x in (recovery_password_file, recovery_password_env, startup_key, password_env, clear_key, tcti)
        ]
        if sum(given) != 1:
            raise UsageError(
                "give exactly one credential",
                hint="--recovery-password-file, --recovery-password-env, "
                "--startup-key, --password-env, --clear-key or --tpm TCTI",
            )
        if pin_env and not tcti:
            raise UsageError("--pin-env is the PIN of a vTPM protector: it needs --tpm TCTI")
        cred: dict[str, Any] = {}
        if recovery_password_file:
            text_ = _read_file(recovery_password_file, "recovery password file").decode("utf-8", "replace").strip()
            if not text_:
                raise CredentialError("recovery password file is empty", recovery_password_file)
            cred["recovery_password"] = text_
        elif recovery_password_env:
            cred["recovery_password"] = read_secret(recovery_password_env, "recovery password: ")
        elif startup_key:
            cred["startup_key"] = _read_file(startup_key, "startup key file")
        elif password_env:
            cred["password"] = read_secret(password_env, "BitLocker password: ")
        elif tcti:
            cred["tpm"] = tcti
            cred["tpm_pin"] = read_secret(pin_env, "TPM PIN: ") if pin_env else None
        else:
            cred["clear_key"] = True
        r = api.decrypt(disk, out, partition=partition, **cred).to_json()

        def text(d: dict[str, Any]) -> str:
            line = (
                f"decrypted {d['method']} volume ({human_size(d['volume_size'])}"
                + (f", partition {d['partition']}" if d.get("partition") else "")
                + f") -> {d['output']}"
            )
            if verbose:
                fsp = d["free_space"]
                if fsp["used"]:
                    line += f"\n  free space skipped: {human_size(fsp['skipped_bytes'])} ({fsp['reason']})"
                else:
                    line += f"\n  free space not skipped: {fsp['reason']}"
            return line

        emit(r, as_json, text)

    @cli.group("bitlocker")
    def bitlocker() -> None:
        """BitLocker volume details."""

    @bitlocker.command("info")
    @click.argument("disk", type=click.Path(dir_okay=False))
    @click.option("--partition", type=int, default=None, help="Partition number (default: the BitLocker volume).")
    @json_option
    def info(disk: str, partition: int | None, as_json: bool) -> None:
        """Method, sector size, protectors (type, GUID, dates) and metadata copies of a BitLocker volume."""
        from ..bitlocker import open_fve
        from ..disk import View, locate_volume, open_disk

        dev = open_disk(disk)
        try:
            off, size, index = locate_volume(dev, partition, ("bitlocker", "bitlocker-to-go"))
            r = open_fve(View(dev, off, size, name=f"{disk} volume@{off}")).info()
        finally:
            dev.close()
        r = {"disk": disk, "partition": index, "volume_offset": off, **r}
        emit(r, as_json, _info_text)
