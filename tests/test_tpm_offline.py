"""Offline TPM pieces with no TPM: known-answer policy digests, the import blob undone by
tpm2-pytss's independent ``utils.unwrap``, software unseal checks, parent loading, event-log
parsing, malformed inputs and the CLI's one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest
from conftest import assert_clean_error, require_module, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from templatetool.errors import (
    CredentialError,
    FormatError,
    IntegrityError,
    PolicyError,
    TemplateToolError,
    UnsupportedError,
    UsageError,
)
from templatetool.tpm import keys, policy
from templatetool.tpm import structs as s
from templatetool.tpm.eventlog import parse_log, replay_log, write_agile_log, write_sha1_log
from templatetool.tpm.protector import (
    make_sealer,
    parse_protector,
    pin_auth_value,
    seal_to_parent,
    unseal_with_software_key,
)

Z32 = bytes(32)


def test_policy_known_answers():
    # PolicyPCR(sha256 PCR7 = zeros) and PolicyAuthValue from zeros (published/TPM-computed values)
    assert policy.compute_policy("sha256", {7: Z32}).digest.hex() == \
        "8b5682d81b29435d08d79278150611dc7e5923b2fefcce684a09577b40130a8b"
    assert policy.extend_policy_auth_value(Z32).hex() == \
        "8fcd2169ab92694e0c633f1ab772842b8241bbc20288981fc7ac1eddc1fddb0e"
    assert policy.pcr_selection("sha256", [7, 11]).hex() == "00000001000b03800800"
    # the EK policy constant is PolicySecret(TPM_RH_ENDORSEMENT) from zeros
    # (D' = H(D || CC || Name(TPM_RH_ENDORSEMENT) = handle), then PolicyUpdate: H(D' || policyRef ""))
    d = hashlib.sha256(Z32 + s.CC_POLICY_SECRET.to_bytes(4, "big") + bytes.fromhex("4000000b")).digest()
    assert hashlib.sha256(d).digest() == keys.EK_POLICY


def test_policy_rejects_bad_values():
    with pytest.raises(UsageError):
        policy.compute_policy("sha256", {7: bytes(20)})
    with pytest.raises(UsageError):
        policy.compute_policy("sha256", {24: Z32})
    with pytest.raises(UsageError):
        policy.parse_pcr_values("7=zz", "sha256")


def test_ek_template_matches_tpm2_pytss():
    require_module("tpm2_pytss")
    from tpm2_pytss.utils import NoSuchIndex, create_ek_template

    def nv(i):
        raise NoSuchIndex(i)

    _, tmpl = create_ek_template("EK-RSA2048", nv)
    assert int(tmpl.publicArea.objectAttributes) == keys.EK_ATTRIBUTES
    assert bytes(tmpl.publicArea.authPolicy) == keys.EK_POLICY


def _parent_private(key):
    from cryptography.hazmat.primitives import serialization
    from tpm2_pytss import TPM2B_PUBLIC, TPMT_SENSITIVE

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return TPMT_SENSITIVE.from_pem(pem), TPM2B_PUBLIC


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
@pytest.mark.parametrize("pin", [None, "2468"])
def test_blob_unwrapped_by_tpm2_pytss(kind, pin):
    """tpm2-pytss utils.unwrap (independent implementation) recovers our sealed secret, with the
    safe attributes, given the parent's private key; our software unseal agrees."""
    require_module("tpm2_pytss")
    from tpm2_pytss import TPM2B_ENCRYPTED_SECRET, TPM2B_PRIVATE, TPM2B_PUBLIC
    from tpm2_pytss.utils import unwrap

    key = keys.generate_storage_key(kind)
    parent = keys.parse_parent_public(keys.template_public(key.public_key()))
    secret = os.urandom(44)
    vals = {7: os.urandom(32), 11: os.urandom(32)}
    payload = seal_to_parent(parent, secret, "sha256", vals, pin=pin)
    prot = parse_protector(payload)
    sens_priv, _ = _parent_private(key)
    ppub = TPM2B_PUBLIC.unmarshal(parent.tpm2b_public)[0]
    out = unwrap(ppub.publicArea, sens_priv, TPM2B_PUBLIC.unmarshal(prot.blob.tpm2b_public())[0],
                 TPM2B_PRIVATE.unmarshal(prot.blob.tpm2b_private())[0],
                 TPM2B_ENCRYPTED_SECRET.unmarshal(prot.blob.tpm2b_encrypted_secret())[0])
    assert bytes(out.sensitiveArea.sensitive.bits) == secret
    assert bytes(out.sensitiveArea.authValue) == (pin_auth_value(pin) if pin else b"")
    pub = s.TPMT_PUBLIC.parse(prot.blob.public)
    a = pub.objectAttributes
    assert not a & (s.ATTR_USER_WITH_AUTH | s.ATTR_FIXED_TPM | s.ATTR_FIXED_PARENT | s.ATTR_SIGN | s.ATTR_DECRYPT)
    assert a & s.ATTR_ADMIN_WITH_POLICY
    assert bool(a & s.ATTR_NO_DA) == (pin is None)
    assert bytes(pub.authPolicy) == policy.compute_policy("sha256", vals, auth_value=pin is not None).digest
    assert prot.parent_name == parent.name and prot.pcrs == (7, 11)
    assert unseal_with_software_key(payload, key, vals, pin) == secret


def test_software_unseal_enforces_policy_pin_key_and_integrity():
    key = keys.generate_storage_key("ecc")
    parent = keys.parse_parent_public(keys.template_public(key.public_key()))
    vals = {7: os.urandom(32)}
    payload = seal_to_parent(parent, b"s" * 32, "sha256", vals, pin="1111")
    assert unseal_with_software_key(payload, key, vals, "1111") == b"s" * 32
    with pytest.raises(PolicyError):
        unseal_with_software_key(payload, key, {7: os.urandom(32)}, "1111")
    with pytest.raises(CredentialError):
        unseal_with_software_key(payload, key, vals, "1112")
    with pytest.raises(CredentialError):
        unseal_with_software_key(payload, key, vals, None)
    with pytest.raises(CredentialError):
        unseal_with_software_key(payload, keys.generate_storage_key("ecc"), vals, "1111")
    prot = parse_protector(payload)
    for blob in (prot.blob.duplicate, prot.blob.in_sym_seed, prot.blob.public):
        bad = bytearray(payload)
        bad[payload.index(blob) + len(blob) // 2] ^= 0x40
        with pytest.raises((IntegrityError, FormatError)):
            unseal_with_software_key(bytes(bad), key, vals, "1111")


def test_make_sealer_from_log_and_files(tmp_path):
    key = keys.generate_storage_key("rsa")
    parent = keys.parse_parent_public(keys.template_public(key.public_key()))
    (tmp_path / "p.pub").write_bytes(parent.tpm2b_public)
    d7 = hashlib.sha256(b"x").digest()
    log = write_agile_log([(7, 0x80000001, {s.ALG_SHA256: d7, s.ALG_SHA1: hashlib.sha1(b"x").digest()}, b"x")])
    (tmp_path / "log").write_bytes(log)
    seal = make_sealer(str(tmp_path / "p.pub"), [7, 11], tcg_log=str(tmp_path / "log"))
    entry = bytes.fromhex("2c000000010001000320000000") [:12] + os.urandom(32)
    payload, mask = seal(entry)
    assert mask == 0x880
    v7 = hashlib.sha256(Z32 + d7).digest()
    assert unseal_with_software_key(payload, key, {7: v7, 11: Z32}) == entry
    with pytest.raises(UsageError):
        make_sealer(parent, [7], {7: Z32}, tcg_log=log)


def test_parent_formats_give_the_same_name(tmp_path):
    res = keys.create_vtpm_key(tmp_path / "v", "rsa")
    assert stat.S_IMODE(os.stat(res.key_path).st_mode) == 0o600
    a = keys.load_parent(res.pub_path)
    b = keys.load_parent(res.pem_path)
    assert a.name == b.name == res.parent.name
    assert keys.load_parent(res.pem_path, "ek").name != a.name
    pk = keys.load_private_key(res.key_path)
    assert keys.key_matches_parent(pk, a)
    # DER public key and raw TPMT_PUBLIC also accepted
    from cryptography.hazmat.primitives import serialization
    der = pk.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert keys.parse_parent_bytes(der).name == a.name
    assert keys.parse_parent_bytes(a.public_area).name == a.name


@pytest.mark.parametrize("data,err", [
    (b"", FormatError), (b"\x00\x05abc", FormatError), (b"hello world, not a key", FormatError),
    (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", FormatError),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", FormatError),
])
def test_malformed_parents(data, err):
    with pytest.raises(err):
        keys.parse_parent_bytes(data)


def test_non_storage_parent_refused():
    key = keys.generate_storage_key("rsa")
    area = bytearray(keys.template_public(key.public_key()))
    area[4:8] = (int.from_bytes(area[4:8], "big") & ~s.ATTR_RESTRICTED).to_bytes(4, "big")
    with pytest.raises(UnsupportedError):
        keys.parse_parent_public(bytes(area))
    area = bytearray(keys.template_public(key.public_key()))
    area[-1] ^= 0xFF  # still parses: a different modulus -> different key, fine; truncate instead
    with pytest.raises(FormatError):
        keys.parse_parent_public(bytes(area[:-3]))


def test_event_log_formats_and_locality():
    banks = {s.ALG_SHA256: 32}
    d = hashlib.sha256(b"crtm").digest()
    log = write_agile_log([(0, 0x8, {s.ALG_SHA256: d}, b"crtm")], banks, startup_locality=3)
    r = replay_log(log)
    assert r.startup_locality == 3
    assert r.values_by_bank["sha256"][0] == hashlib.sha256(bytes(31) + b"\x03" + d).digest()
    assert r.values_by_bank["sha256"][18] == b"\xff" * 32
    # trailing zero padding (logs copied from the ACPI area) is ignored
    assert replay_log(log + bytes(100)).values_by_bank == r.values_by_bank
    legacy = write_sha1_log([(4, 0x80000003, hashlib.sha1(b"a").digest(), b"a")] * 2)
    r1 = replay_log(legacy)
    v = bytes(20)
    for _ in range(2):
        v = hashlib.sha1(v + hashlib.sha1(b"a").digest()).digest()
    assert r1.values_by_bank["sha1"][4] == v and r1.measured == [4]


def test_malformed_logs():
    good = write_agile_log([(7, 1, {s.ALG_SHA256: Z32, s.ALG_SHA1: bytes(20)}, b"abc")])
    hdr_end = len(good) - (12 + 2 + 32 + 2 + 20 + 4 + 3)
    undeclared = bytearray(good)
    undeclared[hdr_end + 12] = 0x99  # digest algorithm not declared in the Spec ID header
    for bad in (b"", b"x" * 10, good[:-2], good[:-40], bytes(undeclared), good[:hdr_end] + b"\x07\x00"):
        with pytest.raises(FormatError):
            parse_log(bad)
    bad_pcr = bytearray(good)
    bad_pcr[hdr_end] = 40
    with pytest.raises(FormatError):
        parse_log(bytes(bad_pcr))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 300))
def test_fuzz_parsers_raise_only_typed_errors(noise, cut):
    good = write_agile_log([(7, 1, {s.ALG_SHA256: Z32, s.ALG_SHA1: bytes(20)}, b"abc")])
    payload = seal_to_parent(_FUZZ_PARENT, b"k" * 32, "sha256", {7: Z32})
    for data in (noise, good[:cut] + noise, payload[:cut] + noise, s.PROTECTOR_MAGIC + noise):
        for fn in (replay_log, parse_protector, keys.parse_parent_bytes):
            try:
                fn(data)
            except TemplateToolError:
                pass


_FUZZ_PARENT = keys.parse_parent_public(keys.template_public(keys.generate_storage_key("ecc").public_key()))


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_vtpm_policy_pcrs_seal_unseal(tmp_path):
    cp = run_cli("vtpm", "new", "-o", str(tmp_path / "vm"), "--type", "ecc", "--json")
    assert cp.returncode == 0, cp.stderr
    info = json.loads(cp.stdout)["result"]
    assert stat.S_IMODE(os.stat(tmp_path / "vm.key").st_mode) == 0o600
    assert "PRIVATE" not in cp.stdout + cp.stderr
    assert keys.load_parent(tmp_path / "vm.pub").name.hex() == info["name"]
    cp = run_cli("vtpm", "new", "-o", str(tmp_path / "vm"))
    assert_clean_error(cp, 2)  # never overwrite a key
    cp = run_cli("tpm", "policy", "--pcrs", "7", "--pcr-values", "7=" + "00" * 32)
    assert cp.stdout.strip() == "8b5682d81b29435d08d79278150611dc7e5923b2fefcce684a09577b40130a8b"
    d = hashlib.sha256(b"e").digest()
    (tmp_path / "log").write_bytes(write_agile_log([(7, 1, {s.ALG_SHA256: d}, b"e")], {s.ALG_SHA256: 32}))
    cp = run_cli("tpm", "pcrs", str(tmp_path / "log"), "--json")
    assert cp.returncode == 0, cp.stderr
    (tmp_path / "pcrs.json").write_text(cp.stdout)
    v7 = hashlib.sha256(Z32 + d).hexdigest()
    assert json.loads(cp.stdout)["result"]["banks"]["sha256"]["7"] == v7
    (tmp_path / "secret").write_bytes(b"q" * 32)
    cp = run_cli("tpm", "seal", "--parent", str(tmp_path / "vm.pem"), "--pcrs", "7", "--pcr-values",
                 str(tmp_path / "pcrs.json"), "--secret-file", str(tmp_path / "secret"), "-o", str(tmp_path / "b"),
                 "--pin-env", "MYPIN", env={"MYPIN": "9999"})
    assert cp.returncode == 0, cp.stderr
    cp = run_cli("tpm", "show", str(tmp_path / "b"), "--json")
    assert json.loads(cp.stdout)["result"]["pin"] is True
    cp = run_cli("tpm", "unseal", str(tmp_path / "b"), "--key", str(tmp_path / "vm.key"), "--tcg-log",
                 str(tmp_path / "log"), "--pin-env", "MYPIN", "-o", str(tmp_path / "out"), env={"MYPIN": "9999"})
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "out").read_bytes() == b"q" * 32
    cp = run_cli("tpm", "unseal", str(tmp_path / "b"), "--key", str(tmp_path / "vm.key"), "--pcr-values",
                 "7=" + "11" * 32, "--pin-env", "MYPIN", "-o", str(tmp_path / "out2"), env={"MYPIN": "9999"})
    assert_clean_error(cp, 6)
    cp = run_cli("tpm", "unseal", str(tmp_path / "b"), "--key", str(tmp_path / "vm.key"), "--tcg-log",
                 str(tmp_path / "log"), "--pin-env", "MYPIN", "-o", str(tmp_path / "out2"), env={"MYPIN": "0000"})
    assert_clean_error(cp, 5)
    assert "0000" not in cp.stderr and "9999" not in cp.stderr


@pytest.mark.parametrize("args,code", [
    (["tpm", "pcrs", "{junk}"], 3),
    (["tpm", "pcrs", "/nonexistent/log"], 9),
    (["tpm", "parent", "{junk}"], 3),
    (["tpm", "show", "{junk}"], 3),
    (["tpm", "policy", "--pcrs", "7", "--pcr-values", "7=abcd"], 2),
    (["tpm", "policy", "--pcrs", "99", "--pcr-values", "99=" + "00" * 32], 2),
    (["tpm", "seal", "--parent", "{junk}", "--pcrs", "7", "--pcr-values", "7=" + "00" * 32,
      "--secret-file", "{junk}", "-o", "{out}"], 3),
    (["tpm", "unseal", "{junk}", "--tpm", "swtpm:port=1", "-o", "{out}"], 3),
])
def test_cli_malformed_inputs_one_line(tmp_path, args, code):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x10" + os.urandom(40))
    args = [a.replace("{junk}", str(junk)).replace("{out}", str(tmp_path / "o")) for a in args]
    assert_clean_error(run_cli(*args), code)


def test_cli_unreachable_tpm_is_clean(tmp_path):
    key = keys.generate_storage_key("ecc")
    parent = keys.parse_parent_public(keys.template_public(key.public_key()))
    (tmp_path / "b").write_bytes(seal_to_parent(parent, b"z" * 32, "sha256", {7: Z32}))
    assert_clean_error(run_cli("tpm", "unseal", str(tmp_path / "b"), "--tpm", "swtpm:host=127.0.0.1,port=1",
                               "-o", str(tmp_path / "o")), 8)


def test_cli_option_helpers_for_encrypt(tmp_path):
    """tpm_seal_options/sealer_from_options give other commands a working sealer."""
    import click
    from click.testing import CliRunner

    from templatetool.cli.tpm_cmd import sealer_from_options, tpm_seal_options

    key = keys.generate_storage_key("ecc")
    parent = keys.parse_parent_public(keys.template_public(key.public_key()))
    (tmp_path / "p.pub").write_bytes(parent.tpm2b_public)
    got = {}

    @click.command()
    @tpm_seal_options
    def cmd(**kw):
        got["sealer"] = sealer_from_options(**kw)

    r = CliRunner().invoke(cmd, ["--tpm-parent", str(tmp_path / "p.pub"), "--pcr-values",
                                 f"7={'00' * 32},11={'22' * 32}"])
    assert r.exit_code == 0, r.output
    payload, mask = got["sealer"](b"v" * 44)
    assert mask == 0x880
    assert unseal_with_software_key(payload, key, {7: Z32, 11: b"\x22" * 32}) == b"v" * 44
    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 0 and got["sealer"] is None


def test_replay_matches_tpm2_eventlog(tmp_path):
    """tpm2-tools' tpm2_eventlog (an independent parser) computes the same PCRs from our log.
    (tpm2-tools 5.4 ignores StartupLocality, so that case is checked against swtpm-free maths above.)"""
    import re
    import shutil
    import subprocess

    from conftest import require_tool

    require_tool("tpm2_eventlog")
    banks = {s.ALG_SHA1: 20, s.ALG_SHA256: 32, s.ALG_SHA384: 48}
    names = {s.ALG_SHA1: "sha1", s.ALG_SHA256: "sha256", s.ALG_SHA384: "sha384"}
    events = []
    for pcr, typ, data in [(0, 1, b"POST CODE"), (0, 8, b"\0" * 4), (7, 5, b"Calling EFI Application"),
                           (4, 4, b"\0" * 4), (14, 0xD, b"grub"), (7, 4, b"\0" * 4), (23, 1, b"x")]:
        events.append((pcr, typ, {a: hashlib.new(names[a], data).digest() for a in banks}, data))
    log = tmp_path / "log.bin"
    log.write_bytes(write_agile_log(events, banks))
    cp = subprocess.run([shutil.which("tpm2_eventlog"), str(log)], capture_output=True, text=True, check=True)
    theirs: dict[str, dict[int, bytes]] = {}
    bank = None
    for line in cp.stdout.split("\npcrs:\n", 1)[1].splitlines():
        m = re.match(r"^  (\w+):$", line)
        if m:
            bank = m.group(1)
            continue
        m = re.match(r"^\s+(\d+)\s*:\s*0x([0-9a-fA-F]+)$", line)
        if m and bank:
            theirs.setdefault(bank, {})[int(m.group(1))] = bytes.fromhex(m.group(2))
    r = replay_log(log)
    assert set(theirs) == set(r.values_by_bank)
    for b, vals in theirs.items():
        assert sorted(vals) == r.measured
        assert vals == {i: r.values_by_bank[b][i] for i in r.measured}
