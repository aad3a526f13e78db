"""Parent (storage) keys: load a TPM2B_PUBLIC, PEM public key or EK/SRK certificate; compute its
TPM Name; create a software vTPM storage key pair (``vtpm new``).

A parent for TPM2_Import must be a restricted decrypt key (RSA or ECC) with a symmetric
algorithm (AES-CFB). When we only have a bare public key or a certificate, the TPMT_PUBLIC is
rebuilt from the TCG templates (SRK: TCG Provisioning Guidance; EK: TCG EK Credential Profile
L-1/L-2 default templates); the resulting Name equals the TPM's only if the key was created from
that template.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from construct import ConstructError
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..atomic import write_bytes_atomic
from ..errors import (
    CredentialError,
    FormatError,
    NotFoundError,
    ResourceError,
    UnsupportedError,
    UsageError,
)
from ..secrets import write_secret_file
from . import structs as s
from .algs import ALG_NAMES, hash_bytes

#: SRK attributes: fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA|restricted|decrypt.
SRK_ATTRIBUTES = 0x00030472
#: EK attributes: fixedTPM|fixedParent|sensitiveDataOrigin|adminWithPolicy|restricted|decrypt.
EK_ATTRIBUTES = 0x000300B2
#: PolicySecret(TPM_RH_ENDORSEMENT) — the default EK authPolicy (TCG EK Credential Profile).
EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")

#: A TPM2B_PUBLIC, PEM/DER public key, EK certificate or private key is a few KiB: refuse more unread.
MAX_KEY_FILE = 1 << 20

_CURVES: dict[int, tuple[str, type[ec.EllipticCurve], int]] = {
    s.ECC_NIST_P256: ("P-256", ec.SECP256R1, 32),
    s.ECC_NIST_P384: ("P-384", ec.SECP384R1, 48),
}
_CURVE_BY_NAME = {c().name: cid for cid, (_, c, _) in _CURVES.items()}


@dataclass(frozen=True)
class ParentKey:
    """A parent's public area and what the sealer needs from it."""

    public_area: bytes  # marshalled TPMT_PUBLIC
    type: int  # ALG_RSA or ALG_ECC
    name_alg: int
    attributes: int
    sym_bits: int
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    source: str = ""

    @property
    def name(self) -> bytes:
        """TPM Name = nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return object_name(self.public_area)

    @property
    def tpm2b_public(self) -> bytes:
        """The TPM2B_PUBLIC bytes, as ``tpm2_readpublic -o`` writes them."""
        return len(self.public_area).to_bytes(2, "big") + self.public_area

    @property
    def is_ek_style(self) -> bool:
        """True for an EK-like parent (no userWithAuth: Import/Load need PolicySecret(endorsement))."""
        return not self.attributes & s.ATTR_USER_WITH_AUTH

    def describe(self) -> dict[str, object]:
        """Summary for --json output (public data only)."""
        if isinstance(self.public_key, rsa.RSAPublicKey):
            kind = f"RSA-{self.public_key.key_size}"
        else:
            kind = f"ECC-{self.public_key.curve.name}"
        return {
            "type": kind,
            "name_alg": ALG_NAMES.get(self.name_alg, hex(self.name_alg)),
            "attributes": f"0x{self.attributes:08x}",
            "symmetric": f"AES-{self.sym_bits}-CFB",
            "name": self.name.hex(),
            "ek_style": self.is_ek_style,
            "source": self.source,
        }


def object_name(public_area: bytes) -> bytes:
    """Name of an object from its marshalled TPMT_PUBLIC: u16 nameAlg || H(TPMT_PUBLIC)."""
    if len(public_area) < 4:
        raise FormatError("public area too short to name")
    name_alg = int.from_bytes(public_area[2:4], "big")
    return name_alg.to_bytes(2, "big") + hash_bytes(name_alg, public_area)


def parse_parent_public(public_area: bytes, source: str = "parent") -> ParentKey:
    """Validate a marshalled TPMT_PUBLIC as an import parent and extract its key."""
    try:
        p = s.TPMT_PUBLIC.parse(public_area)
    except (ConstructError, ValueError) as e:
        raise FormatError(
            f"not a valid TPMT_PUBLIC: {_short(e)}",
            source,
            "give the parent's TPM2B_PUBLIC (tpm2_readpublic -o), a PEM public key or a certificate",
        ) from None
    if len(s.TPMT_PUBLIC.build(p)) != len(public_area):
        raise FormatError("trailing bytes after the TPMT_PUBLIC", source)
    if p.type not in (s.ALG_RSA, s.ALG_ECC):
        raise UnsupportedError(
            f"parent key type 0x{p.type:04x} is not RSA or ECC", source, "seal to the vTPM's SRK or EK"
        )
    if p.nameAlg not in ALG_NAMES or p.nameAlg == s.ALG_SM3_256:
        raise UnsupportedError(f"parent nameAlg 0x{p.nameAlg:04x} is not supported", source)
    attrs = p.objectAttributes
    if not (attrs & s.ATTR_RESTRICTED and attrs & s.ATTR_DECRYPT) or attrs & s.ATTR_SIGN:
        raise UnsupportedError(
            f"parent is not a restricted decryption (storage) key (attributes 0x{attrs:08x})",
            source,
            "use the SRK (0x81000001) or the EK public",
        )
    sym = p.parameters.symmetric
    if sym.algorithm != s.ALG_AES or sym.mode != s.ALG_CFB or sym.keyBits not in (128, 256):
        raise UnsupportedError("parent symmetric algorithm is not AES-128/256-CFB", source)
    if p.parameters.scheme.scheme != s.ALG_NULL:
        raise UnsupportedError("parent has a key scheme; storage parents use scheme NULL", source)
    try:
        if p.type == s.ALG_RSA:
            modulus = bytes(p.unique)
            if p.parameters.keyBits not in (1024, 2048, 3072, 4096) or len(modulus) * 8 != p.parameters.keyBits:
                raise FormatError(
                    f"RSA modulus of {len(modulus)} bytes does not match keyBits {p.parameters.keyBits}", source
                )
            exponent = p.parameters.exponent or 65537
            key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = rsa.RSAPublicNumbers(
                exponent, int.from_bytes(modulus, "big")
            ).public_key()
        else:
            curve = _CURVES.get(p.parameters.curveID)
            if curve is None:
                raise UnsupportedError(
                    f"ECC curve 0x{p.parameters.curveID:04x} is not supported", source, "use NIST P-256"
                )
            if p.parameters.kdf.scheme != s.ALG_NULL:
                raise UnsupportedError("ECC parent with a KDF scheme is not supported", source)
            x, y = bytes(p.unique.x), bytes(p.unique.y)
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve[1]()
            ).public_key()
    except ValueError as e:
        raise FormatError(f"parent public key is invalid: {e}", source) from None
    return ParentKey(public_area, p.type, p.nameAlg, attrs, sym.keyBits, key, source)


def template_public(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, kind: str = "srk") -> bytes:
    """A TPMT_PUBLIC for ``key`` built from the standard SRK or EK template (nameAlg SHA-256, AES-128-CFB)."""
    if kind not in ("srk", "ek"):
        raise UsageError(f"unknown template {kind!r}", hint="use srk or ek")
    attrs, policy = (SRK_ATTRIBUTES, b"") if kind == "srk" else (EK_ATTRIBUTES, EK_POLICY)
    sym = {"algorithm": s.ALG_AES, "keyBits": 128, "mode": s.ALG_CFB}
    null = {"scheme": s.ALG_NULL, "hashAlg": None, "count": None}
    if isinstance(key, rsa.RSAPublicKey):
        n = key.public_numbers()
        params = {"symmetric": sym, "scheme": null, "keyBits": key.key_size, "exponent": 0 if n.e == 65537 else n.e}
        unique: object = n.n.to_bytes((key.key_size + 7) // 8, "big")
        typ = s.ALG_RSA
    elif isinstance(key, ec.EllipticCurvePublicKey):
        cid = _CURVE_BY_NAME.get(key.curve.name)
        if cid is None:
            raise UnsupportedError(f"ECC curve {key.curve.name} is not supported", hint="use NIST P-256")
        size = _CURVES[cid][2]
        nums = key.public_numbers()
        params = {"symmetric": sym, "scheme": null, "curveID": cid, "kdf": null}
        unique = {"x": nums.x.to_bytes(size, "big"), "y": nums.y.to_bytes(size, "big")}
        typ = s.ALG_ECC
    else:
        raise UnsupportedError("parent key must be RSA or ECC")
    area: bytes = s.TPMT_PUBLIC.build(
        {
            "type": typ,
            "nameAlg": s.ALG_SHA256,
            "objectAttributes": attrs,
            "authPolicy": policy,
            "parameters": params,
            "unique": unique,
        }
    )
    return area


def load_parent(path: str | os.PathLike[str], template: str | None = None) -> ParentKey:
    """Load a parent from a TPM2B_PUBLIC file, a PEM/DER public key or an X.509 certificate.

    ``template`` ("srk" or "ek") chooses the template used to rebuild the public area of a bare
    key or certificate; the default is "ek" for certificates and "srk" for public keys.
    """
    p = Path(path)
    data = _read_small(p, "parent key", "give a TPM2B_PUBLIC, a PEM/DER public key or an EK/SRK certificate")
    return parse_parent_bytes(data, template, str(p))


def _read_small(p: Path, what: str, hint: str) -> bytes:
    """Read a key/certificate file of at most MAX_KEY_FILE bytes, refusing larger ones unread."""
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_KEY_FILE:
                raise FormatError(f"{what} file too large ({size} bytes, at most {MAX_KEY_FILE})", str(p), hint)
            data = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise NotFoundError(f"{what} file not found", str(p)) from None
    except IsADirectoryError:
        raise FormatError(f"{what} path is a directory", str(p), hint) from None
    except OSError as e:
        raise ResourceError(f"cannot read {what}: {e.strerror}", str(p)) from None
    if len(data) > MAX_KEY_FILE:  # a special file with no size, or one that grew while read
        raise FormatError(f"{what} file too large (over {MAX_KEY_FILE} bytes)", str(p), hint)
    return data


def parse_parent_bytes(data: bytes, template: str | None = None, source: str = "parent") -> ParentKey:
    """Like :func:`load_parent` on bytes."""
    if not data:
        raise FormatError("parent key file is empty", source)
    stripped = data.lstrip()
    if stripped.startswith(b"-----BEGIN"):
        if b"CERTIFICATE" in stripped.split(b"\n", 1)[0]:
            try:
                cert = x509.load_pem_x509_certificate(stripped)
            except (ValueError, x509.InvalidVersion) as e:
                raise FormatError(f"bad PEM certificate: {_short(e)}", source) from None
            return _from_key(_cert_public_key(cert, source), template or "ek", source)
        try:
            key = serialization.load_pem_public_key(stripped)
        except ValueError as e:
            raise FormatError(
                f"bad PEM public key: {_short(e)}",
                source,
                "give a PUBLIC KEY or CERTIFICATE PEM (never the private key)",
            ) from None
        except UnsupportedAlgorithm as e:
            raise UnsupportedError(
                f"parent public key algorithm not supported: {_short(e)}", source, "the parent key must be RSA or ECC"
            ) from None
        return _from_key(key, template or "srk", source)
    # TPM2B_PUBLIC (u16 size matches the file) or a raw TPMT_PUBLIC
    if len(data) >= 2 and int.from_bytes(data[:2], "big") == len(data) - 2:
        return parse_parent_public(data[2:], source)
    if data[:1] == b"\x30":  # DER
        try:
            cert = x509.load_der_x509_certificate(data)
        except (ValueError, x509.InvalidVersion):
            pass
        else:
            return _from_key(_cert_public_key(cert, source), template or "ek", source)
        try:
            return _from_key(serialization.load_der_public_key(data), template or "srk", source)
        except ValueError:
            pass
        except UnsupportedAlgorithm as e:
            raise UnsupportedError(
                f"parent public key algorithm not supported: {_short(e)}", source, "the parent key must be RSA or ECC"
            ) from None
    if len(data) >= 4 and int.from_bytes(data[:2], "big") in (s.ALG_RSA, s.ALG_ECC):
        return parse_parent_public(data, source)
    raise FormatError(
        "unrecognised parent key file",
        source,
        "give a TPM2B_PUBLIC (tpm2_readpublic -o), a PEM public key or an EK/SRK certificate",
    )


def _cert_public_key(cert: x509.Certificate, source: str) -> object:
    """The certificate's public key; an unknown key algorithm OID is refused, not a crash."""
    try:
        return cert.public_key()
    except UnsupportedAlgorithm as e:
        raise UnsupportedError(
            f"certificate public key algorithm not supported: {_short(e)}", source, "the parent key must be RSA or ECC"
        ) from None
    except ValueError as e:
        raise FormatError(f"bad certificate public key: {_short(e)}", source) from None


def _from_key(key: object, template: str, source: str) -> ParentKey:
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise UnsupportedError("parent key must be RSA or ECC", source)
    return parse_parent_public(template_public(key, template), source)


# --- software vTPM storage keys ----------------------------------------------------------------

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def generate_storage_key(kind: str = "rsa") -> PrivateKey:
    """A new software storage key: "rsa" (RSA-2048) or "ecc" (NIST P-256)."""
    if kind == "rsa":
        return rsa.generate_private_key(65537, 2048)
    if kind == "ecc":
        return ec.generate_private_key(ec.SECP256R1())
    raise UsageError(f"unknown key type {kind!r}", hint="use rsa or ecc")


@dataclass(frozen=True)
class NewVtpmKey:
    """Paths and public identity of a key made by :func:`create_vtpm_key`."""

    key_path: str
    pub_path: str
    pem_path: str
    parent: ParentKey

    def to_json(self) -> dict[str, object]:
        return {"key": self.key_path, "pub": self.pub_path, "pem": self.pem_path, **self.parent.describe()}


def create_vtpm_key(out: str | os.PathLike[str], kind: str = "rsa") -> NewVtpmKey:
    """Create ``OUT.key`` (PKCS#8 PEM private key, 0600), ``OUT.pub`` (TPM2B_PUBLIC, SRK template)
    and ``OUT.pem`` (public key PEM). The private key is never logged or echoed."""
    base = str(out)
    priv = generate_storage_key(kind)
    pub_area = template_public(priv.public_key(), "srk")
    parent = parse_parent_public(pub_area, base + ".pub")
    key_pem = priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_secret_file(base + ".key", key_pem)
    write_bytes_atomic(base + ".pub", parent.tpm2b_public)
    write_bytes_atomic(
        base + ".pem",
        priv.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    return NewVtpmKey(base + ".key", base + ".pub", base + ".pem", parent)


def load_private_key(path: str | os.PathLike[str], password: bytes | None = None) -> PrivateKey:
    """Load a vTPM storage private key (PEM or DER, PKCS#8 or traditional)."""
    p = Path(path)
    data = _read_small(p, "private key", "give the PEM or DER storage private key")
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_private_key(data, password)
        else:
            key = serialization.load_der_private_key(data, password)
    except UnsupportedAlgorithm:
        raise UnsupportedError("private key algorithm not supported", str(p), "the key must be RSA or ECC") from None
    except (ValueError, TypeError):
        # never echo the underlying message: it may quote key bytes
        raise CredentialError("cannot load the private key (wrong format or password)", str(p)) from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise UnsupportedError("private key must be RSA or ECC", str(p))
    return key


def key_matches_parent(key: PrivateKey, parent: ParentKey) -> bool:
    """True when ``key`` is the private half of ``parent``."""
    return key.public_key().public_numbers() == parent.public_key.public_numbers()


def _short(e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg[:160]


__all__ = [
    "create_vtpm_key",
    "generate_storage_key",
    "key_matches_parent",
    "load_parent",
    "load_private_key",
    "object_name",
    "parse_parent_bytes",
    "parse_parent_public",
    "template_public",
]
