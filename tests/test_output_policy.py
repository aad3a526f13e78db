"""The CLI-wide output policy (issue 17): for every command, each output option pointed at each
input and at an existing file. No input changes, no existing file changes without --overwrite,
key folders / key files never change without --force-replace-keys; --overwrite replaces
atomically. The refusals happen before any work, so the inputs here are tiny dummies and the
checks run in-process (milliseconds each)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from templatetool.cli import main as cli_main
from templatetool.cli import policy

from .conftest import run_cli, run_inprocess

GUID = "cacb4f3d-37ce-4234-b403-fcfdc5e1fb8d"



def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_inprocess(capsys, *args)


def sha(p: Path) -> str:
    if p.is_dir():
        return hashlib.sha256(b"".join(sha(c).encode() + c.name.encode() for c in sorted(p.iterdir()))).hexdigest()
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Dummy inputs: the policy refuses before any of them is parsed."""
    d = {}
    for name in ("disk.vhdx", "t.pdk", "vm.kp", "esc.p7m", "secret.bin", "parent.pub", "rp.txt", "signer.pfx",
                 "t.vsc", "evidence.bin", "blob.bin", "meta.xml", "vtpm.key"):
        p = tmp_path / name
        p.write_bytes(name.encode() * 8)
        d[name] = p
    for name in ("owner", "guardian", "host"):
        p = tmp_path / name
        p.mkdir()
        (p / "guardian.json").write_text("{}")
        d[name] = p
    return d


# Each case: the command's argv given its output paths (``o[label]``) and the input dict.
Builder = Callable[[dict[str, str], dict[str, Path]], list[str]]
CASES: dict[str, tuple[list[str], Builder]] = {
    "shield": (["-o", "--kp", "--report"], lambda o, i: [
        "shield", i["disk.vhdx"], "--pdk", i["t.pdk"], "--owner", i["owner"], "--pcr-values", "7=00",
        "-o", o["-o"], "--kp", o["--kp"], "--report", o["--report"]]),
    "encrypt": (["-o", "--recovery-password-out", "--startup-key-out"], lambda o, i: [
        "encrypt", i["disk.vhdx"], "-o", o["-o"], "--recovery-password-out", o["--recovery-password-out"],
        "--startup-key-out", o["--startup-key-out"]]),
    "decrypt": (["-o"], lambda o, i: ["decrypt", i["disk.vhdx"], "-o", o["-o"], "--recovery-password-file", i["rp.txt"]]),
    "unlock": (["-o"], lambda o, i: ["unlock", i["disk.vhdx"], "--kp", i["vm.kp"], "--guardian", i["guardian"],
                                     "--host", i["host"], "-o", o["-o"]]),
    "escrow open": (["-o"], lambda o, i: ["escrow", "open", i["esc.p7m"], "--owner", i["owner"], "-o", o["-o"]]),
    "vhdx convert": (["DST"], lambda o, i: ["vhdx", "convert", i["disk.vhdx"], o["DST"]]),
    "vhdx create": (["DST"], lambda o, i: ["vhdx", "create", o["DST"], "--parent", i["disk.vhdx"]]),
    "vhdx replay-log": (["DST"], lambda o, i: ["vhdx", "replay-log", i["disk.vhdx"], o["DST"]]),
    "vhdx metadata get": (["-o"], lambda o, i: ["vhdx", "metadata", "get", i["disk.vhdx"], GUID, "-o", o["-o"]]),
    "protect": (["-o"], lambda o, i: ["protect", i["disk.vhdx"], "-o", o["-o"], "--name", "n", "--version", "1.0.0.0",
                                      "--signer", i["signer.pfx"]]),
    "vsc export": (["-o"], lambda o, i: ["vsc", "export", i["disk.vhdx"], "-o", o["-o"]]),
    "pdk new": (["-o"], lambda o, i: ["pdk", "new", "-o", o["-o"], "--owner", i["owner"], "--guardian", i["guardian"],
                                      "--vsc", i["t.vsc"], "--version-rule", "ge", "--policy", "shielded",
                                      "--answer-file", i["secret.bin"]]),
    "kp new": (["-o"], lambda o, i: ["kp", "new", "-o", o["-o"], "--owner", i["owner"], "--secret-file", i["secret.bin"]]),
    "kp grant": (["-o"], lambda o, i: ["kp", "grant", i["vm.kp"], "--owner", i["owner"], "--guardian", i["guardian"],
                                       "-o", o["-o"]]),
    "kp revoke": (["-o"], lambda o, i: ["kp", "revoke", i["vm.kp"], "--owner", i["owner"], "--guardian", i["guardian"],
                                        "-o", o["-o"]]),
    "kp unwrap": (["-o"], lambda o, i: ["kp", "unwrap", i["vm.kp"], "--guardian", i["guardian"], "-o", o["-o"]]),
    "guardian export": (["-o"], lambda o, i: ["guardian", "export", i["owner"], "-o", o["-o"], "--signer",
                                              i["signer.pfx"]]),
    "hgs attest": (["-o"], lambda o, i: ["hgs", "attest", i["guardian"], i["evidence.bin"], "-o", o["-o"]]),
    "host evidence": (["-o"], lambda o, i: ["host", "evidence", i["host"], "-o", o["-o"]]),
    "tpm seal": (["-o"], lambda o, i: ["tpm", "seal", "--parent", i["parent.pub"], "--pcrs", "7", "--pcr-values", "7=00",
                                       "--secret-file", i["secret.bin"], "-o", o["-o"]]),
    "vtpm manufacture": (["-o", "--key-out", "--protector-out"], lambda o, i: [
        "vtpm", "manufacture", "-o", o["-o"], "--key-out", o["--key-out"], "--secret-file", i["secret.bin"],
        "--pcrs", "7", "--pcr-values", "7=00", "--protector-out", o["--protector-out"]]),
    "vtpm rekey": (["-o", "--new-key-out"], lambda o, i: [
        "vtpm", "rekey", i["blob.bin"], "--key", i["vtpm.key"], "--new-key-out", o["--new-key-out"], "-o", o["-o"]]),
    "tpm unseal": (["-o"], lambda o, i: ["tpm", "unseal", i["blob.bin"], "--key", i["vtpm.key"], "-o", o["-o"]]),
    "luks encrypt": (["-o"], lambda o, i: ["luks", "encrypt", i["disk.vhdx"], "-o", o["-o"], "--passphrase-env", "X"]),
    "luks decrypt": (["-o"], lambda o, i: ["luks", "decrypt", i["disk.vhdx"], "-o", o["-o"], "--passphrase-env", "X"]),
    "luks enroll-tpm2": (["-o"], lambda o, i: ["luks", "enroll-tpm2", i["disk.vhdx"], "-o", o["-o"],
                                               "--passphrase-env", "X", "--tpm2-device", "swtpm:port=1"]),
    "luks protect": (["-o"], lambda o, i: ["luks", "protect", i["disk.vhdx"], "-o", o["-o"], "--name", "n",
                                           "--version", "1.0.0.0", "--signer", i["signer.pfx"],
                                           "--passphrase-env", "X"]),
}

#: Commands whose outputs are folders or key files: tested below, one by one.
#: (`host ek` reads no file: its existing-output refusal is in test_host_attest.)
SPECIAL = {"host ek", "guardian new", "guardian import", "host new", "vtpm new", "cert new", "pdk show", "demo", "tpm seal"}


def _outputs(tmp: Path, labels: list[str]) -> dict[str, str]:
    return {lab: str(tmp / f"new{n}.out") for n, lab in enumerate(labels)}


def test_every_writing_command_is_covered() -> None:
    """The table above covers every command with an output parameter (walks the click tree)."""
    cli_main._load()
    writing = set()
    for path, cmd in policy.walk(cli_main.cli):
        if any(getattr(p.type, "role", None) in ("file", "dir", "key-folder", "prefix") for p in cmd.params):
            writing.add(" ".join(path))
    missing = writing - set(CASES) - SPECIAL
    assert not missing, f"commands writing files without an output-policy test: {sorted(missing)}"
    for path, cmd in policy.walk(cli_main.cli):
        if " ".join(path) in writing:
            assert any(p.name == "overwrite" for p in cmd.params), f"{' '.join(path)} has no --overwrite"


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_at_each_input_is_refused(name: str, tmp_path: Path, inputs: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    labels, build = CASES[name]
    used = {str(a) for a in build(_outputs(tmp_path, labels), inputs)}
    ins = [p for p in inputs.values() if str(p) in used]
    assert ins
    before = {p: sha(p) for p in inputs.values()}
    for lab in labels:
        for target in ins:
            o = _outputs(tmp_path, labels)
            o[lab] = str(target)
            for extra in ([], ["--overwrite"]):
                rc, out, err = run(capsys, *build(o, inputs), *extra)
                assert rc == 2, (name, lab, target, err)
                assert err.startswith("templatetool: usage error:") and err.count("\n") == 1, err
                if target.is_file():
                    assert str(target) in err and "input" in err, err
        assert {p: sha(p) for p in inputs.values()} == before, f"{name}: an input changed"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("new")], "an output was written"


@pytest.mark.parametrize("name", sorted(CASES))
def test_existing_output_is_refused_without_overwrite(name: str, tmp_path: Path, inputs: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    labels, build = CASES[name]
    for lab in labels:
        o = _outputs(tmp_path, labels)
        victim = tmp_path / "precious.txt"
        victim.write_text("keep me")
        o[lab] = str(victim)
        rc, out, err = run(capsys, *build(o, inputs))
        assert rc == 2 and "--overwrite" in err and str(victim) in err, (name, lab, err)
        assert victim.read_text() == "keep me"


@pytest.mark.parametrize("name", [n for n, (labels, _b) in sorted(CASES.items()) if len(labels) > 1])
def test_two_outputs_at_one_path_are_refused(name: str, tmp_path: Path, inputs: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    labels, build = CASES[name]
    o = _outputs(tmp_path, labels)
    o[labels[1]] = o[labels[0]]
    rc, _out, err = run(capsys, *build(o, inputs), "--overwrite")
    assert rc == 2 and err.count(o[labels[0]]) == 2, err


def test_symlink_and_hard_link_to_an_input_are_refused(tmp_path: Path, inputs: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    os.symlink(inputs["disk.vhdx"], tmp_path / "sym.vhdx")
    os.link(inputs["disk.vhdx"], tmp_path / "hard.vhdx")
    before = sha(inputs["disk.vhdx"])
    for alias in ("sym.vhdx", "hard.vhdx"):
        rc, _out, err = run(capsys, "vhdx", "convert", inputs["disk.vhdx"], tmp_path / alias, "--overwrite")
        assert rc == 2 and "is also the input SRC" in err, err
    assert sha(inputs["disk.vhdx"]) == before


def test_shield_derived_outputs(tmp_path: Path, inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """shield's default OUTPUT.kp and OUTPUT.recovery.p7m are outputs like any other."""
    base = ["shield", inputs["disk.vhdx"], "--pdk", inputs["t.pdk"], "--owner", inputs["owner"], "--pcr-values", "7=0"]
    (tmp_path / "vm.kp").write_text("old kp")
    rc, _o, err = run(capsys, *base, "-o", tmp_path / "vm.vhdx")
    assert rc == 2 and "default OUTPUT.kp" in err and "--overwrite" in err, err
    (tmp_path / "vm.kp").unlink()
    (tmp_path / "vm.recovery.p7m").write_text("old escrow")
    rc, _o, err = run(capsys, *base, "-o", tmp_path / "vm.vhdx")
    assert rc == 2 and "recovery escrow" in err, err
    # the escrow of -o esc.vhdx is esc.recovery.p7m; -o t.vhdx puts the KP on the PDK's neighbour t.kp
    rc, _o, err = run(capsys, *base, "-o", tmp_path / "t.vhdx", "--kp", tmp_path / "t.recovery.p7m")
    assert rc == 2 and "is also" in err, err
    assert (tmp_path / "vm.recovery.p7m").read_text() == "old escrow"


def test_report_at_a_file_inside_an_input_folder(tmp_path: Path, inputs: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc, _o, err = run(capsys, "shield", inputs["disk.vhdx"], "--pdk", inputs["t.pdk"], "--owner", inputs["owner"],
                      "--pcr-values", "7=0", "-o", tmp_path / "vm.vhdx", "--report",
                      inputs["owner"] / "guardian.json", "--overwrite")
    assert rc == 2 and "inside the input --owner" in err, err
    assert (inputs["owner"] / "guardian.json").read_text() == "{}"


@pytest.mark.parametrize("argv", [
    ["guardian", "new", "g", "-o", "{dir}", "--no-password"],
    ["guardian", "import", "{meta}", "-o", "{dir}"],
    ["host", "new", "h", "-o", "{dir}"],
])
def test_key_folders_are_never_overwritten(argv: list[str], tmp_path: Path, inputs: dict[str, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "signing.pfx").write_bytes(b"the only copy")
    args = [a.format(dir=keys, meta=inputs["meta.xml"]) for a in argv]
    for extra in ([], ["--overwrite"]):
        rc, _o, err = run(capsys, *args, *extra)
        assert rc == 2 and "--force-replace-keys" in err and "never overwritten" in err, err
    assert (keys / "signing.pfx").read_bytes() == b"the only copy"


def test_guardian_new_force_replace_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "g"
    rc, _o, err = run(capsys, "guardian", "new", "g", "-o", keys, "--no-password", "--key", "ec-p256")
    assert rc == 0, err
    old = (keys / "signing.pfx").read_bytes()
    rc, _o, err = run(capsys, "guardian", "new", "g", "-o", keys, "--no-password", "--key", "ec-p256", "--overwrite")
    assert rc == 2 and (keys / "signing.pfx").read_bytes() == old
    rc, _o, err = run(capsys, "guardian", "new", "g", "-o", keys, "--no-password", "--key", "ec-p256",
                      "--force-replace-keys")
    assert rc == 0, err
    assert (keys / "signing.pfx").read_bytes() != old


def test_key_files_need_force_replace_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """cert new NAME (NAME.pfx + NAME.crt) and vtpm new NAME (.key/.pub/.pem) never replace keys."""
    monkeypatch.setenv("TT_PW", "pw")
    (tmp_path / "c.crt").write_text("old cert")
    for extra in ([], ["--overwrite"]):
        rc, _o, err = run(capsys, "cert", "new", "--signing", "--subject", "CN=x", "--key", "ec-p256",
                          "-o", tmp_path / "c", "--password-env", "TT_PW", *extra)
        assert rc == 2 and "NAME.crt" in err and "--force-replace-keys" in err, err
    assert (tmp_path / "c.crt").read_text() == "old cert" and not (tmp_path / "c.pfx").exists()
    rc, _o, err = run(capsys, "cert", "new", "--signing", "--subject", "CN=x", "--key", "ec-p256",
                      "-o", tmp_path / "c", "--password-env", "TT_PW", "--force-replace-keys")
    assert rc == 0 and (tmp_path / "c.crt").read_text() != "old cert", err
    (tmp_path / "v.pem").write_text("old")
    rc, _o, err = run(capsys, "vtpm", "new", "-o", tmp_path / "v", "--overwrite")
    assert rc == 2 and "v.pem" in err and not (tmp_path / "v.key").exists(), err


def test_tpm_seal_tools_prefix_outputs(tmp_path: Path, inputs: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    base = ["tpm", "seal", "--parent", inputs["parent.pub"], "--pcrs", "7", "--pcr-values", "7=00",
            "--secret-file", inputs["secret.bin"], "-o", tmp_path / "p.bin"]
    rc, _o, err = run(capsys, *base, "--tpm2-tools", tmp_path / "parent", "--overwrite")
    assert rc == 2 and "parent.pub" in err and "input --parent" in err, err  # PREFIX.pub = the parent
    (tmp_path / "x.seed").write_text("old")
    rc, _o, err = run(capsys, *base, "--tpm2-tools", tmp_path / "x")
    assert rc == 2 and "--overwrite" in err and (tmp_path / "x.seed").read_text() == "old", err


def test_output_folders(tmp_path: Path, inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """demo -o and pdk show --extract refuse a non-empty folder without --overwrite."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "a.txt").write_text("keep")
    rc, _o, err = run(capsys, "demo", "-o", full)
    assert rc == 2 and "--overwrite" in err, err
    rc, _o, err = run(capsys, "pdk", "show", inputs["t.pdk"], "--key", inputs["owner"], "--extract", full)
    assert rc == 2 and "--overwrite" in err, err
    rc, _o, err = run(capsys, "pdk", "show", inputs["t.pdk"], "--key", inputs["owner"], "--extract", inputs["owner"],
                      "--overwrite")
    assert rc == 2 and "input" in err, err
    assert (full / "a.txt").read_text() == "keep"


def test_overwrite_replaces_atomically(tmp_path: Path) -> None:
    """--overwrite: the destination is replaced by a rename (new inode, no temporary left), the
    first run's content is gone only once the new one is complete."""
    dst = tmp_path / "d.vhdx"
    dst.write_bytes(b"old content")
    ino = dst.stat().st_ino
    cp = run_cli("vhdx", "create", str(dst), "--size", "8M")
    assert cp.returncode == 2 and "--overwrite" in cp.stderr and dst.read_bytes() == b"old content"
    cp = run_cli("vhdx", "create", str(dst), "--size", "8M", "--overwrite")
    assert cp.returncode == 0, cp.stderr
    assert dst.stat().st_ino != ino and dst.read_bytes()[:8] == b"vhdxfile"
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"old raw")
    cp = run_cli("vhdx", "convert", str(dst), str(raw), "--overwrite")
    assert cp.returncode == 0, cp.stderr
    assert raw.stat().st_size == 8 << 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.raw", "d.vhdx"]


def test_output_set_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """atomic_outputs: a failing rename undoes the outputs already in place (old content back)."""
    from templatetool import atomic
    from templatetool.errors import ResourceError

    a = tmp_path / "a"
    a.write_text("old a")
    real, calls = os.replace, []

    def flaky(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(dst))
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(ResourceError, match="nothing was changed"):
        with atomic.atomic_outputs() as outs:
            outs.write(a, b"new a")
            outs.write(tmp_path / "b", b"new b")
            outs.write(tmp_path / "c", b"new c")
    assert a.read_text() == "old a" and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "temporary or backup files left"
