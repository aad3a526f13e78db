"""TCG PC Client event logs (parse_log + replay)."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.tpm.eventlog import parse_log, replay


def target(data: bytes) -> None:
    replay(parse_log(data))


if __name__ == "__main__":
    common.main(target)
