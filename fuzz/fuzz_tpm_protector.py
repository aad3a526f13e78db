"""vTPM protector payloads (parse_protector)."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.tpm.protector import parse_protector


def target(data: bytes) -> None:
    parse_protector(data)


if __name__ == "__main__":
    common.main(target)
