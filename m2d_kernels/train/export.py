"""``m2d-export``: one (layer, dim) pair of a 2D Matryoshka model as a standalone sentence-transformers model.

The exported folder holds only the first ``l`` transformer layers (``num_hidden_layers = l``, the
deeper layers' weights dropped), the source's pooling, a ``Dense`` whose weight is the first ``d``
rows of the identity (it keeps the leading ``d`` features exactly) and the source's Normalize, in
sentence-transformers' long-standing folder format: ``SentenceTransformer(OUTDIR)`` loads it with no
m2d-kernels installed and computes the source's ``(l, d)`` embedding
(:func:`m2d_kernels.train.pipeline.pair_embedding`).

Before the folder is published, the export embeds probe texts with the exported model and with the
full source model (``hidden_states[l]``) and refuses to write a model whose embeddings differ by more
than ``tolerance`` (an architecture with a final norm after its layer stack would). The model card
states the measured encode speed of the exported model against the full one.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from m2d_kernels.train import cost
from m2d_kernels.train import pipeline as pipelines
from m2d_kernels.train.atomic import OutputWriteError, atomic_directory
from m2d_kernels.train.st_folder import PipelineSpec, write_pipeline

PROG = "m2d-export"
DEFAULT_TOLERANCE = 1e-6
# Probe texts for the equality check and the timing: different lengths, punctuation, digits, one past most
# max_seq_lengths after repetition.
PROBE_TEXTS = (
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Return the sum of the numbers in the list, or 0 when it is empty.",
    "Stocks fell 3.2% on Tuesday after the central bank raised rates.",
    "cats",
    "The committee postponed the vote until the report on the budget had been reviewed by every member. " * 4,
    "Ein Hund läuft über die Wiese.",
)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and measured.

    ``max_abs_difference``: largest difference between the exported model's embeddings and the
    source's ``(layer, dim)`` embeddings on the probe texts. ``exported_ms_per_1k`` / ``full_ms_per_1k``:
    encode time of the exported and the full model (milliseconds per 1,000 probe texts, median),
    None when not measured.
    """

    output_dir: Path
    layer: int
    dim: int
    source_layers: int
    source_width: int
    max_abs_difference: float
    exported_ms_per_1k: float | None
    full_ms_per_1k: float | None
    device: str
    machine: str


class ExportMismatch(ValueError):
    """The exported model does not reproduce the source's (layer, dim) embeddings."""


def resolve_model_folder(path: str | os.PathLike) -> Path:
    """A model folder, or an ``m2d-train`` run folder (its ``model/``)."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model not found: {path} is not a model folder (config.json) or an m2d-train run "
                                "folder (model/config.json)")
    return path


def _source_embeddings(source: pipelines.Pipeline, model, tokenizer, texts, layer: int, dim: int) -> torch.Tensor:
    pooled = pipelines.pooled_layers(source, model, tokenizer, list(texts), [layer])[0]
    return pipelines.pair_embedding(source, pooled, dim)


def _exported_embeddings(folder: Path, texts, source: pipelines.Pipeline, device: torch.device) -> torch.Tensor:
    """The exported folder's embeddings as sentence-transformers computes them, when it can be imported; else its
    files run here: its transformer, the source's pooling, its Dense weights, Normalize. On ``device``, the
    source's (the same kernels on both sides of the comparison)."""
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(folder), device=str(device))
        return model.encode(list(texts), convert_to_tensor=True, batch_size=64).float().cpu()
    except ImportError:  # not installed, or an optional dependency of it is broken: the same pipeline, run here
        pass
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(folder).to(device), AutoTokenizer.from_pretrained(folder)
    pooled = pipelines.pooled_layers(source, model, tokenizer, list(texts), [model.config.num_hidden_layers])[0]
    for dense in sorted(folder.glob("*_Dense")):
        pooled = pooled @ load_file(dense / "model.safetensors")["linear.weight"].T
    return torch.nn.functional.normalize(pooled, dim=-1) if source.normalize else pooled


def export(model_path: str | os.PathLike, layer: int, dim: int, output_dir: str | os.PathLike, *,
           tolerance: float = DEFAULT_TOLERANCE, measure_speed: bool = True, device: str = "cpu",
           model=None, tokenizer=None, names: tuple[str, str] = ("layer", "dim"),
           known_speed: tuple[float, float] | None = None) -> ExportResult:
    """Write the ``(layer, dim)`` model of ``model_path`` (a model or m2d-train run folder) to ``output_dir``,
    atomically. ValueError naming ``names`` for a layer or dim the model lacks; :class:`ExportMismatch` (nothing
    written) when the exported embeddings differ from the source's by more than ``tolerance``.

    ``model`` / ``tokenizer``: the source already loaded (it is restored after use). ``known_speed``: the
    (exported, full) encode milliseconds per 1,000 texts already measured (a run's cost grid), used for the
    model card instead of measuring again.
    """
    folder = resolve_model_folder(model_path)
    source = pipelines.read_pipeline(folder)
    pipelines.check_pair(source, layer, dim, names)
    output_dir = Path(output_dir)
    if output_dir.resolve() == folder.resolve():
        raise ValueError(f"the output folder {output_dir} is the model folder itself")
    if model is None:
        _, model, tokenizer = pipelines.load(folder, device)
    run_device = next(model.parameters()).device
    texts = list(PROBE_TEXTS)
    expected = _source_embeddings(source, model, tokenizer, texts, layer, dim)
    timings: dict[str, float] = {}
    count = 8 * len(PROBE_TEXTS)
    if known_speed is not None:
        timings = {"exported": known_speed[0] * count / 1e6, "full": known_speed[1] * count / 1e6}
    elif measure_speed:
        timing_texts = texts * 8  # 64 texts (``count``): a few batches, well under a second for small CPU encoders
        timings["full"] = cost.time_encode(source, model, tokenizer, timing_texts)
        with pipelines.first_layers(model, layer):
            timings["exported"] = cost.time_encode(source, model, tokenizer, timing_texts)
    difference: list[float] = []
    machine = cost.machine_description(run_device)

    def fill(staging: Path) -> None:
        with pipelines.first_layers(model, layer):
            # save_pretrained writes the parameters of the modules the model holds now: the first layers only.
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        spec = PipelineSpec(source.pooling, source.width, source.max_seq_length, source.do_lower_case,
                            source.normalize, keep_dims=dim)
        write_pipeline(staging, spec, card=None)
        got = _exported_embeddings(staging, texts, source, run_device)
        difference.append(float((got - expected).abs().max()) if got.shape == expected.shape else float("inf"))
        if not difference[0] <= tolerance:
            raise ExportMismatch(f"the exported layer {layer}, dim {dim} model differs from the source's (layer, dim) "
                                 f"embeddings by {difference[0]:.3g} (> {tolerance:g}); not written")
        how = ("from the run's cost grid (cost.json)" if known_speed is not None else
               f"{count} probe texts, batches of 32, median of 3 passes")
        card = model_card(folder, source, layer, dim, difference[0], timings, machine, str(run_device), how)
        write_pipeline(staging, spec, card)

    atomic_directory(output_dir, fill)
    return ExportResult(output_dir, layer, dim, source.num_layers, source.width, difference[0],
                        1e6 * timings["exported"] / (8 * len(texts)) if timings else None,
                        1e6 * timings["full"] / (8 * len(texts)) if timings else None, str(run_device), machine)


def model_card(source_folder: Path, source: pipelines.Pipeline, layer: int, dim: int, difference: float,
               timings: dict[str, float], machine: str, device: str, how: str = "") -> str:
    speed = "Speed was not measured (`--no-speed`)."
    if timings:
        count = 8 * len(PROBE_TEXTS)
        exported, full = (1e6 * timings[k] / count for k in ("exported", "full"))
        speed = (f"Measured on {device} ({machine}): {exported:.1f} ms per 1,000 texts against "
                 f"{full:.1f} ms for the full {source.num_layers}-layer model (x{full / exported:.2f} faster; "
                 f"{how}). Vectors take {4 * dim} bytes in fp32 against {4 * source.width}.")
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags:
- sentence-transformers
- matryoshka-2d
- m2d-kernels
---

# Layer {layer}, dim {dim} of a 2D Matryoshka model

Exported by `m2d-export` from `{_display_name(source_folder)}`: its first {layer} of {source.num_layers} transformer
layers, {source.pooling} pooling, the leading {dim} of {source.width} features (a Dense module holding the
first {dim} rows of the identity){", then Normalize" if source.normalize else ""}; max_seq_length
{source.max_seq_length}. Loads with sentence-transformers alone:

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder")
embeddings = model.encode(["a sentence", "another one"])  # shape (2, {dim})
```

Checked at export: on {len(PROBE_TEXTS)} probe texts its embeddings differ from the source model's
(layer {layer}, dim {dim}) embeddings by at most {difference:.2g}.

{speed}
"""


def _display_name(folder: Path) -> str:
    # An m2d-train run's model is <run>/model: the run's name says more than "model".
    return f"{folder.parent.name}/{folder.name}" if folder.name == "model" else folder.name


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="a model folder, or an m2d-train run folder (its model/)")
    parser.add_argument("--layer", type=_int, required=True, help="transformer layers to keep (1..the model's)")
    parser.add_argument("--dim", type=_int, required=True, help="leading embedding features to keep")
    parser.add_argument("output_dir", metavar="OUTDIR", help="the folder to write (replaced atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTDIR when it already holds files")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed measurement for the model card")
    parser.add_argument("--device", default="cpu", help="device for the check and the timing (default: cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``m2d-export``: a bad argument exits with status 2 and one line naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    try:
        if output_dir.is_symlink():
            raise ValueError(f"OUTDIR {output_dir} is a symbolic link; m2d-export never writes through one")
        if output_dir.exists() and not output_dir.is_dir():
            raise ValueError(f"OUTDIR {output_dir} exists and is not a folder")
        if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite:
            raise ValueError(f"OUTDIR {output_dir} already holds files: pass --overwrite to replace it")
        result = export(args.model, args.layer, args.dim, output_dir, measure_speed=not args.no_speed,
                        device=args.device, names=("--layer", "--dim"))
    except ExportMismatch as error:
        parser.exit(1, f"{PROG}: error: {error}\n")
    except OutputWriteError as error:
        parser.exit(1, f"{PROG}: error: {error}\n")
    except (FileNotFoundError, ValueError, ImportError) as error:
        parser.exit(2, f"{PROG}: error: {error}\n")
    print(format_result(result))
    return 0


def format_result(result: ExportResult) -> str:
    line = (f"exported layer {result.layer} of {result.source_layers}, dim {result.dim} of {result.source_width} to "
            f"{result.output_dir} (max difference from the 2D model's embeddings {result.max_abs_difference:.2g})")
    if result.exported_ms_per_1k is not None:
        line += (f"; encode {result.exported_ms_per_1k:.1f} ms per 1k texts against {result.full_ms_per_1k:.1f} "
                 f"for the full model on {result.device}")
    return line


if __name__ == "__main__":
    sys.exit(main())
