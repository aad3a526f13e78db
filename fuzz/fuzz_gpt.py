"""GPT / MBR partition tables (read_partition_table on an in-memory disk)."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.disk import select_volume
    from templatetool.disk.partitions import read_partition_table


def target(data: bytes) -> None:
    dev = common.MemDev(data, size=max(len(data), 4 << 20))
    t = read_partition_table(dev)
    if t.scheme is not None:
        select_volume(dev, None)


if __name__ == "__main__":
    common.main(target)
