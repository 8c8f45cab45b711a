"""``polyak average`` and ``polyak inspect``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .._engine.members import ORDER_HELP, ORDERS
from .._schemes import SCHEMES, get_scheme


def _weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be comma-separated numbers, got {text!r}") from None


def _formats() -> list[str]:
    from ..formats import format_names

    return format_names()


AVERAGE_EPILOG = """\
examples:
  polyak average runs/ckpt_*.safetensors -o final.safetensors --scheme exponential --alpha 2 --last 10
  polyak average epoch_*.pt -o avg.pt --scheme linear --key model
  polyak average a.pt b.pt c.pt -o avg.safetensors --weights 1,2,4 --strip-prefix module.
  polyak average big/model.safetensors.index.json big2/model.safetensors.index.json -o out/model.safetensors --shard-size 5GB
  polyak average out/checkpoint-* -o avg/ --last 3     (Trainer folders in, a folder from_pretrained opens out)
  polyak average out/checkpoint-*/model.safetensors -o avg.safetensors --last 3 --scheme linear
  polyak average step_1000/ step_2000/ step_3000/ -o avg.safetensors --key model     (torch.distributed.checkpoint folders)
  polyak average ckpt_*.safetensors -o avg.safetensors --workers 4
  torchrun --nnodes 2 --nproc_per_node 8 ... -m polyak average /shared/ckpt_* -o /shared/avg.safetensors --distributed

With --workers N (N > 1) or --distributed the output is always sharded safetensors:
avg.safetensors.index.json plus avg-00001-of-0000n.safetensors, ... beside the -o path
(one shard per worker unless --shard-size is given); tensors are bit-identical to --workers 1.

Members are ordered oldest → newest by the numbers in the part of their paths that differs
(model_9 before model_10, checkpoint-5/ before checkpoint-40/); members that no number orders
are refused when the result depends on their order (pick one with --order).
With j = 0 for the newest of the n members, the weights are
  {formulas},
normalised to sum to 1.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "average",
        help="average checkpoints into a new checkpoint",
        description="Average the weights of checkpoints (safetensors, .npz, .pt, Keras files) into one.",
        epilog=AVERAGE_EPILOG.format(
            formulas=", ".join(f"{s.name}: {s.formula}" for s in SCHEMES.values() if s.name != "custom")
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files or folders (any order; see --order)")
    p.add_argument("-o", "--out", required=True, help="output file (its suffix picks the format) or folder (a name ending in /, or a name without a suffix that is an existing folder or goes with folder inputs): a folder from_pretrained opens")
    p.add_argument("--scheme", choices=[s for s in SCHEMES if s != "custom"], default="equal", help="weighting scheme (default: equal)")
    alpha = get_scheme("exponential").param("alpha").default
    p.add_argument("--alpha", type=float, help=f"decay rate of --scheme exponential (default: {alpha:g})")
    p.add_argument("--weights", type=_weights, help="custom weights, oldest → newest, e.g. 1,2,4 (replaces --scheme)")
    p.add_argument("--last", type=int, metavar="N", help="average only the newest N checkpoints")
    p.add_argument("--order", choices=ORDERS, default="number", help=ORDER_HELP)
    p.add_argument("--format", help="input format, instead of detecting it from the suffix")
    p.add_argument("--out-format", help="output format, instead of the output suffix")
    p.add_argument("--key", help="key of the state dict in nested .pt checkpoints (e.g. model, state_dict, ema)")
    p.add_argument("--strip-prefix", action="append", default=[], metavar="PREFIX", help="remove this prefix from tensor names (repeatable), e.g. module. or _orig_mod.")
    p.add_argument("--dtype", help="output dtype of floating tensors (default: as the input), e.g. float32")
    p.add_argument("--int-policy", choices=("newest", "error"), default="newest", help="integer/bool tensors: copy from the newest member (default) or refuse")
    p.add_argument("--checksum", action="store_true", help="record each member's SHA-256 in the output metadata (an extra read pass)")
    p.add_argument("--shard-size", help="split a safetensors output into shards of at most this size, e.g. 5GB (a folder output is otherwise sharded like its newest member)")
    p.add_argument("--keep-optimizer", action="store_true", help="Keras archives: copy the newest member's optimizer state instead of dropping it")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="split the tensors across N worker threads; the output becomes <stem>.safetensors.index.json + shards (default: 1)")
    p.add_argument("--distributed", action="store_true", help="run as one rank of a torchrun job: each rank averages a share of the tensors from shared storage, rank 0 writes the index")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=run_average)

    q = sub.add_parser(
        "inspect",
        help="list the tensors, shapes, dtypes and metadata of a checkpoint",
        description="Describe a checkpoint: tensors, shapes, dtypes, sizes, total parameters, metadata.",
    )
    q.add_argument("checkpoint", metavar="CKPT")
    q.add_argument("--format", help="input format, instead of detecting it from the suffix")
    q.add_argument("--key", help="key of the state dict in nested .pt checkpoints")
    q.add_argument("--all", action="store_true", help="list every tensor (default: the first 50)")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=run_inspect)


def run_average(args: argparse.Namespace) -> int:
    from .._engine.average import average
    from .._progress import human_bytes

    result = average(
        args.checkpoints,
        scheme=args.scheme,
        alpha=args.alpha,
        weights=args.weights,
        last=args.last,
        order=args.order,
        out=args.out,
        format=args.format,
        out_format=args.out_format,
        key=args.key,
        strip_prefix=args.strip_prefix,
        dtype=args.dtype,
        int_policy=args.int_policy,
        checksum=args.checksum,
        shard_size=args.shard_size,
        keep_optimizer=args.keep_optimizer,
        force=args.force,
        progress=not args.quiet and not args.distributed,
        workers=args.workers,
        distributed=args.distributed,
    )
    if not args.quiet and result.rank == 0:  # one summary per distributed job
        print(f"averaged {len(result.members)} checkpoints ({result.scheme}), oldest → newest: {_members_line(result)}")
        print(
            f"{result.averaged} tensors averaged, {result.copied} copied from the newest member, "
            f"{human_bytes(result.nbytes)} in {result.seconds:.2f} s"
        )
        for f in result.files:
            print(f"wrote {f}")
        for note in result.notes:
            print(note)
    return 0


#: A summary names this many members at most (the oldest and the newest, the rest counted).
_SHOWN = 12


def _members_line(result: Any) -> str:
    """Each member by the part of its path that tells it apart, with its weight."""
    items = [f"{name} ({w:.4g})" for name, w in zip(result.names, result.weights)]
    if len(items) > _SHOWN:
        half = _SHOWN // 2
        items = [*items[:half], f"... {len(items) - _SHOWN} more ...", *items[-half:]]
    return ", ".join(items)


def run_inspect(args: argparse.Namespace) -> int:
    from .._engine.inspect import format_inspection, inspect

    ins = inspect(args.checkpoint, format=args.format, key=args.key)
    if args.json:
        json.dump(ins.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_inspection(ins, limit=None if args.all else 50))
    return 0
