"""Host attestation evidence (check_evidence against an empty policy)."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.hgs.attest import AttestationPolicy, check_evidence

_POLICY = AttestationPolicy()


def target(data: bytes) -> None:
    check_evidence(_POLICY, data)


if __name__ == "__main__":
    common.main(target)
