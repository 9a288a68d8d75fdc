"""`renderfarm plan`: which profile a node with this card would choose for a job, and why. Pure planning:
no farm needed."""

from __future__ import annotations

import argparse

from renderfarm.cli.common import EXIT_ERROR, emit, parse_size, settings_from
from renderfarm.errors import CliError

DEFAULT_PLAN_CC = "8.6"  # `plan` without --gpu or --compute-capability: an Ampere card

def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             with_redis: argparse.ArgumentParser) -> None:
    plan = sub.add_parser("plan", parents=[common], help="which profile a card would choose for a job")
    plan.add_argument("--model", required=True)
    plan.add_argument("--vram", type=float, required=True, metavar="GIB", help="the card's VRAM in GiB")
    plan.add_argument("--size", type=parse_size, help="WIDTHxHEIGHT (default: the model's)")
    plan.add_argument("--batch", type=int, default=1, help="images rendered together")
    plan.add_argument("--compute-capability", metavar="X.Y",
                      help=f"e.g. 7.5 (Turing), 8.9 (Ada) (default: the --gpu card's, else {DEFAULT_PLAN_CC})")
    plan.add_argument("--gpu", help="card name, e.g. 'Quadro RTX 6000' (its figures refine the estimate)")
    plan.add_argument("--margin", type=float, default=0.5, metavar="GIB", help="VRAM kept free (default 0.5)")
    plan.add_argument("--ram", type=float, metavar="GIB",
                      help="the machine's RAM: profiles whose host memory exceeds it are not chosen "
                           "(default: not checked)")
    plan.add_argument("--steps", type=int, metavar="N", help="denoising steps per job (default: the model's)")
    plan.set_defaults(func=cmd_plan)


DEFAULT_PLAN_CC = "8.6"  # `plan` without --gpu or --compute-capability: an Ampere card


def cmd_plan(args: argparse.Namespace) -> int:
    """What a node with this card would choose for a job, and why: pure planning, no farm needed."""
    from renderfarm.planning.catalog import default_catalog
    from renderfarm.planning.choose import choose_profile, plan_report
    from renderfarm.planning.devices import device_from_spec, known_card

    settings = settings_from(args)
    entry = default_catalog(settings.models_file).get(args.model)
    width, height = args.size or (entry.default_size, entry.default_size)
    card = known_card(args.gpu, args.vram) if args.gpu else None
    cc = args.compute_capability or (card.compute_capability if card else DEFAULT_PLAN_CC)
    if args.ram is not None and args.ram <= 0:
        raise CliError(f"--ram: must be positive (the machine's RAM in GiB), got {args.ram:g}")
    if args.batch < 1:
        raise CliError(f"--batch: must be at least 1, got {args.batch}")
    try:
        device = device_from_spec(args.gpu or f"{args.vram:g} GiB card", args.vram, cc, ram_gib=args.ram)
    except ValueError as exc:  # a bad --vram or --compute-capability: the device says which and why
        raise CliError(str(exc)) from None
    report = plan_report(entry, device, width, height, args.batch, args.margin, steps=args.steps)
    if args.json:
        emit(args, {"ok": True, **report})
    else:
        print(choose_profile(entry, device, width, height, args.batch, args.margin, steps=args.steps).explain())
    return 0 if report["chosen"] else EXIT_ERROR
