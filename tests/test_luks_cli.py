"""`templatetool luks encrypt | dump | decrypt` end to end (CLI in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import assert_clean_error, require_module, require_tool, run_cli, run_inprocess

FAST = ("--pbkdf", "argon2id", "--pbkdf-memory", "8192", "--pbkdf-time", "1", "--pbkdf-parallel", "1")


def test_encrypt_dump_decrypt(tmp_path: Path) -> None:
    src = tmp_path / "root.img"
    src.write_bytes(os.urandom(1 << 20))
    out = tmp_path / "root.luks"
    env = {"LUKS_PW": "s3cret passphrase"}
    cp = run_cli("luks", "encrypt", str(src), "-o", str(out), "--passphrase-env", "LUKS_PW", *FAST, "--json",
                 env=env, check=True)
    res = json.loads(cp.stdout)["result"]
    assert res["sector_size"] == 4096 and res["data_offset"] == 16 << 20
    assert "s3cret" not in cp.stdout + cp.stderr
    d = json.loads(run_cli("luks", "dump", str(out), "--json", check=True).stdout)["result"]
    assert d["keyslots"]["0"]["kdf"] == {"type": "argon2id", "time": 1, "memory": 8192, "cpus": 1}
    assert d["segments"]["0"]["encryption"] == "aes-xts-plain64"
    back = tmp_path / "back.img"
    run_cli("luks", "decrypt", str(out), "-o", str(back), "--passphrase-env", "LUKS_PW", env=env, check=True)
    assert back.read_bytes() == src.read_bytes()
    # judged by cryptsetup too
    require_tool("cryptsetup")
    r = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(out)],
                       input=b"s3cret passphrase", capture_output=True)
    assert r.returncode == 0, r.stderr


def _clean(res: tuple[int, str, str], code: int) -> None:
    rc, _out, err = res
    assert rc == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("templatetool:"), err


def test_clean_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "root.img"
    src.write_bytes(os.urandom(64 << 10))
    out = tmp_path / "root.luks"
    monkeypatch.setenv("LUKS_PW", "pw")
    monkeypatch.setenv("WRONG_PW", "wrong")
    monkeypatch.delenv("UNSET_VAR_X", raising=False)

    def run(*args: object) -> tuple[int, str, str]:
        return run_inprocess(capsys, *args)

    assert run("luks", "encrypt", src, "-o", out, "--passphrase-env", "LUKS_PW", *FAST)[0] == 0
    _clean(run("luks", "decrypt", out, "-o", tmp_path / "x", "--passphrase-env", "WRONG_PW"), 5)
    assert not (tmp_path / "x").exists()
    _clean(run("luks", "dump", src), 3)  # not LUKS
    _clean(run("luks", "dump", tmp_path / "missing"), 9)
    _clean(run("luks", "encrypt", tmp_path / "missing", "-o", tmp_path / "y", "--passphrase-env", "LUKS_PW"), 9)
    # the output exists: refused before any work (the output policy), input untouched
    before = src.read_bytes()
    _clean(run("luks", "encrypt", src, "-o", out, "--passphrase-env", "LUKS_PW"), 2)
    _clean(run("luks", "encrypt", src, "-o", src, "--passphrase-env", "LUKS_PW", "--overwrite"), 2)
    assert src.read_bytes() == before
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    _clean(run("luks", "encrypt", odd, "-o", tmp_path / "z", "--passphrase-env", "LUKS_PW"), 2)
    _clean(run("luks", "encrypt", src, "-o", tmp_path / "z", "--passphrase-env", "UNSET_VAR_X"), 5)
    # a damaged header: both copies → integrity error
    raw = bytearray(out.read_bytes())
    raw[4096 + 3] ^= 1
    raw[16384 + 4096 + 3] ^= 1
    bad = tmp_path / "bad.luks"
    bad.write_bytes(raw)
    _clean(run("luks", "dump", bad), 4)
    # one subprocess run: the real exit path
    assert_clean_error(run_cli("luks", "dump", str(src)), 3)


def test_tpm2_token_cli(tmp_path: Path) -> None:
    require_tool("swtpm")
    require_module("tpm2_pytss")
    from templatetool.tpm.swtpm import Swtpm

    src = tmp_path / "root.img"
    src.write_bytes(os.urandom(256 << 10))
    out = tmp_path / "root.luks"
    with Swtpm(tmp_path / "tpm") as tpm:
        run_cli("luks", "encrypt", str(src), "-o", str(out), "--passphrase-env", "LUKS_PW", *FAST,
                "--tpm2-device", tpm.tcti, "--tpm2-pcrs", "7", env={"LUKS_PW": "pw"}, check=True)
        d = json.loads(run_cli("luks", "dump", str(out), "--json", check=True).stdout)["result"]
        tok = d["tokens"]["0"]
        assert tok["type"] == "systemd-tpm2" and tok["keyslots"] == ["1"] and tok["tpm2-pcrs"] == [7]
        back = tmp_path / "back.img"
        run_cli("luks", "decrypt", str(out), "-o", str(back), "--tpm2-device", tpm.tcti, check=True)
        assert back.read_bytes() == src.read_bytes()
