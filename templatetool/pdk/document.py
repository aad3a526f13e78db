"""The PDK documents: the clear (signed) document and the secret (enveloped) part — canonical JSON.

Spec: docs/formats/pdk.md. Canonical form = UTF-8 JSON, keys sorted, separators ``,``/``:``,
no floats, no duplicate keys; readers refuse any other byte form.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..canonical import canonical_json, load_canonical
from ..errors import FormatError, UsageError

PDK_FORMAT = "templatetool-pdk"
PDK_SECRET_FORMAT = "templatetool-pdk-secret"
PDK_VERSION = 1
POLICIES = ("shielded", "encryption-supported")
#: Microsoft's limit on the -OtherFile total (New-ShieldingDataFile): 384 KB.
OTHER_FILES_LIMIT = 384 * 1024
#: Our own cap on the answer file (not a Microsoft limit).
ANSWER_FILE_LIMIT = 1024 * 1024
#: Our own cap on the number of other files (not a Microsoft limit): the 384 KB total bounds the
#: bytes, this bounds the per-file overhead (a PDK of 10^5 empty files would need 100s of MiB).
OTHER_FILES_MAX_COUNT = 1000
SPEC_KEY_RE = re.compile(r"^@[A-Za-z0-9][A-Za-z0-9_-]{0,62}@$")
#: Substitution strings Microsoft documents for shielded unattend files (N, M are numbers).
KNOWN_SPEC_KEYS = re.compile(
    r"^@(ComputerName|TimeZone|ProductKey|IP4Addr-\d+|IP6Addr-\d+|MACAddr-\d+|"
    r"Prefix-\d+-\d+|NextHop-\d+-\d+)@$"
)
_FILE_NAME_RE = re.compile(r"^[^\x00-\x1f/\\:*?\"<>|]{1,255}$")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise FormatError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{what} is not valid base64") from None


def cert_b64(cert: x509.Certificate) -> str:
    return b64(cert.public_bytes(serialization.Encoding.DER))


def cert_from_b64(text: object, what: str) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(unb64(text, what))
        cert.public_key()  # parsed lazily: a damaged key must fail here
        return cert
    except Exception:
        raise FormatError(f"{what} is not a valid X.509 certificate") from None


# ------------------------------------------------------------------------------------------------
# Secret part
# ------------------------------------------------------------------------------------------------


@dataclass
class NamedFile:
    """A file carried in the secret part."""

    name: str
    data: bytes

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": len(self.data)}


def check_file_name(name: str) -> str:
    if not _FILE_NAME_RE.match(name) or name in (".", ".."):
        raise UsageError(f"bad file name {name!r} for the shielding data", hint="use a plain file name")
    return name


@dataclass
class SecretPart:
    """Answer file, other files and specialization values (``@Key@`` → value)."""

    answer_file: NamedFile | None = None
    other_files: list[NamedFile] = field(default_factory=list)
    specialization_values: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Microsoft's limits and our own sanity checks (UsageError)."""
        if len(self.other_files) > OTHER_FILES_MAX_COUNT:
            raise UsageError(
                f"too many other files ({len(self.other_files)}, at most {OTHER_FILES_MAX_COUNT})",
                hint="bundle them into one archive file",
            )
        total = sum(len(f.data) for f in self.other_files)
        if total > OTHER_FILES_LIMIT:
            raise UsageError(
                "The total size of the files specified by OtherFile exceeds the limit of 384 KB.",
                f"{total} bytes in {len(self.other_files)} file(s)",
                "ship large files another way (e.g. inside the template)",
            )
        if self.answer_file is not None:
            check_file_name(self.answer_file.name)
            if len(self.answer_file.data) > ANSWER_FILE_LIMIT:
                raise UsageError("the answer file is larger than 1 MiB", self.answer_file.name)
        names = set()
        for f in self.other_files:
            check_file_name(f.name)
            if f.name.lower() in names:
                raise UsageError(f"two other files are named {f.name!r}", hint="rename one of them")
            names.add(f.name.lower())
        for k, v in self.specialization_values.items():
            if not SPEC_KEY_RE.match(k):
                raise UsageError(f"bad specialization key {k!r}", hint="keys look like @ComputerName@")
            if not isinstance(v, str) or not v:
                raise UsageError(f"specialization value for {k} is empty", hint="give KEY=VALUE with a non-empty value")

    def placeholders_without_values(self) -> list[str]:
        """``@Key@`` strings used by the answer file that have no value (specialization would fail)."""
        if self.answer_file is None:
            return []
        text = self.answer_file.data.decode("utf-8", "replace")
        used = set(re.findall(r"@[A-Za-z0-9][A-Za-z0-9_-]{0,62}@", text))
        return sorted(k for k in used if k not in self.specialization_values)

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "format": PDK_SECRET_FORMAT,
                "version": PDK_VERSION,
                "answer_file": None
                if self.answer_file is None
                else {"name": self.answer_file.name, "data": b64(self.answer_file.data)},
                "other_files": [{"name": f.name, "data": b64(f.data)} for f in self.other_files],
                "specialization_values": dict(self.specialization_values),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SecretPart:
        """Parse and check the decrypted secret part (FormatError)."""
        # Cheap bound before building the JSON objects: in canonical JSON every file object has one
        # "name": key (escaped quotes inside strings cannot produce this byte sequence).
        if data.count(b'"name":') > OTHER_FILES_MAX_COUNT + 1:
            raise FormatError(
                f"PDK secret part holds more than {OTHER_FILES_MAX_COUNT} other files",
                "PDK secret part",
                "the PDK was not made by a conforming writer",
            )
        d = load_canonical(data, "PDK secret part")
        try:
            if d["format"] != PDK_SECRET_FORMAT or d["version"] != PDK_VERSION:
                raise FormatError(f"unsupported PDK secret part {d['format']!r} v{d['version']!r}")
            af = d["answer_file"]
            answer = None if af is None else NamedFile(str(af["name"]), unb64(af["data"], "answer file"))
            if not isinstance(d["other_files"], list) or len(d["other_files"]) > OTHER_FILES_MAX_COUNT:
                raise FormatError(f"PDK secret part: other_files is not a list of at most {OTHER_FILES_MAX_COUNT}")
            others = [NamedFile(str(f["name"]), unb64(f["data"], "other file")) for f in d["other_files"]]
            sv = d["specialization_values"]
            if not isinstance(sv, dict) or not all(isinstance(v, str) for v in sv.values()):
                raise FormatError("bad specialization values")
        except (KeyError, TypeError) as e:
            raise FormatError(f"incomplete PDK secret part ({e})") from None
        return cls(answer, others, dict(sv))

    def to_json(self) -> dict[str, Any]:
        """Description without file contents; values are shown (they are the tenant's own)."""
        return {
            "answer_file": None if self.answer_file is None else self.answer_file.to_json(),
            "other_files": [f.to_json() for f in self.other_files],
            "other_files_total": sum(len(f.data) for f in self.other_files),
            "specialization_values": dict(self.specialization_values),
        }
