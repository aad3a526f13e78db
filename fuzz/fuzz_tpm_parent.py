"""TPM parent public keys: TPM2B_PUBLIC / PEM / certificates (parse_parent_bytes)."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.tpm.keys import parse_parent_bytes


def target(data: bytes) -> None:
    parse_parent_bytes(data)


if __name__ == "__main__":
    common.main(target)
