"""Issue 17: bad input gets a usage/format error in the user's terms (exit code + message), never
an internal error; the real unlock and the build report say what actually happened."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from templatetool.errors import UsageError

from .conftest import GOLDEN, assert_clean_error, run_cli


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from templatetool.pipeline.demo import run_demo

    d = tmp_path_factory.mktemp("msgdemo")
    run_demo(GOLDEN, d, say=lambda s: None)
    return d


def _shield_args(d: Path, template: Path, out: Path, *extra: str) -> list[str]:
    return ["shield", str(template), "--pdk", str(d / "tenant.pdk"), "--owner", str(d / "owner"),
            "--guardian", str(d / "fabric"), "-o", str(out), "--tcg-log", str(d / "vm-reference.tcglog"), *extra]


# --- 1. PCR indices and banks -------------------------------------------------------------------

@pytest.mark.parametrize("pcrs, bad", [("7,99", "99"), ("24", "24"), ("7,-1", None), ("7,x", None)])
def test_shield_pcrs_out_of_range_is_a_usage_error(demo: Path, tmp_path: Path, pcrs: str, bad: str | None) -> None:
    cp = run_cli(*_shield_args(demo, demo / "template.vhdx", tmp_path / "vm.vhdx", "--pcrs", pcrs, "--json"))
    assert_clean_error(cp, 2)
    assert "--pcrs" in cp.stderr and (bad is None or f"PCR index {bad} out of range" in cp.stderr), cp.stderr
    doc = json.loads(cp.stdout)  # the --json error document, not an empty stdout
    assert doc["ok"] is False and doc["error"]["kind"] == "usage" and doc["error"]["exit_code"] == 2
    assert not list(tmp_path.iterdir())


def test_shield_unknown_bank_is_a_usage_error(demo: Path, tmp_path: Path) -> None:
    cp = run_cli(*_shield_args(demo, demo / "template.vhdx", tmp_path / "vm.vhdx", "--bank", "md5"))
    assert cp.returncode == 2 and "md5" in cp.stderr and "Traceback" not in cp.stderr
    assert not list(tmp_path.iterdir())


def test_hgs_baseline_pcrs_out_of_range(demo: Path, tmp_path: Path) -> None:
    g = tmp_path / "fabric"
    shutil.copytree(demo / "fabric", g)
    before = (g / "attestation.json").read_bytes()
    cp = run_cli("hgs", "baseline", str(g), "--tcg-log", str(demo / "vm-reference.tcglog"), "--pcrs", "7,99")
    assert_clean_error(cp, 2)
    assert "PCR index 99 out of range" in cp.stderr
    assert (g / "attestation.json").read_bytes() == before


def test_tpm_policy_pcrs_out_of_range() -> None:
    cp = run_cli("tpm", "policy", "--pcrs", "7,30", "--pcr-values", "7=" + "00" * 32)
    assert_clean_error(cp, 2)
    assert "PCR index 30 out of range" in cp.stderr


def test_library_pcr_selection_never_raises_keyerror(demo: Path) -> None:
    from templatetool.hgs import AttestationPolicy
    from templatetool.tpm.protector import resolve_pcr_values

    log = (demo / "vm-reference.tcglog").read_bytes()
    for pcrs in ([7, 99], [24], ["7"]):
        with pytest.raises(UsageError, match="PCR index"):
            resolve_pcr_values(pcrs, "sha256", tcg_log=log)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="out of range"):  # was "no value given for PCR 24"
        resolve_pcr_values([7, 24], "sha256", pcr_values={7: bytes(32)})
    with pytest.raises(UsageError, match="unknown PCR bank"):
        resolve_pcr_values([7], "md5", tcg_log=log)
    with pytest.raises(UsageError, match="out of range"):
        AttestationPolicy.load(demo / "fabric").set_baseline_from_log(log, (7, 99))


def test_parse_pcr_list_shared_parser() -> None:
    from templatetool.cli.tpm_cmd import parse_pcr_list

    assert parse_pcr_list("11, 7,0-2") == (0, 1, 2, 7, 11)
    for bad in ("", "7,99", "a", "5-30"):
        with pytest.raises(UsageError):
            parse_pcr_list(bad)


# --- 2. messages in the user's terms -------------------------------------------------------------

def test_shield_of_an_unprotected_disk(demo: Path, tmp_path: Path) -> None:
    cp = run_cli(*_shield_args(demo, GOLDEN, tmp_path / "vm.vhdx"))
    assert_clean_error(cp, 9)
    assert "golden.vhdx is not a protected template (no volume signature catalog" in cp.stderr
    assert "templatetool protect" in cp.stderr and "cacb4f3d" not in cp.stderr
    assert not list(tmp_path.iterdir())


def test_vsc_verify_of_an_unprotected_raw_disk(tmp_path: Path) -> None:
    from templatetool.vhdx.convert import convert

    raw = tmp_path / "golden.img"
    convert(GOLDEN, raw, to="raw", progress=False)
    cp = run_cli("vsc", "verify", str(raw))
    assert_clean_error(cp, 3)
    assert "golden.img is not a protected template" in cp.stderr and "golden.img.vsc is absent" in cp.stderr


def test_shield_of_an_already_shielded_disk(demo: Path, tmp_path: Path) -> None:
    cp = run_cli(*_shield_args(demo, demo / "vm.vhdx", tmp_path / "vm2.vhdx"))
    assert_clean_error(cp, 2)
    assert "vm.vhdx is already BitLocker-encrypted (a shielded VM disk?)" in cp.stderr, cp.stderr
    assert "Invalid NTFS magic" not in cp.stderr
    assert not list(tmp_path.iterdir())


def test_ntfs_reader_names_bitlocker(demo: Path) -> None:
    from templatetool.catalog.ntfs import ntfs_free_map
    from templatetool.disk import open_disk, select_volume
    from templatetool.errors import FormatError

    with open_disk(demo / "vm.vhdx") as dev:
        view, _ = select_volume(dev, None)
        with pytest.raises(FormatError, match="BitLocker-encrypted, not plain NTFS"):
            ntfs_free_map(view)


def test_vsc_verify_trust_pfx_says_what_to_pass(demo: Path) -> None:
    cp = run_cli("vsc", "verify", str(demo / "template.vhdx"), "--trust", str(demo / "owner" / "signing.pfx"))
    assert_clean_error(cp, 3)
    assert "PKCS#12 (.pfx)" in cp.stderr and ".crt/.pem" in cp.stderr
    assert "ParseError" not in cp.stderr and "asn1" not in cp.stderr
    cp = run_cli("vsc", "verify", str(demo / "template.vhdx"), "--trust", str(demo / "tenant.pdk"))
    assert_clean_error(cp, 3)
    assert "not a PEM/DER X.509 certificate" in cp.stderr and "ParseError" not in cp.stderr
    # the right file still verifies (PEM and DER)
    assert run_cli("vsc", "verify", str(demo / "template.vhdx"), "--trust", str(demo / "signer.pem")).returncode == 0


# --- 6. unlock says what it did -------------------------------------------------------------------

def test_real_unlock_says_unlocked_dry_run_keeps_wording(demo: Path, tmp_path: Path) -> None:
    base = ["unlock", str(demo / "vm.vhdx"), "--kp", str(demo / "vm.kp"), "--guardian", str(demo / "fabric"),
            "--host", str(demo / "host")]
    out = tmp_path / "out.vhdx"
    cp = run_cli(*base, "-o", str(out))
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines()[-1] == f"result: unlocked and decrypted to {out}"
    assert "would unlock" not in cp.stdout and out.is_file()
    cp = run_cli(*base, "--dry-run")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines()[-1] == "result: the guardian would unlock this VM"


# --- 8. the build report names the VSC it wrote ---------------------------------------------------

def test_build_report_names_the_vsc(demo: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""
[template]
golden = "{GOLDEN}"
output = "out/template.vhdx"
name = "Srv"
version = "1.2.3.4"
signer = "pem:{demo / 'signer.key.pem'},{demo / 'signer.pem'}"

[report]
output = "out/report.json"
""")
    (tmp_path / "out").mkdir()
    cp = run_cli("build", str(recipe))
    assert cp.returncode == 0, cp.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    vsc = Path(rep["steps"]["protect"]["vsc"])
    assert vsc == Path(rep["artifacts"]["vsc"]) and vsc.is_file()
    from templatetool.catalog.vsc import read_vsc_bytes

    assert vsc.read_bytes() == read_vsc_bytes(tmp_path / "out" / "template.vhdx")


def test_build_recipe_outputs_follow_the_output_policy(demo: Path, tmp_path: Path) -> None:
    """A recipe's outputs are checked like options: never an input, never an existing file
    without --overwrite, and --overwrite replaces them."""
    import hashlib

    golden = tmp_path / "golden.vhdx"
    golden.write_bytes(GOLDEN.read_bytes())
    signer = f"pem:{demo / 'signer.key.pem'},{demo / 'signer.pem'}"

    def recipe(output: str, name: str = "recipe.toml") -> Path:
        r = tmp_path / name
        r.write_text(f'[template]\ngolden = "golden.vhdx"\noutput = "{output}"\nname = "Srv"\n'
                     f'version = "1.2.3.4"\nsigner = "{signer}"\n[report]\noutput = "report.json"\n')
        return r

    before = hashlib.sha256(golden.read_bytes()).hexdigest()
    cp = run_cli("build", str(recipe("golden.vhdx")))  # the template output is the golden input
    assert cp.returncode == 2 and "is also the input [template] golden" in cp.stderr, cp.stderr
    assert hashlib.sha256(golden.read_bytes()).hexdigest() == before
    cp = run_cli("build", str(recipe("report.json", "r2.toml")))  # two outputs at one path
    assert cp.returncode == 2 and "[report] output" in cp.stderr, cp.stderr
    r = recipe("t.vhdx")
    assert run_cli("build", str(r)).returncode == 0
    first = (tmp_path / "t.vhdx").stat().st_ino
    cp = run_cli("build", str(r))  # everything exists now
    assert cp.returncode == 2 and "--overwrite" in cp.stderr, cp.stderr
    assert (tmp_path / "t.vhdx").stat().st_ino == first
    cp = run_cli("build", str(r), "--overwrite")
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "t.vhdx").stat().st_ino != first  # replaced by a rename


def test_shared_seal_options_validate_pcrs_and_bank(tmp_path: Path) -> None:
    """tpm_seal_options (encrypt) and shield share the PCR_LIST / PCR_BANK option types."""
    import click
    from click.testing import CliRunner

    from templatetool.cli.tpm_cmd import BANK, PCR_BANK, tpm_seal_options

    assert BANK is PCR_BANK

    @click.command()
    @tpm_seal_options
    def cmd(**kw: object) -> None:
        click.echo(f"{list(kw['tpm_pcrs'])} {kw['tpm_bank']}")  # type: ignore[call-overload]

    r = CliRunner().invoke(cmd, ["--pcrs", "11,7"])
    assert r.exit_code == 0 and r.output.strip() == "[7, 11] sha256", r.output
    r = CliRunner().invoke(cmd, ["--pcrs", "7,99"])
    assert isinstance(r.exception, UsageError) and "PCR index 99 out of range" in str(r.exception)
    r = CliRunner().invoke(cmd, ["--bank", "md5"])
    assert isinstance(r.exception, UsageError) and "md5" in str(r.exception)
