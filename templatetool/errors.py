"""The typed error hierarchy every layer raises.

Each error carries *what* went wrong, *where* (a file, offset or field), a *hint* (what to do,
in library terms: never a command-line flag) and a stable *code* (``"pki.expired"``, or the
class-level code such as ``"format"``) that programs may match on. The CLI prints one line and
exits with ``err.exit_code``; where a hint is best said as a flag, the CLI maps the code to its
own wording (``templatetool.cli.common.CLI_HINTS``). Exit codes are documented in
docs/exit-codes.md and must not change meaning. Messages never carry secrets.
"""

from __future__ import annotations


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class TemplateToolError(Exception):
    """Base class. ``exit_code`` is the documented process exit status for this kind of failure."""

    exit_code = 1
    kind = "error"
    #: The stable machine-readable code of this error (the class's kind unless given).
    code: str = "error"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            cls.code = cls.kind

    def __init__(
        self, what: str, where: str | None = None, hint: str | None = None, *, code: str | None = None
    ) -> None:
        # one line, always: messages from parsers (lxml, asn1crypto ...) may carry newlines
        if code is not None:
            self.code = code
        self.what = _one_line(what)
        self.where = _one_line(where) if where is not None else None
        self.hint = _one_line(hint) if hint is not None else None
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"({self.where})")
        msg = " ".join(parts)
        if self.hint:
            msg += f"; {self.hint}"
        return msg

    def to_json(self) -> dict[str, object]:
        """A machine-readable form for ``--json`` output."""
        return {
            "error": self.kind,
            "code": self.code,
            "exit_code": self.exit_code,
            "message": self.what,
            "where": self.where,
            "hint": self.hint,
        }


class UsageError(TemplateToolError):
    """Bad command-line usage or incompatible options (exit 2)."""

    exit_code = 2
    kind = "usage"


class FormatError(TemplateToolError):
    """An input file is malformed or not of the expected format (exit 3)."""

    exit_code = 3
    kind = "format"


class IntegrityError(FormatError):
    """A checksum, MAC or signature does not verify: tampering or corruption (exit 4)."""

    exit_code = 4
    kind = "integrity"


class CredentialError(TemplateToolError):
    """A password, key file or private key is wrong or missing (exit 5)."""

    exit_code = 5
    kind = "credential"


class PolicyError(TemplateToolError):
    """A precondition or policy check refused the operation (preflight, attestation...) (exit 6)."""

    exit_code = 6
    kind = "policy"


class UnsupportedError(TemplateToolError):
    """Valid input using a feature we do not support (exit 7)."""

    exit_code = 7
    kind = "unsupported"


class ResourceError(TemplateToolError):
    """The environment failed: I/O error, disk full, missing external tool (exit 8)."""

    exit_code = 8
    kind = "resource"


class NotFoundError(TemplateToolError):
    """A named input (file, partition, parent disk, protector) does not exist (exit 9)."""

    exit_code = 9
    kind = "not-found"


__all__ = [
    "CredentialError",
    "FormatError",
    "IntegrityError",
    "NotFoundError",
    "PolicyError",
    "ResourceError",
    "TemplateToolError",
    "UnsupportedError",
    "UsageError",
]
