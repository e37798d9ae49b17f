"""Command line: ``hippolm <command> ...`` (also ``python -m hippolm``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .runtime import HelpFormatter


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _add_mqar(sub: argparse._SubParsersAction) -> None:
    from .layers import MIXER_TYPES
    from .tasks.mqar import MQARSettings

    d = MQARSettings()
    p = sub.add_parser("mqar", help="train a small model on multi-query associative recall and report accuracy",
                       formatter_class=HelpFormatter)
    p.add_argument("--mixer", choices=MIXER_TYPES, default=d.mixer)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--layers", type=int, default=d.num_layers)
    p.add_argument("--heads", type=int, default=d.num_heads)
    p.add_argument("--expand-v", type=int, default=d.expand_v, help="value dim = head dim * expand_v")
    p.add_argument("--state-size", type=int, default=None, help="Mamba-2 key dim per head (default: head dim)")
    p.add_argument("--window", type=int, default=d.window, help="span of sliding-window attention (swa)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--pairs", type=_int_list, default=d.pairs, help="numbers of key-value pairs, e.g. 4,8,16")
    p.add_argument("--vocab", type=int, default=d.vocab_size)
    p.add_argument("--train-examples", type=int, default=d.train_examples, help="total, split over --pairs")
    p.add_argument("--eval-examples", type=int, default=d.eval_examples, help="per number of pairs")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--a-init-range", type=float, nargs=2, default=d.a_init_range, metavar=("LO", "HI"),
                   help="recurrent layers' decay rates start at A ~ U(LO, HI) (default Mamba-2's 1 16)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_mqar)


def _run_mqar(args: argparse.Namespace) -> int:
    from .tasks.mqar import MQARSettings, train_mqar, write_json

    settings = MQARSettings(
        mixer=args.mixer, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
        expand_v=args.expand_v, state_size=args.state_size, window=args.window, seq_len=args.seq_len,
        pairs=args.pairs, vocab_size=args.vocab, train_examples=args.train_examples,
        eval_examples=args.eval_examples, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, seed=args.seed, device=args.device, a_init_range=tuple(args.a_init_range),
    )
    try:
        settings.check()
    except ValueError as e:
        print(f"hippolm mqar: error: {e}", file=sys.stderr)
        return 2
    try:
        result = train_mqar(settings, progress=not args.quiet)
    except KeyboardInterrupt:
        print("hippolm mqar: interrupted", file=sys.stderr)
        return 130
    print(f"MQAR {args.mixer} d_model={args.d_model} seq_len={args.seq_len} "
          f"({result['parameters']:,} parameters, {result['train_seconds']:.0f} s on {result['device']})")
    print("pairs  accuracy")
    for pairs, acc in result["accuracy"].items():
        print(f"{pairs:>5}  {acc:8.4f}")
    print(f" mean  {result['mean_accuracy']:8.4f}   (loss {result['loss_first']:.3f} -> {result['loss_last']:.3f})")
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")
    return 0


# Commands with their own argument parser: ``hippolm <name> ...`` hands every argument to
# ``<module>.<function>(argv)``; the module is imported only when the command runs.
_PASSTHROUGH = {
    "distill": ("train.distill", "main", "train an AHN memory by self-distillation (hippolm distill -h)"),
    "eval": ("eval.cli", "main", "long-context evaluation: full attention vs SWA vs AHN (hippolm eval -h)"),
    "cost": ("accounting", "cost_main", "FLOPs, cache and peak memory of full attention vs AHN (hippolm cost -h)"),
    "demo": ("demo", "main", "distil a memory into the built-in model and compare full attention, SWA-only "
             "and AHN (hippolm demo -h)"),
}


def _add_passthrough(sub: argparse._SubParsersAction, name: str) -> None:
    module, function, help_text = _PASSTHROUGH[name]
    p = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
    p.add_argument("argv", nargs=argparse.REMAINDER)

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f".{module}", __package__), function)(args.argv)

    p.set_defaults(func=run)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from .generate import add_arguments

    p = sub.add_parser("generate", help="generate text with full attention, SWA-only or an AHN memory; prints "
                       "the cache bytes", formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from .generate import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hippolm", description="hippolm command line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_mqar(sub)
    for name in ("distill", "eval", "cost"):
        _add_passthrough(sub, name)
    _add_generate(sub)
    _add_passthrough(sub, "demo")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
