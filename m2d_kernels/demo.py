"""An offline demonstration of the loss alone: the layer x dim loss matrix and backend timings.

    python -m m2d_kernels.demo            (or the console script m2d-demo)

At its default size (L=7, B=512, N=1024, D=384) it takes about 10-30 s on a 2-core CPU, plus
the one-time build of the C++ backend on its first run (docs/benchmarks.md has the measured cost).

Builds embeddings for L layers whose quality improves with depth and with dimension,
computes every (layer, dim) InfoNCE in one call, prints the [L, M] matrix, and times
forward+backward of the fastest available backend against ``reference`` on the CPU.
"""

from __future__ import annotations

import argparse

import torch

import m2d_kernels as m2d
from m2d_kernels import backends, timing


def synthetic_embeddings(n_layers: int, n_queries: int, n_docs: int, n_features: int, seed: int = 0):
    """Queries and docs where deeper layers and leading dims carry more of the shared signal."""
    generator = torch.Generator().manual_seed(seed)
    topic = torch.randn(n_docs, n_features, generator=generator)
    # Matryoshka-like spectrum: leading features carry most of the signal.
    spectrum = torch.linspace(1.5, 0.3, n_features)
    layers_q, layers_d = [], []
    for layer in range(n_layers):
        noise = 1.0 + 3.0 * (1 - layer / max(n_layers - 1, 1))
        docs = topic * spectrum + noise * torch.randn(n_docs, n_features, generator=generator)
        queries = topic[:n_queries] * spectrum + noise * torch.randn(n_queries, n_features, generator=generator)
        layers_q.append(queries)
        layers_d.append(docs)
    return torch.stack(layers_q), torch.stack(layers_d)


def loss_step(queries, docs, dims, backend: str):
    """One forward + backward of ``backend`` on fresh leaves of ``queries [L, B, D]`` and ``docs [L, N, D]``."""
    q = queries.detach().requires_grad_()
    d = docs.detach().requires_grad_()

    def step():
        q.grad = d.grad = None
        m2d.matryoshka_2d_infonce(q, d, dims, backend=backend).backward()

    return step


def format_matrix(losses: torch.Tensor, dims, layer_names) -> str:
    header = "layer \\ dim " + "".join(f"{d:>8}" for d in dims)
    rows = [f"{name:>11} " + "".join(f"{v:8.3f}" for v in row) for name, row in zip(layer_names, losses.tolist())]
    return "\n".join([header, *rows])


def _int_list(text: str) -> tuple[int, ...]:
    """``--dims 32,64,128``, as m2d-train spells it; an empty item (``32,,64``) is a typo, not (32, 64)."""
    items = [item.strip() for item in text.split(",")]
    try:
        if "" in items:
            raise ValueError
        return tuple(int(item) for item in items)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line and exit status 2, as m2d-train: the options are one --help away.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="m2d-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=7, help="number of layers L (default 7)")
    parser.add_argument("--batch", type=int, default=512, help="queries per batch B (default 512)")
    parser.add_argument("--negatives", type=int, default=1,
                        help="hard negatives per query, N = B * (1 + negatives) (default 1)")
    parser.add_argument("--features", type=int, default=384, help="embedding size D (default 384)")
    # nargs="+" only to refuse the space-separated form of earlier versions with a message that shows the new one.
    parser.add_argument("--dims", type=_int_list, nargs="+", default=[(32, 64, 128, 256, 384)], metavar="D1,D2,...",
                        help="nested dims, comma-separated and strictly increasing, the last at most --features "
                             "(default 32,64,128,256,384)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds per backend, interleaved (reference, fast, fast, reference, ...); "
                             "the median and spread are printed (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads while timing (default: the cores this process may use, at most "
                             "torch's default)")
    return parser


def check_args(args) -> None:
    """Raise ValueError naming the flag for values that cannot work."""
    for flag, value in (("--layers", args.layers), ("--batch", args.batch), ("--features", args.features),
                        ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.negatives < 0:
        raise ValueError(f"--negatives must be >= 0, got {args.negatives}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if len(args.dims) > 1:
        spaced = " ".join(",".join(map(str, item)) for item in args.dims)
        joined = ",".join(",".join(map(str, item)) for item in args.dims)
        raise ValueError(f"--dims takes one comma-separated list: --dims {joined}, not --dims {spaced}")
    dims = args.dims[0]
    if dims[0] < 1 or any(b <= a for a, b in zip(dims, dims[1:], strict=False)):
        raise ValueError(f"--dims must be strictly increasing positive ints, got {','.join(map(str, dims))}")
    if dims[-1] > args.features:
        raise ValueError(f"--dims: {dims[-1]} is larger than --features {args.features}")


def main(argv=None) -> int:
    """Run ``m2d-demo``; a bad value exits with status 2 and one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))

    n_docs = args.batch * (1 + args.negatives)
    queries, docs = synthetic_embeddings(args.layers, args.batch, n_docs, args.features)
    dims = tuple(args.dims[0])
    losses = m2d.matryoshka_2d_infonce(queries, docs, dims, reduction="none")
    print(f"InfoNCE per (layer, dim), L={args.layers} B={args.batch} N={n_docs} D={args.features}, scale 20:")
    print(format_matrix(losses, dims, [f"layer {i + 1}" for i in range(args.layers)]))

    fast = backends.chosen_name("auto", torch.device("cpu"))
    contenders = {"reference": loss_step(queries, docs, dims, "reference"), fast: loss_step(queries, docs, dims, fast)}
    result = timing.compare(contenders, rounds=args.repeats, threads=args.threads)
    print(f"\nforward+backward on the CPU: median of {timing.format_conditions(result)}:")
    print(f"  reference (one B x N matrix per pair): {timing.format_timing(result.timings['reference'])}")
    print(f"  {fast:<9} (fused, prefix trick)      : {timing.format_timing(result.timings[fast])}   "
          f"({result.ratio('reference', fast):.2f}x)")
    warning = timing.format_warning(result)
    if warning:
        print(warning)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
