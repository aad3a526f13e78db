"""Protect a golden disk, make shielding data, shield the template and ask the guardian: in Python.

    python shield_in_python.py WORKDIR PKCS11_MODULE

WORKDIR holds golden.vhdx, reference.tcglog (the VM's boot log), fabric/ (`templatetool guardian
new` + `hgs init`) and host/ (`templatetool host new` + `hgs register-host`); the template-signing
key is in a PKCS#11 token (here SoftHSM2). See docs/api.md.
"""

import sys
from pathlib import Path

import templatetool as tt

work, module = Path(sys.argv[1]), sys.argv[2]
pin, owner_password = "1234", "correct horse battery staple"  # values your program holds (a vault, a keyring)

signer = tt.open_signer(f"pkcs11:token=tt-test;object=rsa-key?module-path={module}", pin=pin)
template = tt.protect(work / "golden.vhdx", work / "template.vhdx", name="WS2025-Datacenter", version="10.0.26100.1",
                      signer=signer)
owner = tt.new_guardian("Owner", work / "owner", password=owner_password)
pdk = tt.new_pdk(work / "tenant.pdk", owner=owner.guardian, guardians=[work / "fabric"], templates=[template.catalog],
                 version_rule="ge", policy="shielded", allow_untrusted_root=True)
vm = tt.shield(template.output, pdk.output, work / "vm.vhdx", owner=owner.guardian, guardians=[work / "fabric"],
               tcg_log=work / "reference.tcglog")
check = tt.dry_run(vm.disk, vm.kp, work / "fabric", work / "host")
for step in check.steps:
    print(f"{step.status:>7}  {step.name}: {step.detail}")
print("result:", check.summary)
sys.exit(0 if check.ok else 1)
