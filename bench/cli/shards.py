"""`bench shards make NAME | check DIR | list`: build, verify and list webdataset shard sets."""
from __future__ import annotations

import sys
from pathlib import Path


def _fail(msg: str) -> int:
    print(f"bench shards: error: {msg}", file=sys.stderr)
    return 2


def _make(args) -> int:
    print(f"bench shards make {args.name}: loading", flush=True)  # the first line, before seconds of imports
    from data_shards.converters import CONVERTERS, convert
    from data_shards.paths import default_root

    out_root = Path(args.out).expanduser().resolve() if args.out else default_root()
    if args.name not in CONVERTERS:
        return _fail(f"unknown data set {args.name!r}; known: {', '.join(sorted(CONVERTERS))}")
    try:
        options = {"split": args.split} if args.split else {}
        out = convert(args.name, root=args.root, out_root=out_root, size=args.size, workers=args.workers,
                      image_format=args.format, maxcount=args.maxcount, options=options)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else repr(e))
    print(out)
    return 0


def _check(args) -> int:
    from data_shards.check import check_dataset

    d = Path(args.dir)
    if not d.is_dir():
        return _fail(f"no such folder {d}")
    problems = check_dataset(d)
    for p in problems:
        print(p)
    if problems:
        print(f"{d}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{d}: ok")
    return 0


def _list(args) -> int:
    from data_shards.converters import CONVERTERS

    for name, conv in sorted(CONVERTERS.items()):
        print(f"{name:12s} {conv.describe}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("shards", help="build, check and list webdataset shard sets")
    sp = p.add_subparsers(dest="shards_command", required=True)
    m = sp.add_parser("make", help="convert a data set into shards (digits needs no --root)")
    m.add_argument("name", help="converter name (see `bench shards list`)")
    m.add_argument("--root", default=None, help="source folder, as the publisher ships it")
    m.add_argument("--out", default=None, help="shards root (default: $BENCH_SHARDS or ./shards)")
    m.add_argument("--size", type=int, default=None, help="resize the shorter side to S (e.g. 256 for 224 training)")
    m.add_argument("--workers", type=int, default=2, help="parallel encoding processes")
    m.add_argument("--format", choices=["png", "jpg"], default=None, help="image format (default: per data set)")
    m.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    m.add_argument("--split", default=None, help="caltech256: random (default; 150/class, seed 0, clutter "
                   "excluded) or authors (AutoLoRa's: first 150 per class in file order, 257 classes)")
    m.set_defaults(func=_make)
    c = sp.add_parser("check", help="verify checksums, counts and labels of a shard folder")
    c.add_argument("dir")
    c.set_defaults(func=_check)
    ls = sp.add_parser("list", help="list the known converters")
    ls.set_defaults(func=_list)
