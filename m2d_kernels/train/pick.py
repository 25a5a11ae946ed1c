"""``m2d-pick RUN_DIR``: which (layer, dim) pair to serve, from a run's quality grid and its measured cost grid.

Every pair has a quality (one metric of one evaluation set of the run's ``summary.json``, after
training) and two costs: the encode time of the encoder cut at its layer (milliseconds per 1,000
texts) and the bytes of one stored vector at its dim (fp32, int8 or binary; ``cost.json``, see
:mod:`m2d_kernels.train.cost`). A pair is on the **Pareto front** when no other pair is at least as
good on all three and better on one: the only pairs worth serving.

The **pick** under a budget: among the pairs within every given limit (``max_ms_per_1k_texts``,
``max_bytes_per_vector``, ``min_quality``, or ``within`` points of the full pair: the deepest layer at
the widest dim), the one of highest quality when a cost limit is given (or no limit at all), else the
cheapest (least encode time, then fewest bytes) that meets the quality limit; ties go to the cheaper
pair, or the better one. The optimum of either rule is on the front, so the pick searches the front only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from m2d_kernels.train.cost import PRECISION_BYTES, CostGrid

COST_NAME = "cost.json"
PICK_NAME = "pick.json"
PLOT_NAME = "pareto.png"
SUMMARY_NAME = "summary.json"
PROG = "m2d-pick"


@dataclass(frozen=True)
class Candidate:
    """One (layer, dim) pair: its quality and costs."""

    layer: int
    dim: int
    quality: float
    encode_ms_per_1k_texts: float
    bytes_per_vector: int
    search_ms_per_1k_queries: float


@dataclass(frozen=True)
class Budget:
    """Limits a served pair must meet (None: no limit). ``within``: quality at least the full pair's minus this
    many points. ``precision``: how vectors are stored, for ``max_bytes_per_vector``."""

    max_ms_per_1k_texts: float | None = None
    max_bytes_per_vector: int | None = None
    min_quality: float | None = None
    within: float | None = None
    precision: str = "fp32"

    def check(self) -> None:
        """ValueError naming the limit that cannot be met by any pair (negative, not finite) or a bad precision."""
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"precision must be one of {PRECISION_BYTES}, got {self.precision!r}")
        for name in ("max_ms_per_1k_texts", "max_bytes_per_vector", "within"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.min_quality is not None and not math.isfinite(self.min_quality):
            raise ValueError(f"min_quality must be finite, got {self.min_quality!r}")

    @property
    def limits_cost(self) -> bool:
        return self.max_ms_per_1k_texts is not None or self.max_bytes_per_vector is not None


def candidates(quality: dict, metric: str, costs: CostGrid, precision: str = "fp32") -> list[Candidate]:
    """The pairs of a quality grid (``{"layers", "dims", "metrics": {metric: [[...]]}}``) joined with a cost grid
    measured on the same layers and dims. Layer 0 (the embedding output, evaluated when asked for) is not a
    servable encoder and is left out. ValueError when the metric or a layer / dim has no counterpart."""
    if metric not in quality["metrics"]:
        raise ValueError(f"metric {metric!r} is not in the quality grid (it has {', '.join(quality['metrics'])})")
    missing = [f"layer {layer}" for layer in quality["layers"] if layer >= 1 and layer not in costs.layers]
    missing += [f"dim {dim}" for dim in quality["dims"] if dim not in costs.dims]
    if missing:
        raise ValueError(f"the cost grid lacks {', '.join(missing)} (measured: layers {costs.layers}, dims "
                         f"{costs.dims}); measure it again")
    grid = quality["metrics"][metric]
    out = []
    for i, layer in enumerate(quality["layers"]):
        if layer < 1:
            continue
        encode = costs.encode_ms_per_1k_texts[costs.layers.index(layer)]
        for j, dim in enumerate(quality["dims"]):
            k = costs.dims.index(dim)
            out.append(Candidate(layer, dim, float(grid[i][j]), float(encode),
                                 int(costs.bytes_per_vector[precision][k]), float(costs.search_ms_per_1k_queries[k])))
    return out


def _cost_key(c: Candidate) -> tuple:
    return (c.encode_ms_per_1k_texts, c.bytes_per_vector, c.search_ms_per_1k_queries, c.layer, c.dim)


def pareto_front(pairs: Sequence[Candidate]) -> list[Candidate]:
    """The non-dominated pairs on (quality up, encode time down, bytes down), cheapest encode first.

    Sweep in order of encode time (then bytes, then quality down): a pair is dominated exactly when an
    earlier pair is no worse on bytes and quality, and the best quality seen so far at each byte size
    answers that in one pass over the byte sizes.
    """
    ordered = sorted(pairs, key=lambda c: (c.encode_ms_per_1k_texts, c.bytes_per_vector, -c.quality))
    best_at_bytes: dict[int, float] = {}
    front = []
    for c in ordered:
        dominated = any(quality >= c.quality for size, quality in best_at_bytes.items() if size <= c.bytes_per_vector)
        if not dominated:
            front.append(c)
        best_at_bytes[c.bytes_per_vector] = max(best_at_bytes.get(c.bytes_per_vector, -math.inf), c.quality)
    # Pairs equal on all three are not dominated by each other: keep them (the sweep kept only the first).
    kept = {(c.layer, c.dim) for c in front}
    front += [c for c in ordered if (c.layer, c.dim) not in kept and any(
        (f.quality, f.encode_ms_per_1k_texts, f.bytes_per_vector) ==
        (c.quality, c.encode_ms_per_1k_texts, c.bytes_per_vector) for f in front)]
    return sorted(front, key=_cost_key)


def full_pair(pairs: Sequence[Candidate]) -> Candidate:
    """The deepest layer at the widest dim: the model as trained."""
    return max(pairs, key=lambda c: (c.layer, c.dim))


def meets(c: Candidate, budget: Budget, full_quality: float) -> bool:
    if budget.max_ms_per_1k_texts is not None and c.encode_ms_per_1k_texts > budget.max_ms_per_1k_texts:
        return False
    if budget.max_bytes_per_vector is not None and c.bytes_per_vector > budget.max_bytes_per_vector:
        return False
    if budget.min_quality is not None and c.quality < budget.min_quality:
        return False
    return budget.within is None or c.quality >= full_quality - budget.within


def pick(pairs: Sequence[Candidate], budget: Budget) -> Candidate | None:
    """The pair to serve under ``budget`` (module docstring), or None when no pair meets it."""
    budget.check()
    if not pairs:
        return None
    full = full_pair(pairs).quality
    allowed = [c for c in pareto_front(pairs) if meets(c, budget, full)]
    if not allowed:
        return None
    if budget.limits_cost or (budget.min_quality is None and budget.within is None):
        return max(allowed, key=lambda c: (c.quality, tuple(-v for v in _cost_key(c)[:3])))
    return min(allowed, key=_cost_key)


# --------------------------------------------------------------------------- a run folder


@dataclass(frozen=True)
class PickResult:
    """What :func:`pick_run` found: the front, the pick (None: no pair meets the budget) and what was compared."""

    eval_set: str
    metric: str
    precision: str
    budget: Budget
    full: Candidate
    front: list[Candidate]
    choice: Candidate | None
    pairs: list[Candidate]

    def to_json(self) -> dict:
        return {"eval_set": self.eval_set, "metric": self.metric, "precision": self.precision,
                "budget": asdict(self.budget), "full": asdict(self.full), "choice": self.choice and asdict(self.choice),
                "front": [asdict(c) for c in self.front], "pairs": [asdict(c) for c in self.pairs]}


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found ({what})") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read ({what}): {error}") from None


def quality_grid(summary: dict, eval_set: str | None) -> tuple[str, dict]:
    """(set name, the after-training grid) of a run summary; the first set when ``eval_set`` is None."""
    after = summary.get("after") or {}
    if not after:
        raise ValueError("the run has no quality grid (it was trained with --eval none)")
    name = eval_set or next(iter(after))
    if name not in after:
        raise ValueError(f"evaluation set {name!r} is not in the run (it has {', '.join(after)})")
    return name, after[name]


def pick_run(run_dir: str | os.PathLike, budget: Budget, metric: str | None = None, eval_set: str | None = None,
             costs: CostGrid | None = None) -> PickResult:
    """Join ``RUN_DIR/summary.json`` with ``RUN_DIR/cost.json`` (or ``costs``) and pick (module docstring)."""
    run = Path(run_dir)
    name, grid = quality_grid(read_json(run / SUMMARY_NAME, "the run's summary"), eval_set)
    metric = metric or next(iter(grid["metrics"]))
    if costs is None:
        costs = CostGrid.from_json(read_json(run / COST_NAME, "the cost grid: m2d-pick --measure writes it"))
    budget.check()
    pairs = candidates(grid, metric, costs, budget.precision)
    if not pairs:
        raise ValueError("the quality grid has no transformer layer (only layer 0) to serve")
    return PickResult(name, metric, budget.precision, budget, full_pair(pairs), pareto_front(pairs),
                      pick(pairs, budget), pairs)


def format_table(result: PickResult) -> str:
    """The Pareto front as a table, the full pair and the pick marked."""
    lines = [f"Pareto front: {result.eval_set} {result.metric} (x 100, after training) against encode time and "
             f"{result.precision} bytes per vector; * marks the pick",
             "  layer   dim  quality  ms/1k texts  bytes/vector  search ms/1k queries"]
    for c in result.front:
        mark = "*" if result.choice is not None and (c.layer, c.dim) == (result.choice.layer, result.choice.dim) \
            else " "
        full = "  (full model)" if (c.layer, c.dim) == (result.full.layer, result.full.dim) else ""
        lines.append(f"{mark} {c.layer:>5} {c.dim:>5} {c.quality:>8.1f} {c.encode_ms_per_1k_texts:>12.1f} "
                     f"{c.bytes_per_vector:>13} {c.search_ms_per_1k_queries:>21.2f}{full}")
    lines.append(f"budget: {describe(result.budget)} -> " + (
        f"layer {result.choice.layer}, dim {result.choice.dim}" if result.choice else "no pair meets it"))
    return "\n".join(lines)


def describe(budget: Budget) -> str:
    parts = []
    if budget.max_ms_per_1k_texts is not None:
        parts.append(f"encode <= {budget.max_ms_per_1k_texts:g} ms per 1k texts")
    if budget.max_bytes_per_vector is not None:
        parts.append(f"<= {budget.max_bytes_per_vector} {budget.precision} bytes per vector")
    if budget.min_quality is not None:
        parts.append(f"quality >= {budget.min_quality:g}")
    if budget.within is not None:
        parts.append(f"quality within {budget.within:g} points of the full model")
    if not parts:
        return "no limits: the highest quality"
    return f"{'highest quality' if budget.limits_cost else 'cheapest'} with {', '.join(parts)}"


def save_plot(path: str | os.PathLike, result: PickResult, title: str | None = None) -> None:
    """Quality against encode time and against bytes per vector, every pair labelled ``layer/dim``, the front
    joined by a line, the full model and the pick marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from m2d_kernels.train.atomic import atomic_write

    front = {(c.layer, c.dim) for c in result.front}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for axis, attribute, label in ((axes[0], "encode_ms_per_1k_texts", "encode time (ms per 1,000 texts, measured)"),
                                   (axes[1], "bytes_per_vector", f"bytes per vector ({result.precision})")):
        dims = sorted({c.dim for c in result.pairs})
        colours = plt.get_cmap("viridis")
        for c in result.pairs:
            on_front = (c.layer, c.dim) in front
            axis.scatter(getattr(c, attribute), c.quality, s=46 if on_front else 22,
                         color=colours(dims.index(c.dim) / max(1, len(dims) - 1)),
                         edgecolors="black" if on_front else "none", zorder=3)
            axis.annotate(f"{c.layer}/{c.dim}", (getattr(c, attribute), c.quality), fontsize=6,
                          xytext=(3, 3), textcoords="offset points")
        # This panel's own front (quality against this one cost): a step line.
        ordered = sorted(result.pairs, key=lambda c: (getattr(c, attribute), -c.quality))
        steps, best = [], -math.inf
        for c in ordered:
            if c.quality > best:
                steps.append(c)
                best = c.quality
        axis.step([getattr(c, attribute) for c in steps], [c.quality for c in steps], where="post",
                  color="tab:red", linewidth=1, label="best quality at this cost or less", zorder=2)
        if result.choice is not None:
            axis.scatter(getattr(result.choice, attribute), result.choice.quality, marker="*", s=220,
                         color="tab:orange", edgecolors="black", zorder=4,
                         label=f"pick: layer {result.choice.layer}, dim {result.choice.dim}")
        axis.scatter(getattr(result.full, attribute), result.full.quality, marker="s", s=70, facecolors="none",
                     edgecolors="tab:blue", zorder=4, label=f"full model ({result.full.layer}/{result.full.dim})")
        if attribute == "bytes_per_vector":
            axis.set_xscale("log", base=2)
        axis.set_xlabel(label)
        axis.set_ylabel(f"{result.eval_set} {result.metric} (x 100)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    dims = sorted({c.dim for c in result.pairs})
    figure.suptitle((title + "\n" if title else "") + f"each point: layer/dim; colour: dim, {dims[0]} (dark) to "
                    f"{dims[-1]} (light); black edge: on the Pareto front of quality, encode time and bytes",
                    fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=110))
    plt.close(figure)


# --------------------------------------------------------------------------- command line


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="an m2d-train output folder (summary.json, model/)")
    parser.add_argument("--max-ms-per-1k-texts", type=_float, help="encode time limit (default: none)")
    parser.add_argument("--max-bytes-per-vector", type=int, help="storage limit per vector (default: none)")
    parser.add_argument("--precision", choices=PRECISION_BYTES, default="fp32",
                        help="how vectors are stored, for --max-bytes-per-vector (default: fp32)")
    parser.add_argument("--min-quality", type=_float, help="quality floor, x 100 (default: none)")
    parser.add_argument("--within", type=_float, help="quality at least the full model's minus this many points "
                                                      "(default: none)")
    parser.add_argument("--metric", help="quality metric (default: the run's first, e.g. mrr@10)")
    parser.add_argument("--eval-set", help="evaluation set of the run (default: its first)")
    parser.add_argument("--measure", action="store_true",
                        help="measure the cost grid on this machine (written as RUN_DIR/cost.json) even if present")
    parser.add_argument("--device", default="cpu", help="device for --measure (default: cpu)")
    parser.add_argument("--plot", help=f"where to write the plot (default: RUN_DIR/{PLOT_NAME})")
    return parser


def measure_run(run_dir: Path, device: str = "cpu") -> CostGrid:
    """Measure the cost grid of a run's model on its grid's layers and dims, on probe texts; write cost.json."""
    from m2d_kernels.train.cost import measure_costs
    from m2d_kernels.train.evaluate import write_json_atomic
    from m2d_kernels.train.export import PROBE_TEXTS

    _, grid = quality_grid(read_json(run_dir / SUMMARY_NAME, "the run's summary"), None)
    layers = [layer for layer in grid["layers"] if layer >= 1]  # layer 0, the embedding output, is not served
    costs = measure_costs(str(run_dir / "model"), layers, grid["dims"], list(PROBE_TEXTS) * 4, device)
    write_json_atomic(run_dir / COST_NAME, costs.to_json())
    return costs


def main(argv: list[str] | None = None) -> int:
    """Run ``m2d-pick``: a bad argument exits with status 2 and one line naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    budget = Budget(args.max_ms_per_1k_texts, args.max_bytes_per_vector, args.min_quality, args.within,
                    args.precision)
    try:
        if not (run / SUMMARY_NAME).is_file():
            raise FileNotFoundError(f"RUN_DIR {run}: no {SUMMARY_NAME} (not an m2d-train output folder)")
        for flag, name in (("--max-ms-per-1k-texts", "max_ms_per_1k_texts"),
                           ("--max-bytes-per-vector", "max_bytes_per_vector"), ("--within", "within")):
            value = getattr(budget, name)
            if value is not None and value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value:g}")
        costs = measure_run(run, args.device) if args.measure or not (run / COST_NAME).is_file() else None
        result = pick_run(run, budget, args.metric, args.eval_set, costs)
        save_plot(args.plot or run / PLOT_NAME, result)
        from m2d_kernels.train.evaluate import write_json_atomic

        write_json_atomic(run / PICK_NAME, result.to_json())
    except (FileNotFoundError, ValueError, ImportError) as error:
        message = str(error)
        for text, flag in (("metric ", "--metric "), ("evaluation set ", "--eval-set ")):
            message = flag + message[len(text):] if message.startswith(text) else message
        parser.exit(2, f"{PROG}: error: {message}\n")
    print(format_table(result))
    print(f"wrote {PICK_NAME} and {args.plot or run / PLOT_NAME}")
    return 0 if result.choice is not None else 1


if __name__ == "__main__":
    sys.exit(main())
