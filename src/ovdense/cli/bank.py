"""``ovdense bank {info,build}``: inspect a CorrCLIPv2 memory bank (``info``) or build one (``build``,
:mod:`ovdense.cli.bank_build`)."""

from __future__ import annotations

from .bank_build import register as register_build


def register(subparsers) -> None:
    """Add ``ovdense bank {info,build}`` to the CLI's subparsers."""
    bank = subparsers.add_parser("bank", help="inspect or build a CorrCLIPv2 memory bank")
    bank_subparsers = bank.add_subparsers(dest="bank_command", required=True, metavar="COMMAND")
    text = (
        "print what a memory bank holds (images, regions, CLIP stores, the index) and check that the stores, the "
        "manifest and the index agree (exit 2 with one line if not)"
    )
    info = bank_subparsers.add_parser("info", help="print and check a memory bank", description=text)
    info.add_argument("bank", metavar="BANK", help="the bank's root folder (the authors' memory_bank/)")
    info.add_argument("--name", default=None, help="which bank, when the folder holds several")
    info.add_argument("--vfm", default=None, help="which index, when the bank has several ({name}_{vfm}.faiss)")
    info.set_defaults(func=run_info)
    register_build(bank_subparsers)


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # unreachable: GiB is the last unit


def info_lines(info: dict) -> list[str]:
    """The lines ``ovdense bank info`` prints for :meth:`MemoryBank.info`'s dict."""
    lines = [
        f"bank {info['name']} in {info['root']}",
        f"  images   {info['images']}",
        f"  regions  {info['regions']}",
    ]
    for name, s in info["stores"].items():
        lines.append(
            f"  store    {name}: {s['rows']} x {s['dim']} {s['dtype']}, {human_bytes(s['bytes'])} ({s['path']})"
        )
    if not info["stores"]:
        lines.append("  store    none")
    index = info["index"]
    if index is None:
        lines.append("  index    none readable")
    else:
        if index["nlist"] is not None:
            search = (
                f"nlist {index['nlist']}, PQ {index['pq_m']}x{index['pq_nbits']} bits, "
                f"nprobe min(256, nlist) = {index['nprobe']}"
            )
        else:
            search = "exact search"
        lines.append(
            f"  index    {index['vfm']}: {index['type']}, {index['dim']}-d keys, metric {index['metric']}, {search}, "
            f"ntotal {index['ntotal']}, {human_bytes(index['bytes'])} ({index['path']})"
        )
    return lines


def run_info(args) -> int:
    from ..bank.memory_bank import MemoryBank
    from ..errors import OvdenseError

    bank = MemoryBank.open(args.bank, name=args.name, vfm=args.vfm)
    info = bank.info()
    print("\n".join(info_lines(info)))
    problems = info["problems"]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise OvdenseError(problems[0] + more)
    print("  ok       the stores, the manifest and the index agree")
    return 0
