"""`renderfarm loras`: the LoRA library (renderfarm/loras): each LoRA's name, family, key style, rank,
size and A1111 short hash. No farm needed.

A file that cannot be used (its family cannot be told, a duplicate name, a damaged copy) is listed with its
reason; it does not stop the listing, nor change the exit code: the listing itself succeeded."""

from __future__ import annotations

import argparse
from pathlib import Path

from renderfarm.cli.common import emit, settings_from
from renderfarm.errors import CliError


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             with_redis: argparse.ArgumentParser) -> None:
    loras = sub.add_parser("loras", parents=[common], help="list the LoRA library")
    loras.add_argument("--dir", type=Path, metavar="PATH",
                       help="the library folder (default: the lora_dir setting, else the stand-in LoRAs, "
                            "built offline on first use)")
    loras.set_defaults(func=cmd_loras)


def cmd_loras(args: argparse.Namespace) -> int:
    """List the library: usable LoRAs first, then the files that cannot be used, with why."""
    from renderfarm.loras.assets import library_for
    from renderfarm.loras.library import LoraError

    library = library_for(settings_from(args), args.dir)  # the folder a node of these settings indexes
    try:
        loras = library.scan()
    except LoraError as exc:
        raise CliError(f"{'--dir' if args.dir else 'lora_dir'}: {exc}") from None
    problems = library.problems
    payload = {
        "ok": True,
        "dir": str(library.folder),
        "loras": [info.model_dump(mode="json") for info in loras],
        "problems": [problem.model_dump(mode="json") for problem in problems],
    }
    emit(args, payload, _table(library.folder, loras, problems))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _table(folder: Path, loras: list, problems: list) -> str:
    if not loras and not problems:
        return f"{folder}: no .safetensors LoRAs"
    rows = [("NAME", "FAMILY", "STYLE", "RANK", "SIZE", "HASH")]
    rows += [(i.name, i.family, i.style, str(i.rank), _size(i.size_bytes), i.short_hash) for i in loras]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = [f"{folder}:"]
    lines += ["  " + "  ".join(cell.rjust(w) if c in (3, 4) else cell.ljust(w)
                               for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    if problems:
        lines.append(f"{len(problems)} file{'s' if len(problems) > 1 else ''} cannot be used:")
        lines += [f"  {p.name}: {p.error}" for p in problems]
    return "\n".join(lines)
