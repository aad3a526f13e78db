"""Offline TPM2_Import blobs for sealed-data (KEYEDHASH) objects (TPM 2.0 Part 1 "Duplication",
Part 3 TPM2_Import) and the matching software unwrap.

Blob = TPM2B_PUBLIC (the sealed object) + TPM2B_PRIVATE (outer-wrapped duplicate) +
TPM2B_ENCRYPTED_SECRET (the seed encrypted to the parent). No inner wrapper.

* seed: RSA parent — random digest-size bytes, RSA-OAEP(H_parent, label "DUPLICATE\\0");
  ECC parent — ephemeral ECDH, seed = KDFe(H_parent, Z, "DUPLICATE", eph.x, parent.x).
* symKey = KDFa(H_parent, seed, "STORAGE", Name, "", parent sym bits),
  hmacKey = KDFa(H_parent, seed, "INTEGRITY", "", "", digest bits).
* duplicate = TPM2B(HMAC(hmacKey, encSens || Name)) || AES-CFB(symKey, IV 0, TPM2B_SENSITIVE).

KDFa is cryptography's KBKDFHMAC (SP 800-108 counter mode), KDFe is its ConcatKDFHash
(SP 800-56A); no hand-written crypto here.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from typing import Any

from construct import ConstructError

try:  # cryptography >= 43 moved CFB to "decrepit" (still the TPM's only symmetric mode)
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from ..errors import CredentialError, FormatError, IntegrityError, UsageError
from . import structs as s
from .algs import digest_size, hash_alg, hash_bytes
from .keys import ParentKey, PrivateKey, key_matches_parent, object_name

DUPLICATE_LABEL = b"DUPLICATE\x00"
#: MAX_SYM_DATA: the largest secret a sealed-data object can hold.
MAX_SEALED = 128


def kdfa(alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """TPM KDFa (SP 800-108 HMAC counter mode; the label gets a 0x00 separator, L is in bits)."""
    if bits % 8:
        raise UsageError("KDFa output must be whole bytes")
    kdf = KBKDFHMAC(
        algorithm=hash_alg(alg),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context_u + context_v,
        fixed=None,
    )
    return kdf.derive(key)


def kdfe(alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """TPM KDFe (SP 800-56A concatenation KDF; ``label`` must include its terminating NUL)."""
    kdf = ConcatKDFHash(algorithm=hash_alg(alg), length=bits // 8, otherinfo=label + party_u + party_v)
    return kdf.derive(z)


def _aes_cfb(key: bytes, data: bytes, decrypt: bool) -> bytes:
    c = Cipher(algorithms.AES(key), CFB(bytes(16)))
    op = c.decryptor() if decrypt else c.encryptor()
    return op.update(data) + op.finalize()


def _coord_size(curve: ec.EllipticCurve) -> int:
    return (curve.key_size + 7) // 8


def make_seed(parent: ParentKey) -> tuple[bytes, bytes]:
    """A fresh seed and its encryption to ``parent`` (the TPM2B_ENCRYPTED_SECRET contents)."""
    n = digest_size(parent.name_alg)
    if isinstance(parent.public_key, rsa.RSAPublicKey):
        seed = os.urandom(n)
        h = hash_alg(parent.name_alg)
        enc = parent.public_key.encrypt(seed, padding.OAEP(padding.MGF1(h), h, DUPLICATE_LABEL))
        return seed, enc
    curve = parent.public_key.curve
    size = _coord_size(curve)
    eph = ec.generate_private_key(curve)
    z = eph.exchange(ec.ECDH(), parent.public_key)  # x-coordinate, padded to the field size
    en = eph.public_key().public_numbers()
    ex, ey = en.x.to_bytes(size, "big"), en.y.to_bytes(size, "big")
    px = parent.public_key.public_numbers().x.to_bytes(size, "big")
    seed = kdfe(parent.name_alg, z, DUPLICATE_LABEL, ex, px, 8 * n)
    return seed, s.TPMS_ECC_POINT.build({"x": ex, "y": ey})


def recover_seed(parent: ParentKey, key: PrivateKey, in_sym_seed: bytes) -> bytes:
    """Decrypt the seed with the parent's private key (the TPM's side of Import, in software)."""
    if not key_matches_parent(key, parent):
        raise CredentialError("the private key is not the parent's key", hint="use the vTPM key the blob was sealed to")
    n = digest_size(parent.name_alg)
    if isinstance(key, rsa.RSAPrivateKey):
        h = hash_alg(parent.name_alg)
        try:
            return key.decrypt(in_sym_seed, padding.OAEP(padding.MGF1(h), h, DUPLICATE_LABEL))
        except ValueError:
            raise IntegrityError("the encrypted seed does not decrypt under the parent key") from None
    try:
        pt = s.TPMS_ECC_POINT.parse(in_sym_seed)
        size = _coord_size(key.curve)
        eph = ec.EllipticCurvePublicNumbers(
            int.from_bytes(pt.x, "big"), int.from_bytes(pt.y, "big"), key.curve
        ).public_key()
    except (ConstructError, ValueError):
        raise FormatError("the encrypted seed is not a valid ECC point") from None
    z = key.exchange(ec.ECDH(), eph)
    px = key.public_key().public_numbers().x.to_bytes(size, "big")
    return kdfe(parent.name_alg, z, DUPLICATE_LABEL, bytes(pt.x).rjust(size, b"\0"), px, 8 * n)


def sealed_object(
    secret: bytes, auth_policy: bytes, auth_value: bytes = b"", *, name_alg: int = s.ALG_SHA256
) -> tuple[bytes, bytes]:
    """(TPMT_PUBLIC, TPMT_SENSITIVE) of a policy-only sealed-data object holding ``secret``.

    Attributes are safe by construction: userWithAuth clear (unseal needs the policy),
    adminWithPolicy set, fixedTPM/fixedParent clear (Import refuses them), sign/decrypt clear;
    noDA set only without an auth value, so wrong PINs count towards dictionary-attack lockout.
    """
    n = digest_size(name_alg)
    if not 0 < len(secret) <= MAX_SEALED:
        raise UsageError(f"secret must be 1..{MAX_SEALED} bytes, got {len(secret)}")
    if len(auth_policy) != n:
        raise UsageError("authPolicy size does not match the object's nameAlg")
    if len(auth_value) > n:
        raise UsageError("auth value longer than the nameAlg digest")
    attrs = s.ATTR_ADMIN_WITH_POLICY | (0 if auth_value else s.ATTR_NO_DA)
    seed_value = os.urandom(n)
    public = s.TPMT_PUBLIC.build(
        {
            "type": s.ALG_KEYEDHASH,
            "nameAlg": name_alg,
            "objectAttributes": attrs,
            "authPolicy": auth_policy,
            "parameters": {"scheme": {"scheme": s.ALG_NULL, "hashAlg": None, "kdf": None}},
            "unique": hash_bytes(name_alg, seed_value, secret),
        }
    )
    sensitive = s.TPMT_SENSITIVE.build(
        {"sensitiveType": s.ALG_KEYEDHASH, "authValue": auth_value, "seedValue": seed_value, "sensitive": secret}
    )
    return public, sensitive


def wrap(parent: ParentKey, public_area: bytes, sensitive: bytes) -> tuple[bytes, bytes]:
    """Outer-wrap ``sensitive`` (TPMT_SENSITIVE) for ``parent``: (duplicate, inSymSeed)."""
    seed, in_sym_seed = make_seed(parent)
    name = object_name(public_area)
    sym_key = kdfa(parent.name_alg, seed, b"STORAGE", name, b"", parent.sym_bits)
    hmac_key = kdfa(parent.name_alg, seed, b"INTEGRITY", b"", b"", 8 * digest_size(parent.name_alg))
    enc = _aes_cfb(sym_key, len(sensitive).to_bytes(2, "big") + sensitive, decrypt=False)
    mac = hmac.new(hmac_key, enc + name, hash_alg(parent.name_alg).name).digest()
    return s.DUPLICATE_BODY.build({"outerHMAC": mac, "encSensitive": enc}), in_sym_seed


def unwrap(parent: ParentKey, key: PrivateKey, public_area: bytes, duplicate: bytes, in_sym_seed: bytes) -> Any:
    """Undo :func:`wrap` with the parent's private key; checks the outer HMAC and the
    unique = H(seedValue || data) binding like TPM2_Import. Returns the parsed TPMT_SENSITIVE."""
    seed = recover_seed(parent, key, in_sym_seed)
    name = object_name(public_area)
    try:
        body = s.DUPLICATE_BODY.parse(duplicate)
    except ConstructError:
        raise FormatError("duplicate (TPM2B_PRIVATE) is truncated") from None
    hmac_key = kdfa(parent.name_alg, seed, b"INTEGRITY", b"", b"", 8 * digest_size(parent.name_alg))
    mac = hmac.new(hmac_key, bytes(body.encSensitive) + name, hash_alg(parent.name_alg).name).digest()
    if not hmac.compare_digest(mac, bytes(body.outerHMAC)):
        raise IntegrityError(
            "outer HMAC of the sealed blob does not verify", hint="the blob was altered or sealed to another parent"
        )
    sym_key = kdfa(parent.name_alg, seed, b"STORAGE", name, b"", parent.sym_bits)
    plain = _aes_cfb(sym_key, bytes(body.encSensitive), decrypt=True)
    try:
        sens = s.TPM2B_SENSITIVE.parse(plain).sensitiveArea
        pub = s.TPMT_PUBLIC.parse(public_area)
    except ConstructError:
        raise IntegrityError("decrypted sensitive area is malformed") from None
    if sens.sensitiveType != pub.type or bytes(pub.unique) != hash_bytes(pub.nameAlg, sens.seedValue, sens.sensitive):
        raise IntegrityError("sealed object binding (unique = H(seed || data)) does not verify")
    return sens


@dataclass(frozen=True)
class SealedBlob:
    """An import blob: marshalled TPMT_PUBLIC, TPM2B_PRIVATE contents, TPM2B_ENCRYPTED_SECRET contents."""

    public: bytes
    duplicate: bytes
    in_sym_seed: bytes

    @property
    def name(self) -> bytes:
        """The sealed object's Name."""
        return object_name(self.public)

    def tpm2b_public(self) -> bytes:
        return len(self.public).to_bytes(2, "big") + self.public

    def tpm2b_private(self) -> bytes:
        return len(self.duplicate).to_bytes(2, "big") + self.duplicate

    def tpm2b_encrypted_secret(self) -> bytes:
        return len(self.in_sym_seed).to_bytes(2, "big") + self.in_sym_seed


def seal_offline(parent: ParentKey, secret: bytes, auth_policy: bytes, auth_value: bytes = b"") -> SealedBlob:
    """Seal ``secret`` for ``parent`` under ``auth_policy`` (optionally with an auth value/PIN)."""
    public, sensitive = sealed_object(secret, auth_policy, auth_value)
    dup, seed = wrap(parent, public, sensitive)
    return SealedBlob(public, dup, seed)
