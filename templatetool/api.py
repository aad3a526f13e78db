"""templatetool's Python API: the main jobs as functions returning frozen, typed results.

Every function takes paths, bytes or library objects (a :class:`~templatetool.signers.Signer`, a
:class:`~templatetool.guardian.Guardian`) and returns a frozen dataclass. Secrets (PFX and guardian
passwords, BitLocker passwords, recovery passwords, PINs) are *values*: ``bytes``/``str`` or a
:data:`~templatetool.signers.SecretSource` (a zero-argument callable, called only when the secret is
needed). Nothing here reads environment variables or prompts: that is the CLI's job.

Failures raise the typed errors of :mod:`templatetool.errors` (each with ``what``, ``where``,
``hint`` and a stable ``code``). Every result has ``to_json()``: the JSON document the matching
CLI command prints under ``result`` (docs/cli.md); ``report`` is that document (read-only).

See docs/api.md for the public surface and an example.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias

from .errors import CredentialError, NotFoundError, ResourceError, UsageError
from .signers.base import Secret, resolve_secret

if TYPE_CHECKING:
    from cryptography import x509

    from .guardian import Guardian
    from .pdk import NamedFile
    from .signers.base import Signer

#: A value of the JSON documents the results carry.
JSONValue: TypeAlias = "bool | int | float | str | Sequence[JSONValue] | Mapping[str, JSONValue] | None"
#: A path given as ``str`` or ``os.PathLike``.
PathLike: TypeAlias = "str | os.PathLike[str]"
#: A guardian object, or the path of a guardian folder / HGS metadata XML.
GuardianLike: TypeAlias = "Guardian | str | os.PathLike[str]"

__all__ = [
    "CatalogExport",
    "CatalogVerification",
    "Decrypted",
    "DiskDescription",
    "DiskVolume",
    "EncryptKeys",
    "Encrypted",
    "EncryptedInPlace",
    "EscrowContents",
    "GuardianCreated",
    "JSONValue",
    "PdkCreated",
    "PreflightProblem",
    "PreflightReport",
    "Protected",
    "Shielded",
    "UnlockResult",
    "UnlockStep",
    "decrypt",
    "dry_run",
    "encrypt",
    "encrypt_in_place",
    "export_vsc",
    "inspect",
    "new_guardian",
    "new_pdk",
    "open_escrow",
    "open_guardian",
    "open_signer",
    "preflight",
    "protect",
    "resume",
    "shield",
    "unlock",
    "verify_vsc",
]


def _frozen(doc: Mapping[str, object]) -> Mapping[str, JSONValue]:
    return MappingProxyType(dict(doc))  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Result:
    """Base of every result: ``report`` is the JSON document of the matching CLI command."""

    report: Mapping[str, JSONValue] = field(repr=False, compare=False)

    def to_json(self) -> dict[str, JSONValue]:
        """The JSON document (a fresh dict) the CLI prints under ``result``."""
        return dict(self.report)


# ------------------------------------------------------------------------------------------------
# signers and guardians
# ------------------------------------------------------------------------------------------------


def open_signer(
    spec: str, *, password: Secret | None = None, pin: Secret | None = None, pkcs11_module: str | None = None
) -> Signer:
    """Open a signer: ``FILE.pfx``, ``pem:KEY,CERT[,CHAIN]`` or ``pkcs11:URI`` (RFC 7512).

    ``password`` opens an encrypted PFX/key file, ``pin`` is a PKCS#11 token's user PIN,
    ``pkcs11_module`` the PKCS#11 library when the URI names no ``module-path`` (no environment
    variable is read).
    """
    from .signers import load_signer

    return load_signer(spec, password=password, pin=pin, pkcs11_module=pkcs11_module)


def open_guardian(
    path: PathLike,
    *,
    private: bool = False,
    password: Secret | None = None,
    allow_untrusted_root: bool = False,
    trust: Sequence[x509.Certificate] = (),
) -> Guardian:
    """Load a guardian folder (or HGS metadata XML); ``private=True`` opens its keys with
    ``password`` (needed when they are password-protected)."""
    from .guardian import load_guardian

    return load_guardian(
        path, private=private, password=password, allow_untrusted_root=allow_untrusted_root, trust=list(trust)
    )


def _guardian(
    g: GuardianLike,
    *,
    private: bool,
    password: Secret | None = None,
    allow_untrusted_root: bool = False,
    trust: Sequence[x509.Certificate] = (),
) -> Guardian:
    if isinstance(g, (str, os.PathLike)):
        return open_guardian(
            g, private=private, password=password, allow_untrusted_root=allow_untrusted_root, trust=trust
        )
    if private and (g.signing_key is None or g.encryption_key is None):
        raise CredentialError(
            f"guardian {g.name!r} has no private keys loaded",
            g.path,
            "load it with its keys (open_guardian(path, private=True, password=...))",
            code="guardian.no-private-keys",
        )
    return g


@dataclass(frozen=True)
class GuardianCreated(_Result):
    """A new guardian and the folder it was saved in."""

    guardian: Guardian = field(repr=False)
    name: str = ""
    output: str = ""
    encrypted: bool = True


def new_guardian(
    name: str,
    output: PathLike,
    *,
    password: Secret | None,
    key: str = "rsa3072",
    days: int = 3650,
    overwrite: bool = False,
) -> GuardianCreated:
    """Generate a guardian (self-signed signing + encryption certificates, like
    New-HgsGuardian -GenerateCertificates) and save it in the folder ``output``.

    ``password`` protects the private-key PFX files (0600); ``None`` stores them unencrypted.
    An existing guardian in ``output`` is refused unless ``overwrite``.
    """
    from .guardian import generate_guardian, save_guardian

    out = os.fspath(output)
    if (Path(out) / "guardian.json").exists() and not overwrite:
        raise UsageError(
            "a guardian already exists in this folder", out, "choose another folder", code="guardian.exists"
        )
    pw = resolve_secret(password)
    g = generate_guardian(name, key, days)
    save_guardian(g, out, None if pw is None else pw.decode("utf-8"), overwrite=overwrite)
    return GuardianCreated(
        report=_frozen({**g.to_json(), "output": out}), guardian=g, name=g.name, output=out, encrypted=pw is not None
    )


# ------------------------------------------------------------------------------------------------
# protect, catalogs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreflightProblem:
    """One reason a golden disk cannot be protected yet."""

    code: str
    what: str
    hint: str


@dataclass(frozen=True)
class PreflightReport(_Result):
    """The outcome of :func:`preflight`: ``ok`` when the disk can be protected."""

    disk: str = ""
    ok: bool = False
    problems: tuple[PreflightProblem, ...] = ()


def preflight(golden: PathLike) -> PreflightReport:
    """Check a golden disk without changing anything; list every problem."""
    from .pipeline.protect import preflight as _preflight

    probs = _preflight(golden)
    disk = os.fspath(golden)
    return PreflightReport(
        report=_frozen({"disk": disk, "ok": not probs, "problems": [p.to_json() for p in probs]}),
        disk=disk,
        ok=not probs,
        problems=tuple(PreflightProblem(p.code, p.what, p.hint) for p in probs),
    )


@dataclass(frozen=True)
class Protected(_Result):
    """A signed template disk: where it is, and its catalog."""

    output: str = ""
    vsc_path: str | None = None
    name: str = ""
    version: str = ""
    signer: str = ""
    root: str = ""
    catalog: bytes = field(default=b"", repr=False)


def protect(
    golden: PathLike,
    output: PathLike | None,
    *,
    name: str,
    version: str,
    signer: Signer,
    block_size: int | None = None,
    pss: bool = False,
    overwrite: bool = False,
    in_place: bool = False,
    subformat: str | None = None,
) -> Protected:
    """Make a signed template disk from ``golden`` (never modified unless ``in_place``).

    ``output`` ending in .vhdx gets the catalog in its metadata; a raw output also gets
    ``OUTPUT.vsc``. ``signer`` signs the catalog (any :class:`~templatetool.signers.Signer`).
    """
    from .catalog import DEFAULT_BLOCK_SIZE
    from .pipeline.protect import protect as _protect

    r = _protect(
        golden,
        output,
        name,
        version,
        signer,
        block_size=block_size or DEFAULT_BLOCK_SIZE,
        pss=pss,
        overwrite=overwrite,
        in_place=in_place,
        subformat=subformat,
    )
    return Protected(
        report=_frozen(r.to_json()),
        output=r.output,
        vsc_path=r.vsc_path,
        name=r.document.name,
        version=r.document.version_str,
        signer=r.signer,
        root=r.document.root.hex(),
        catalog=r.der,
    )


@dataclass(frozen=True)
class CatalogExport(_Result):
    """A template's signed catalog (signature checked), and where it was written."""

    der: bytes = field(default=b"", repr=False)
    name: str = ""
    version: str = ""
    output: str | None = None


def export_vsc(template: PathLike, output: PathLike | None = None) -> CatalogExport:
    """The signed catalog of ``template`` (a protected disk or a .vsc), signature checked first;
    written atomically to ``output`` when given."""
    from .atomic import write_bytes_atomic
    from .catalog.vsc import open_vsc, read_vsc_bytes

    der = read_vsc_bytes(template)
    info = open_vsc(der)
    out = os.fspath(output) if output is not None else None
    if out is not None:
        write_bytes_atomic(out, der)
    return CatalogExport(
        report=_frozen(
            {
                "input": os.fspath(template),
                "output": out,
                "size": len(der),
                "name": info.name,
                "version": info.document.version_str,
            }
        ),
        der=der,
        name=info.name,
        version=info.document.version_str,
        output=out,
    )


@dataclass(frozen=True)
class CatalogVerification(_Result):
    """A template disk checked against its catalog: ``ok`` when the content matches."""

    ok: bool = False
    name: str = ""
    version: str = ""
    signer: str = ""
    expected_root: str = ""
    actual_root: str | None = None
    changed: tuple[tuple[int, int], ...] = ()  # (offset, length) of changed volume bytes
    files: tuple[str, ...] = ()  # paths of the files those bytes belong to


def verify_vsc(
    template: PathLike, *, vsc: bytes | PathLike | None = None, trust: Sequence[x509.Certificate] | None = None
) -> CatalogVerification:
    """Verify ``template``: catalog signature and certificate (raise on failure), then the disk
    content (``ok=False`` with the changed ranges on a mismatch). ``vsc``: a detached catalog
    (DER bytes or a .vsc path) instead of the embedded one; ``trust``: anchors for the signer."""
    from .catalog.vsc import read_vsc_bytes, verify_template

    der = read_vsc_bytes(vsc) if isinstance(vsc, (str, os.PathLike)) else vsc
    rep = verify_template(template, vsc=der, trust=list(trust) if trust else None)
    return CatalogVerification(
        report=_frozen(rep.to_json()),
        ok=rep.ok,
        name=rep.name,
        version=rep.version,
        signer=rep.signer,
        expected_root=rep.expected_root,
        actual_root=rep.actual_root,
        changed=tuple((int(c["offset"]), int(c["length"])) for c in rep.changed),
        files=tuple(str(f.get("path", "")) for f in rep.files),
    )


# ------------------------------------------------------------------------------------------------
# shielding data, shield
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PdkCreated(_Result):
    """A shielding data file signed by the owner."""

    output: str = ""
    der: bytes = field(default=b"", repr=False)
    owner: str = ""
    guardians: tuple[str, ...] = ()
    policy: str = ""
    warnings: tuple[str, ...] = ()


def _bytes_or_file(v: bytes | PathLike, what: str, limit: int) -> tuple[str, bytes]:
    if isinstance(v, bytes):
        return what, v
    p = Path(v)
    try:
        size = p.stat().st_size
        if size > limit:
            from .errors import FormatError

            raise FormatError(f"{what} is too large ({size} bytes, limit {limit})", str(p))
        return p.name, p.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{what} not found", str(p)) from None
    except IsADirectoryError:
        raise UsageError(f"{what}: expected a file, got a folder", str(p)) from None
    except OSError as e:
        raise ResourceError(f"cannot read {what}: {e.strerror}", str(p)) from None


def new_pdk(
    output: PathLike,
    *,
    owner: GuardianLike,
    policy: str,
    owner_password: Secret | None = None,
    guardians: Sequence[GuardianLike] = (),
    templates: Sequence[bytes | PathLike] = (),
    version_rule: str | Sequence[str] = "eq",
    answer_file: bytes | PathLike | None = None,
    answer_file_name: str = "unattend.xml",
    other_files: Mapping[str, bytes] | Sequence[NamedFile] | None = None,
    spec_values: Mapping[str, str] | None = None,
    allow_expired: bool = False,
    allow_untrusted_root: bool = False,
    trust: Sequence[x509.Certificate] = (),
) -> PdkCreated:
    """Create a shielding data file (like New-ShieldingDataFile), written atomically to ``output``.

    ``owner``: the owner guardian with its keys (an object, or a folder opened with
    ``owner_password``). ``guardians``: the fabrics' guardians (objects, folders or metadata XML).
    ``templates``: the signed catalogs to trust (DER bytes, .vsc files or template disks), each
    with ``version_rule`` (eq|ge|gt; one for all or one per template). ``policy``: shielded or
    encryption-supported. ``other_files``: name → bytes, or NamedFile objects (two files may not
    share a name).
    """
    from .atomic import write_bytes_atomic
    from .catalog.qualifier import VolumeIdQualifier
    from .catalog.vsc import open_vsc, read_vsc_bytes
    from .guardian.metadata import parse_xml
    from .pdk import NamedFile, SecretPart, create_pdk

    rules = [version_rule] if isinstance(version_rule, str) else list(version_rule)
    if templates and len(rules) not in (1, len(templates)):
        raise UsageError("give one version rule, or one per template", code="pdk.version-rules")
    trust_l = list(trust)
    answer = None
    if answer_file is not None:
        name, data = _bytes_or_file(answer_file, "answer file", 1 << 20)
        if isinstance(answer_file, bytes):
            name = answer_file_name
        if name.lower().endswith(".xml"):
            parse_xml(data, name)
        answer = NamedFile(name, data)
    others = (
        [NamedFile(n, d) for n, d in other_files.items()]
        if isinstance(other_files, Mapping)
        else list(other_files or ())
    )
    secret = SecretPart(answer, others, dict(spec_values or {}))
    secret.validate()
    quals = []
    for i, t in enumerate(templates):
        der = t if isinstance(t, bytes) else read_vsc_bytes(t)
        info = open_vsc(der, trust=trust_l or None)
        quals.append(VolumeIdQualifier.from_vsc(info, rules[i] if len(rules) > 1 else rules[0]))
    gs = [_guardian(g, private=False, allow_untrusted_root=allow_untrusted_root, trust=trust_l) for g in guardians]
    og = _guardian(owner, private=True, password=owner_password)
    der, warnings = create_pdk(
        og,
        gs,
        quals,
        secret,
        policy,
        allow_expired=allow_expired,
        allow_untrusted_root=allow_untrusted_root,
        trust=trust_l,
    )
    out = os.fspath(output)
    write_bytes_atomic(out, der)
    doc = {
        "output": out,
        "size": len(der),
        "owner": og.name,
        "guardians": [g.name for g in gs],
        "qualifiers": [q.to_json() for q in quals],
        "policy": policy,
        "warnings": warnings,
    }
    return PdkCreated(
        report=_frozen(doc),
        output=out,
        der=der,
        owner=og.name,
        guardians=tuple(g.name for g in gs),
        policy=policy,
        warnings=tuple(warnings),
    )


@dataclass(frozen=True)
class Shielded(_Result):
    """A shielded VM disk, its key protector and the owner's recovery escrow."""

    disk: str = ""
    kp: str = ""
    recovery_escrow: str = ""
    policy: str = ""
    owner: str = ""
    guardians: tuple[str, ...] = ()
    vtpm_state: str | None = None  # the VM's encrypted swtpm state (None: software vTPM / existing vTPM)
    volume_guid: str = ""
    protectors: tuple[str, ...] = ()  # protector types, in the volume's order


def shield(
    template: PathLike,
    pdk: PathLike,
    output: PathLike | None,
    *,
    owner: GuardianLike,
    owner_password: Secret | None = None,
    guardians: Sequence[GuardianLike] = (),
    kp: PathLike | None = None,
    tpm_parent: PathLike | None = None,
    pcrs: Sequence[int] = (7, 11),
    pcr_values: Mapping[int, bytes] | None = None,
    tcg_log: PathLike | bytes | None = None,
    bank: str = "sha256",
    method: str = "xts-aes-128",
    in_place: bool = False,
    subformat: str | None = None,
    vtpm: str = "swtpm",
    template_passphrase: Secret | None = None,
    used_space_only: bool = False,
    **options: object,
) -> Shielded:
    """Turn ``template`` + the PDK into a shielded VM disk at ``output`` (``None`` with
    ``in_place``), its key protector (default ``OUTPUT.kp``) and the recovery escrow
    (``OUTPUT.recovery.p7m``, encrypted to the owner).

    The vTPM protector is sealed to ``pcrs`` with ``pcr_values`` or the replay of ``tcg_log``
    (give one). ``guardians``: guardians of the PDK (objects, folders or metadata XML) when the
    PDK does not carry their certificate signatures. ``vtpm``: ``"swtpm"`` (default) manufactures
    the VM's own vTPM with swtpm and writes its encrypted state as ``OUTPUT.vtpm``
    (:attr:`Shielded.vtpm_state`); ``"software"`` keeps a software vTPM key in the KP instead.
    A Linux template (``protect(..., os="linux")``: ESP + LUKS2 root) is re-keyed and its new key
    sealed in the VM's vTPM as a systemd-tpm2 token; ``template_passphrase`` (a value or a
    :data:`~templatetool.secrets.SecretSource`, read only for such a template) opens the
    template's keyslot. ``used_space_only`` (with ``in_place``): free, unallocated spans of the
    template stay as they are (see :func:`encrypt_in_place`). Further keyword ``options`` go to
    :func:`templatetool.pipeline.shield.shield` unchanged.
    """
    from .pipeline.shield import shield as _shield

    if (pcr_values is None) == (tcg_log is None):
        raise UsageError("give exactly one of PCR values and a TCG log", code="shield.pcr-source")
    if (output is None) != in_place:
        raise UsageError("give an output disk, or convert the template in place", code="shield.output")
    og = _guardian(owner, private=True, password=owner_password)
    known = [_guardian(g, private=False, allow_untrusted_root=True) for g in guardians]
    rep = _shield(
        template,
        pdk,
        output if output is not None else template,
        og,
        kp_path=kp,
        tpm_parent=tpm_parent,
        pcrs=list(pcrs),
        pcr_values=pcr_values,
        tcg_log=tcg_log,
        bank=bank,
        method=method,
        guardians=known,
        in_place=in_place,
        subformat=subformat,
        vtpm=vtpm,
        template_passphrase=template_passphrase,
        used_space_only=used_space_only,
        **options,  # type: ignore[arg-type]
    )
    outs = rep["outputs"]
    bl = rep.get("bitlocker", {})
    return Shielded(
        report=_frozen(rep),
        disk=str(outs["disk"]),
        kp=str(outs["kp"]),
        recovery_escrow=str(outs["recovery_escrow"]),
        vtpm_state=str(outs["vtpm_state"]) if outs.get("vtpm_state") else None,
        policy=str(rep["policy"]),
        owner=str(rep["owner"]),
        guardians=tuple(rep["guardians"]),
        volume_guid=str(bl.get("volume_guid", "")),
        protectors=tuple(str(p["type"]) for p in bl.get("protectors", [])),
    )


@dataclass(frozen=True)
class EscrowContents:
    """What the owner's recovery escrow holds (``recovery_password`` is a secret: not in repr)."""

    recovery_password: str = field(repr=False)
    disk: str | None = None
    volume_guid: str | None = None


def open_escrow(
    escrow: bytes | PathLike, *, owner: GuardianLike, owner_password: Secret | None = None
) -> EscrowContents:
    """Open a shielded VM's recovery escrow (``OUTPUT.recovery.p7m``) with the owner's key."""
    import json

    from .cms.enveloped import open_envelope
    from .errors import FormatError

    where, data = (
        ("escrow", escrow)
        if isinstance(escrow, bytes)
        else (os.fspath(escrow), _bytes_or_file(escrow, "recovery escrow", 1 << 20)[1])
    )
    g = _guardian(owner, private=True, password=owner_password)
    assert g.encryption_key is not None  # _guardian(private=True) checked it
    plain = open_envelope(data, g.encryption_key, g.encryption_certificate, where=where)
    try:
        doc = json.loads(plain)
        return EscrowContents(
            recovery_password=str(doc["recovery_password"]), disk=doc.get("disk"), volume_guid=doc.get("volume_guid")
        )
    except (ValueError, KeyError, TypeError):
        raise FormatError("the recovery escrow does not hold a recovery password", where) from None


# ------------------------------------------------------------------------------------------------
# guardian dry run, unlock
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnlockStep:
    """One step of the unlock chain: ``status`` passed, failed or skipped."""

    name: str
    status: str
    detail: str
    seconds: float
    exit_code: int = 0


@dataclass(frozen=True)
class UnlockResult(_Result):
    """The unlock chain's steps; ``ok`` when the guardian unlocks (or, dry run, would unlock)."""

    ok: bool = False
    summary: str = ""
    output: str | None = None
    steps: tuple[UnlockStep, ...] = ()

    def failure(self) -> UnlockStep | None:
        """The first failed step, if any."""
        return next((s for s in self.steps if s.status == "failed"), None)


def _unlock(
    vm_disk: PathLike,
    kp: PathLike,
    guardian: PathLike,
    host: PathLike,
    *,
    output: PathLike | None,
    dry: bool,
    guardian_password: Secret | None,
    host_evidence: PathLike | None,
    health_cert: PathLike | None,
    tpm_tcti: str | None,
    pcr_values: Mapping[int, bytes] | None,
    vtpm_state: PathLike | None = None,
    tcg_log: PathLike | bytes | None = None,
) -> UnlockResult:
    from .pipeline.unlock import unlock as _run

    rep = _run(
        vm_disk,
        kp,
        guardian,
        host,
        output=output,
        host_evidence=host_evidence,
        health_cert=health_cert,
        guardian_password=guardian_password,
        tpm_tcti=tpm_tcti,
        pcr_values=pcr_values,
        dry_run=dry,
        vtpm_state=vtpm_state,
        tcg_log=tcg_log,
    )
    return UnlockResult(
        report=_frozen(rep.to_json()),
        ok=rep.ok,
        summary=rep.summary,
        output=rep.output,
        steps=tuple(UnlockStep(s.name, s.status, s.detail, s.seconds, s.exit_code) for s in rep.steps),
    )


def dry_run(
    vm_disk: PathLike,
    kp: PathLike,
    guardian: PathLike,
    host: PathLike,
    *,
    guardian_password: Secret | None = None,
    host_evidence: PathLike | None = None,
    health_cert: PathLike | None = None,
    tpm_tcti: str | None = None,
    pcr_values: Mapping[int, bytes] | None = None,
    vtpm_state: PathLike | None = None,
    tcg_log: PathLike | bytes | None = None,
) -> UnlockResult:
    """The guardian's dry run: attestation → key release → vTPM unseal → BitLocker unlock →
    catalog verify, writing nothing. A failed step is reported (``ok=False``), not raised.
    ``vtpm_state`` (default ``VM.vtpm`` beside the disk) and ``tcg_log`` (the VM's boot, played
    into its vTPM; default the reference boot recorded at shield) apply to swtpm-vTPM VMs."""
    return _unlock(
        vm_disk,
        kp,
        guardian,
        host,
        output=None,
        dry=True,
        guardian_password=guardian_password,
        host_evidence=host_evidence,
        health_cert=health_cert,
        tpm_tcti=tpm_tcti,
        pcr_values=pcr_values,
        vtpm_state=vtpm_state,
        tcg_log=tcg_log,
    )


def unlock(
    vm_disk: PathLike,
    kp: PathLike,
    guardian: PathLike,
    host: PathLike,
    output: PathLike,
    *,
    guardian_password: Secret | None = None,
    host_evidence: PathLike | None = None,
    health_cert: PathLike | None = None,
    tpm_tcti: str | None = None,
    pcr_values: Mapping[int, bytes] | None = None,
    vtpm_state: PathLike | None = None,
    tcg_log: PathLike | bytes | None = None,
) -> UnlockResult:
    """The unlock chain for real: the decrypted disk is written to ``output``; the first failed
    step raises its typed error."""
    return _unlock(
        vm_disk,
        kp,
        guardian,
        host,
        output=output,
        dry=False,
        guardian_password=guardian_password,
        host_evidence=host_evidence,
        health_cert=health_cert,
        tpm_tcti=tpm_tcti,
        pcr_values=pcr_values,
        vtpm_state=vtpm_state,
        tcg_log=tcg_log,
    )


# ------------------------------------------------------------------------------------------------
# BitLocker encrypt / decrypt, inspect
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncryptKeys:
    """The keys an encryption generated (secrets: not in repr): handed to ``on_keys`` before the
    encrypted disk appears, so that a disk never exists without its keys."""

    recovery_password: str | None = field(default=None, repr=False)
    startup_key: bytes | None = field(default=None, repr=False)  # the .BEK file's bytes


@dataclass(frozen=True)
class Encrypted(_Result):
    """A BitLocker-encrypted copy of a disk (``keys`` holds the generated secrets)."""

    output: str = ""
    volume_guid: str = ""
    method: str = ""
    protectors: tuple[str, ...] = ()
    keys: EncryptKeys = field(default_factory=EncryptKeys, repr=False)


def _protector_specs(
    recovery_password: bool,
    startup_key: bool,
    password: Secret | None,
    tpm_seal: Callable[[bytes], tuple[bytes, int]] | None,
) -> list[Any]:
    """The BitLocker protectors an encryption asked for (UsageError when none, or a vTPM alone)."""
    from .bitlocker import ProtectorSpec

    specs: list[ProtectorSpec] = []
    if recovery_password:
        specs.append(ProtectorSpec("recovery_password"))
    if startup_key:
        specs.append(ProtectorSpec("startup_key"))
    if password is not None:
        pw = resolve_secret(password)
        assert pw is not None
        specs.append(ProtectorSpec("password", pw.decode("utf-8")))
    if tpm_seal is not None:
        if not specs:
            raise UsageError(
                "a vTPM protector alone would lock the volume for good once a PCR changes",
                hint="add a recovery password, startup key or password protector",
                code="encrypt.tpm-alone",
            )
        specs.insert(0, ProtectorSpec("tpm", seal=tpm_seal))
    if not specs:
        raise UsageError(
            "no key protector requested: the volume could never be unlocked",
            hint="ask for a recovery password, a startup key or a password",
            code="encrypt.no-protector",
        )
    return specs


def encrypt(
    disk: PathLike,
    output: PathLike,
    *,
    recovery_password: bool = False,
    startup_key: bool = False,
    password: Secret | None = None,
    tpm_seal: Callable[[bytes], tuple[bytes, int]] | None = None,
    partition: int | None = None,
    method: str = "xts-aes-128",
    description: str | None = None,
    on_keys: Callable[[EncryptKeys], None] | None = None,
) -> Encrypted:
    """Encrypt the OS volume (or ``partition``) of ``disk`` with BitLocker into the new disk ``output``.

    Protectors: a generated ``recovery_password``, a generated ``startup_key`` (.BEK), a
    ``password``, and ``tpm_seal`` (a vTPM sealer, e.g. from :func:`templatetool.tpm.make_sealer`;
    it needs a second protector). ``on_keys`` receives the generated keys before ``output``
    appears; if it raises, no disk is written.
    """
    from .pipeline.encrypt import encrypt_disk

    specs = _protector_specs(recovery_password, startup_key, password, tpm_seal)

    def saved(res: object) -> None:
        if on_keys is not None:
            on_keys(EncryptKeys(getattr(res, "recovery_password", None), getattr(res, "bek", None)))

    r = encrypt_disk(
        disk, output, partition=partition, method=method, protectors=specs, description=description, on_result=saved
    )
    res = r["result"]
    doc = {k: v for k, v in r.items() if k != "result"}
    doc.update(res.to_json())
    return Encrypted(
        report=_frozen(doc),
        output=os.fspath(output),
        volume_guid=res.volume_guid,
        method=res.method,
        protectors=tuple(str(p["type"]) for p in doc["protectors"]),
        keys=EncryptKeys(res.recovery_password, res.bek),
    )


@dataclass(frozen=True)
class EncryptedInPlace(_Result):
    """A disk encrypted (or finished) in place: ``resumed`` when an interrupted conversion was
    completed; ``keys`` holds the keys generated by a fresh run (none for a resumed one)."""

    disk: str = ""
    method: str = ""
    volume_size: int = 0
    resumed: bool = False
    protectors: tuple[str, ...] = ()
    keys: EncryptKeys = field(default_factory=EncryptKeys, repr=False)
    #: bytes left as they were (``used_space_only``: free and unallocated)
    skipped_bytes: int = 0


def _unlock_credential(
    recovery_password: Secret | None, password: Secret | None, startup_key: bytes | None
) -> dict[str, Any]:
    given = [x for x in (recovery_password, password, startup_key) if x is not None]
    if len(given) > 1:
        raise UsageError("give only one credential", hint="a recovery password, a password or a startup key")
    cred: dict[str, Any] = {}
    for name, v in (("recovery_password", recovery_password), ("password", password)):
        if v is not None:
            raw = resolve_secret(v)
            assert raw is not None
            cred[name] = raw.decode("utf-8")
    if startup_key is not None:
        cred["bek"] = startup_key
    return cred


def _in_place_result(r: Mapping[str, Any]) -> EncryptedInPlace:
    res = r["result"]
    doc = {k: v for k, v in r.items() if k != "result"}
    doc.update(res.to_json())
    return EncryptedInPlace(
        report=_frozen(doc),
        disk=str(doc["disk"]),
        method=str(doc.get("method", "")),
        volume_size=int(doc["volume_size"]),
        resumed=bool(doc["resumed"]),
        protectors=tuple(str(p["type"]) for p in doc.get("protectors", ())),
        keys=EncryptKeys(res.result.recovery_password, res.result.bek),
        skipped_bytes=int(doc.get("skipped_bytes", 0)),
    )


def encrypt_in_place(
    disk: PathLike,
    *,
    recovery_password: bool = False,
    startup_key: bool = False,
    password: Secret | None = None,
    tpm_seal: Callable[[bytes], tuple[bytes, int]] | None = None,
    partition: int | None = None,
    method: str = "xts-aes-128",
    description: str | None = None,
    resume_recovery_password: Secret | None = None,
    resume_password: Secret | None = None,
    resume_startup_key: bytes | None = None,
    on_keys: Callable[[EncryptKeys], None] | None = None,
    used_space_only: bool = False,
) -> EncryptedInPlace:
    """Encrypt the OS volume (or ``partition``) of ``disk`` with BitLocker in place, crash-safe.

    Protectors as for :func:`encrypt`; ``on_keys`` receives the generated keys before the first
    byte of the volume changes (store them durably: a crash needs them to resume). A disk in the
    middle of a conversion is resumed instead, with one ``resume_*`` credential (else ``password``
    when given). ``used_space_only``: spans free in NTFS *and* unallocated in the disk (reading
    as zeros) are left as they are, so time and a dynamic VHDX's size follow the used data
    (free space then decrypts to noise, as after Windows' used-space-only encryption).
    """
    from .bitlocker import in_place
    from .pipeline.encrypt import sparse_skipper

    specs = _protector_specs(recovery_password, startup_key, password, tpm_seal)
    cred = _unlock_credential(resume_recovery_password, resume_password, resume_startup_key)
    if not cred and password is not None:
        cred = _unlock_credential(None, password, None)

    def saved(res: Any) -> None:
        if on_keys is not None:
            on_keys(EncryptKeys(res.recovery_password, res.bek))

    r = in_place(
        disk,
        partition,
        protectors=specs,
        method=method,
        description=description,
        credential=cred or None,
        on_keys=saved,
        free_space=sparse_skipper if used_space_only else None,
    )
    return _in_place_result(r)


def resume(
    disk: PathLike,
    *,
    partition: int | None = None,
    recovery_password: Secret | None = None,
    password: Secret | None = None,
    startup_key: bytes | None = None,
) -> EncryptedInPlace:
    """Finish an interrupted :func:`encrypt_in_place` of ``disk`` with exactly one of the volume's
    credentials (``startup_key`` = the .BEK file's bytes); refused for a disk not mid-conversion."""
    from .bitlocker import in_place

    cred = _unlock_credential(recovery_password, password, startup_key)
    if not cred:
        raise UsageError(
            "resume needs the volume's credential", hint="a recovery password, a password or a startup key"
        )
    return _in_place_result(in_place(disk, partition, credential=cred, resume_only=True))


@dataclass(frozen=True)
class Decrypted(_Result):
    """A decrypted copy of a BitLocker disk."""

    output: str = ""
    method: str = ""
    free_space_skipped: bool = False


def decrypt(
    disk: PathLike,
    output: PathLike,
    *,
    recovery_password: Secret | None = None,
    password: Secret | None = None,
    startup_key: bytes | None = None,
    clear_key: bool = False,
    tpm: str | None = None,
    tpm_pin: Secret | None = None,
    partition: int | None = None,
) -> Decrypted:
    """Write a copy of ``disk`` with its BitLocker volume decrypted, unlocked by exactly one of
    ``recovery_password``, ``password``, ``startup_key`` (.BEK bytes), ``clear_key`` or ``tpm``
    (a TCTI that unseals the vTPM protector; ``tpm_pin`` for TPM+PIN)."""
    from .bitlocker.inplace import refuse_if_converting
    from .pipeline.encrypt import Credentials, decrypt_disk

    given = [x is not None and x is not False for x in (recovery_password, password, startup_key, clear_key, tpm)]
    if sum(given) != 1:
        raise UsageError(
            "give exactly one credential",
            hint="a recovery password, a password, a startup key, the clear key or a TPM",
            code="decrypt.credential",
        )
    if tpm_pin is not None and tpm is None:
        raise UsageError("a TPM PIN needs a TPM to unseal with", code="decrypt.pin-without-tpm")

    def text(s: Secret | None) -> str | None:
        v = resolve_secret(s)
        return None if v is None else v.decode("utf-8", "replace")

    cred = Credentials(
        recovery_password=text(recovery_password),
        password=text(password),
        bek=startup_key,
        clear=clear_key,
        tpm=tpm,
        tpm_pin=text(tpm_pin),
    )
    refuse_if_converting(os.fspath(disk), partition)
    r = decrypt_disk(disk, output, partition, cred)
    return Decrypted(
        report=_frozen(r),
        output=os.fspath(output),
        method=str(r["method"]),
        free_space_skipped=bool(r["free_space"]["used"]),
    )


@dataclass(frozen=True)
class DiskVolume:
    """One volume of a disk (a partition, or the whole bare volume)."""

    index: int
    offset: int
    size: int
    kind: str
    filesystem: str | None
    bitlocker: bool


@dataclass(frozen=True)
class DiskDescription(_Result):
    """What a disk holds: container format, partition scheme, volumes."""

    path: str = ""
    format: str = ""
    virtual_size: int = 0
    scheme: str | None = None
    volumes: tuple[DiskVolume, ...] = ()


def inspect(disk: PathLike) -> DiskDescription:
    """Describe ``disk`` (raw or VHDX): container, partitions, filesystems, BitLocker status."""
    from .pipeline.inspect import describe_disk

    r = describe_disk(disk)
    c = r["container"]
    return DiskDescription(
        report=_frozen(r),
        path=str(c["path"]),
        format=str(c["format"]),
        virtual_size=int(c["virtual_size"]),
        scheme=r["partition_table"]["scheme"],
        volumes=tuple(
            DiskVolume(
                int(v["index"]),
                int(v["offset"]),
                int(v["size"]),
                str(v["kind"]),
                v["filesystem"],
                v["bitlocker"] is not None,
            )
            for v in r["volumes"]
        ),
    )
