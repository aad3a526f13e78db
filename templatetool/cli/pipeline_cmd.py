"""Pipeline commands: shield, unlock, escrow, build, demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import NotFoundError, TemplateToolError, UsageError
from ..secrets import env_or_prompt
from . import policy
from .common import ERRORS_BY_CODE, emit, guardian_password, json_option
from .policy import OUTPUT_DIR, OUTPUT_FILE, Out
from .tpm_cmd import PCR_BANK, PCR_LIST


def _pcr_values(text: str | None) -> dict[int, bytes] | None:
    """``7=hex,11=hex`` or a file with one ``N=hex`` (or JSON object) per line."""
    if not text:
        return None
    src = Path(text).read_text() if Path(text).is_file() else text
    try:
        if src.strip().startswith("{"):
            return {int(k): bytes.fromhex(v) for k, v in json.loads(src).items()}
        out = {}
        for part in src.replace("\n", ",").split(","):
            if part.strip():
                k, v = part.split("=", 1)
                out[int(k)] = bytes.fromhex(v.strip())
        return out
    except (ValueError, json.JSONDecodeError):
        raise click.BadParameter("use N=HEX[,N=HEX...] or a file of such lines") from None


def _unlock_error(rep: Any) -> TemplateToolError:
    """The typed error of an unlock report's first failed step (its own kind and exit code)."""
    st = next((s for s in rep.steps if s.status == "failed"), None)
    if st is None:
        return TemplateToolError("the guardian would not unlock this VM")
    cls = ERRORS_BY_CODE.get(st.exit_code, TemplateToolError)
    return cls(f"{st.name} failed: {st.detail}")


def _unlock_text(r: dict[str, Any]) -> str:
    lines = [f"  {s['status']:>7}  {s['step']}: {s['detail']}" for s in r["steps"]]
    lines.append("result: " + r["summary"])
    return "\n".join(lines)


def _recipe_paths(p: dict[str, Any]) -> list[Out]:
    """A build recipe's inputs and outputs (checked like any command's options)."""
    from ..pipeline.build import Recipe

    ins, outs = Recipe(p["recipe"]).io_paths()
    return [Out(label, str(q), "input") for label, q in ins] + [Out(label, str(q)) for label, q in outs]


def _shield_outputs(p: dict[str, Any]) -> list[Out]:
    """shield's derived outputs: OUTPUT.kp (unless --kp) and OUTPUT.recovery.p7m; with --in-place
    they sit beside TEMPLATE and may exist already when a crashed conversion is resumed."""
    disk = p.get("template") if p.get("in_place") else p.get("output")
    if not disk:
        return []
    role = "resume" if p.get("in_place") and policy.converting(disk) else "file"
    kp = (
        Out("--kp", p["kp_out"], role)
        if p.get("kp_out")
        else Out("--kp (default OUTPUT.kp)", policy.beside(disk, ".kp"), role)
    )
    outs = [kp, Out("the recovery escrow (OUTPUT.recovery.p7m)", policy.beside(disk, ".recovery.p7m"), role)]
    if p.get("vtpm", "swtpm") == "swtpm" and not p.get("tpm_parent"):
        outs.append(Out("the vTPM state (OUTPUT.vtpm)", policy.beside(disk, ".vtpm"), role))
    return outs


def register(cli: click.Group) -> None:
    @cli.command("shield")
    @click.argument("template", type=click.Path(dir_okay=False, exists=True))
    @click.option("--pdk", required=True, type=click.Path(dir_okay=False, exists=True), help="Shielding data file.")
    @click.option("--owner", required=True, type=click.Path(exists=True), help="Owner guardian folder (with keys).")
    @click.option("--owner-password-env", default=None, metavar="VAR", help="Env var holding the owner PFX password.")
    @click.option(
        "--guardian",
        "guardians",
        multiple=True,
        type=click.Path(exists=True),
        help="Guardian folder/metadata for the PDK's guardians (repeatable).",
    )
    @click.option("-o", "--output", type=OUTPUT_FILE, help="Shielded VM disk (.vhdx).")
    @click.option(
        "--in-place", is_flag=True, help="Convert TEMPLATE itself (too large to copy); resumable: re-run after a crash."
    )
    @click.option(
        "--used-space-only",
        is_flag=True,
        help="With --in-place: leave spans free in NTFS and unallocated in TEMPLATE as they are "
        "(a dynamic VHDX keeps its size).",
    )
    @click.option("--kp", "kp_out", type=OUTPUT_FILE, help="Key protector output (default OUTPUT.kp).")
    @click.option(
        "--tpm-parent",
        type=click.Path(dir_okay=False, exists=True),
        help="Seal to an existing vTPM (TPM2B_PUBLIC, PEM or EK/SRK certificate) instead of a new vTPM key.",
    )
    @click.option(
        "--vtpm",
        type=click.Choice(["swtpm", "software"]),
        default="swtpm",
        show_default=True,
        help="swtpm: manufacture the VM's vTPM (state in OUTPUT.vtpm, its key in the KP); "
        "software: a software vTPM key in the KP.",
    )
    @click.option(
        "--pcrs",
        type=PCR_LIST,
        default="7,11",
        show_default=True,
        help="PCRs (0-23) the vTPM protector is sealed to, e.g. 7,11.",
    )
    @click.option("--pcr-values", default=None, help="N=HEX[,N=HEX...] or a file; or use --tcg-log.")
    @click.option("--tcg-log", type=click.Path(dir_okay=False, exists=True), help="Reference TCG log to replay.")
    @click.option("--bank", type=PCR_BANK, default="sha256", show_default=True, help="PCR bank.")
    @click.option(
        "--method",
        type=click.Choice(["xts-aes-128", "xts-aes-256"]),
        default="xts-aes-128",
        show_default=True,
        help="BitLocker cipher.",
    )
    @click.option("--report", "report_out", type=OUTPUT_FILE, help="Write the JSON report here too.")
    @click.option(
        "--subformat",
        type=click.Choice(["fixed", "dynamic"]),
        default=None,
        help="VHDX subformat of the VM disk (default: the template's).",
    )
    @click.option(
        "--template-passphrase-env",
        metavar="VAR",
        default=None,
        help="Linux templates: the template's LUKS2 passphrase from $VAR (prompted when omitted).",
    )
    @json_option
    @policy.derived_outputs(_shield_outputs)
    def shield_cmd(
        template: str,
        pdk: str,
        owner: str,
        owner_password_env: str | None,
        guardians: tuple[str, ...],
        output: str | None,
        in_place: bool,
        used_space_only: bool,
        kp_out: str | None,
        tpm_parent: str | None,
        vtpm: str,
        pcrs: list[int],
        pcr_values: str | None,
        tcg_log: str | None,
        bank: str,
        method: str,
        report_out: str | None,
        subformat: str | None,
        template_passphrase_env: str | None,
        as_json: bool,
    ) -> None:
        """Turn TEMPLATE + PDK into a shielded VM disk, its key protector and the owner's recovery escrow.

        A Linux template (protect --os linux) has its LUKS2 root re-keyed and the new key sealed in
        the VM's own vTPM as a systemd-tpm2 token."""
        from .. import api
        from ..atomic import write_bytes_atomic

        if (pcr_values is None) == (tcg_log is None):
            raise click.UsageError("give exactly one of --pcr-values and --tcg-log")
        if (output is None) != in_place:
            raise click.UsageError("give -o OUTPUT, or --in-place to convert the template itself")
        if used_space_only and not in_place:
            raise click.UsageError("--used-space-only applies to --in-place")
        res = api.shield(
            template,
            pdk,
            output,
            owner=owner,
            owner_password=guardian_password(owner, owner_password_env),
            guardians=guardians,
            kp=kp_out,
            tpm_parent=tpm_parent,
            pcrs=pcrs,
            pcr_values=_pcr_values(pcr_values),
            tcg_log=tcg_log,
            bank=bank,
            method=method,
            in_place=in_place,
            subformat=subformat,
            vtpm=vtpm,
            used_space_only=used_space_only,
            template_passphrase=env_or_prompt(template_passphrase_env, "template LUKS2 passphrase: "),
        )
        rep = res.to_json()
        if report_out:
            write_bytes_atomic(report_out, json.dumps(rep, indent=2).encode())
        emit(
            rep,
            as_json,
            lambda r: "\n".join(
                [
                    f"shielded VM disk {r['outputs']['disk']} (policy {r['policy']})",
                    f"key protector   {r['outputs']['kp']} (owner {r['owner']}, guardians {', '.join(r['guardians'])})",
                    f"recovery escrow {r['outputs']['recovery_escrow']} (encrypted to the owner)",
                    *(
                        [f"vTPM state      {r['outputs']['vtpm_state']} (swtpm, key in the KP)"]
                        if "vtpm_state" in r["outputs"]
                        else []
                    ),
                    (
                        "protectors      "
                        + ", ".join(f"{p['type']} {p['guid']}" for p in r["bitlocker"].get("protectors", []))
                        if "bitlocker" in r
                        else f"LUKS2 root      partition {r['luks']['partition']}: re-keyed; recovery key (escrowed), "
                        f"systemd-tpm2 token sealed in the vTPM to {r['luks']['token']['tpm2-pcr-bank']} PCRs "
                        f"{','.join(map(str, r['luks']['token']['tpm2-pcrs']))}"
                    ),
                ]
            ),
        )

    @cli.command("unlock")
    @click.argument("vm_disk", type=click.Path(dir_okay=False, exists=True))
    @click.option(
        "--kp", required=True, type=click.Path(dir_okay=False, exists=True), help="The VM's key protector (.kp)."
    )
    @click.option(
        "--guardian",
        required=True,
        type=click.Path(file_okay=False, exists=True),
        help="Guardian folder with keys and attestation policy (hgs init).",
    )
    @click.option(
        "--guardian-password-env", default=None, metavar="VAR", help="Env var holding the guardian's PFX password."
    )
    @click.option(
        "--host",
        "host_dir",
        required=True,
        type=click.Path(file_okay=False, exists=True),
        help="The host folder (host new): receives the released key.",
    )
    @click.option(
        "--host-evidence",
        type=click.Path(dir_okay=False, exists=True),
        help="Evidence (default: fresh host-key evidence).",
    )
    @click.option("--health-cert", type=click.Path(dir_okay=False, exists=True), help="Use this health certificate.")
    @click.option("--tpm", "tcti", default=None, help="Unseal through a real TPM, e.g. swtpm:host=127.0.0.1,port=2321.")
    @click.option("--pcr-values", default=None, help="PCR values of the VM's boot (default: those sealed to).")
    @click.option(
        "--tcg-log",
        type=click.Path(dir_okay=False, exists=True),
        help="The VM's boot log, played into its vTPM before the unseal (default: the reference boot).",
    )
    @click.option("-o", "--output", type=OUTPUT_FILE, help="Decrypted disk.")
    @click.option("--dry-run", is_flag=True, help="Check every step; write nothing.")
    @json_option
    def unlock_cmd(
        vm_disk: str,
        kp: str,
        guardian: str,
        guardian_password_env: str | None,
        host_dir: str,
        host_evidence: str | None,
        health_cert: str | None,
        tcti: str | None,
        pcr_values: str | None,
        tcg_log: str | None,
        output: str | None,
        dry_run: bool,
        as_json: bool,
    ) -> None:
        """Guardian dry run / unlock: attestation → key release → vTPM unseal → BitLocker → catalog verify."""
        from .. import api

        if not dry_run and output is None:
            raise UsageError("give -o OUTPUT, or --dry-run")
        pw, values = guardian_password(guardian, guardian_password_env), _pcr_values(pcr_values)
        if dry_run:
            rep = api.dry_run(
                vm_disk,
                kp,
                guardian,
                host_dir,
                guardian_password=pw,
                host_evidence=host_evidence,
                health_cert=health_cert,
                tpm_tcti=tcti,
                pcr_values=values,
                tcg_log=tcg_log,
            )
        else:
            assert output is not None
            rep = api.unlock(
                vm_disk,
                kp,
                guardian,
                host_dir,
                output,
                guardian_password=pw,
                host_evidence=host_evidence,
                health_cert=health_cert,
                tpm_tcti=tcti,
                pcr_values=values,
                tcg_log=tcg_log,
            )
        emit(rep.to_json(), as_json, _unlock_text, error=None if rep.ok else _unlock_error(rep))

    @cli.group("escrow")
    def escrow() -> None:
        """The owner's recovery-password escrow written by shield."""

    @escrow.command("open")
    @click.argument("escrow_file", type=click.Path(dir_okay=False, exists=True))
    @click.option("--owner", required=True, type=click.Path(exists=True), help="Owner guardian folder (with keys).")
    @click.option("--owner-password-env", default=None, metavar="VAR", help="Env var holding the owner PFX password.")
    @click.option("-o", "--output", type=OUTPUT_FILE, help="Write the recovery password here (0600).")
    @click.option("--show", is_flag=True, help="Print the recovery password on stdout.")
    @json_option
    def escrow_open(
        escrow_file: str, owner: str, owner_password_env: str | None, output: str | None, show: bool, as_json: bool
    ) -> None:
        """Recover a shielded VM's BitLocker recovery password with the owner's key."""
        from .. import api
        from ..secrets import write_secret_file

        if not output and not show:
            raise click.UsageError("give -o FILE or --show")
        data = api.open_escrow(escrow_file, owner=owner, owner_password=guardian_password(owner, owner_password_env))
        if output:
            write_secret_file(output, (data.recovery_password + "\n").encode())
        res = {"disk": data.disk, "volume_guid": data.volume_guid, "output": output}
        if show:
            res["recovery_password"] = data.recovery_password
        emit(res, as_json, lambda r: r.get("recovery_password") or f"recovery password written to {output}")

    @cli.command("build")
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @json_option
    @policy.derived_outputs(_recipe_paths)
    def build_cmd(recipe: str, as_json: bool) -> None:
        """Run a pipeline recipe (protect → vsc export → pdk new → shield) and write report.json."""
        from ..pipeline.build import run_build

        rep = run_build(recipe)
        emit(
            rep,
            as_json,
            lambda r: "\n".join(
                [f"{k:<16} {v}  sha256 {r['hashes'][k][:16]}..." for k, v in r["artifacts"].items()]
                + [f"done in {r['seconds']} s" + (f"; report {r['report']}" if r.get("report") else "")]
            ),
        )

    @cli.command("demo")
    @click.option(
        "-o",
        "--output",
        default="demo-out",
        show_default=True,
        type=OUTPUT_DIR,
        help="Folder for the throwaway identities and every artifact.",
    )
    @click.option(
        "--golden",
        default=None,
        type=click.Path(dir_okay=False, exists=True),
        help="Golden disk (default: fixtures/golden.vhdx of the source tree).",
    )
    @json_option
    def demo_cmd(output: str, golden: str | None, as_json: bool) -> None:
        """Throwaway identities, then the whole pipeline on the golden disk and the guardian dry run."""
        from ..pipeline.demo import run_demo

        g = golden or str(Path(__file__).resolve().parents[2] / "fixtures" / "golden.vhdx")
        if not Path(g).exists():
            raise NotFoundError("golden disk not found", g, "pass --golden DISK")
        rep = run_demo(g, output, say=(lambda s: None) if as_json else click.echo)
        if as_json or not rep["ok"]:
            emit(
                rep,
                as_json,
                None,
                error=None
                if rep["ok"]
                else TemplateToolError("the demo pipeline failed", output, "see the steps above"),
            )
