"""An offline demonstration of the loss alone: the layer x dim loss matrix and backend timings.

    python -m m2d_kernels.demo            (or the console script m2d-demo)

At its default size (L=7, B=512, N=1024, D=384) it takes about 10-30 s on a 2-core CPU, plus
the one-time build of the C++ backend (about a minute) on its first run.

Builds embeddings for L layers whose quality improves with depth and with dimension,
computes every (layer, dim) InfoNCE in one call, prints the [L, M] matrix, and times
forward+backward of the fastest available backend against ``reference`` on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import m2d_kernels as m2d
from m2d_kernels import backends


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


def time_forward_backward(queries, docs, dims, backend: str, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up (and builds compiled backends)
        q = queries.detach().requires_grad_()
        d = docs.detach().requires_grad_()
        start = time.perf_counter()
        m2d.matryoshka_2d_infonce(q, d, dims, backend=backend).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def format_matrix(losses: torch.Tensor, dims, layer_names) -> str:
    header = "layer \\ dim " + "".join(f"{d:>8}" for d in dims)
    rows = [f"{name:>11} " + "".join(f"{v:8.3f}" for v in row) for name, row in zip(layer_names, losses.tolist())]
    return "\n".join([header, *rows])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=7, help="number of layers L (default 7)")
    parser.add_argument("--batch", type=int, default=512, help="queries per batch B (default 512)")
    parser.add_argument("--negatives", type=int, default=1, help="hard negatives per query (default 1: N = 2B)")
    parser.add_argument("--features", type=int, default=384, help="embedding size D (default 384)")
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256, 384])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per backend (median)")
    args = parser.parse_args(argv)

    n_docs = args.batch * (1 + args.negatives)
    queries, docs = synthetic_embeddings(args.layers, args.batch, n_docs, args.features)
    dims = tuple(args.dims)
    losses = m2d.matryoshka_2d_infonce(queries, docs, dims, reduction="none")
    print(f"InfoNCE per (layer, dim), L={args.layers} B={args.batch} N={n_docs} D={args.features}, scale 20:")
    print(format_matrix(losses, dims, [f"layer {i + 1}" for i in range(args.layers)]))

    fast = backends.chosen_name("auto", torch.device("cpu"))
    print(f"\nforward+backward on the CPU ({torch.get_num_threads()} threads), median of {args.repeats}:")
    reference_time = time_forward_backward(queries, docs, dims, "reference", args.repeats)
    fast_time = time_forward_backward(queries, docs, dims, fast, args.repeats)
    print(f"  reference (one B x N matrix per pair): {reference_time * 1e3:8.1f} ms")
    print(f"  {fast:<9} (fused, prefix trick)      : {fast_time * 1e3:8.1f} ms   ({reference_time / fast_time:.2f}x)")


if __name__ == "__main__":
    main()
