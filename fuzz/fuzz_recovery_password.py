"""Recovery passwords (parse_recovery_password on any text)."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.bitlocker.keys import parse_recovery_password


def target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    parse_recovery_password(fdp.ConsumeUnicode(200))


if __name__ == "__main__":
    common.main(target)
