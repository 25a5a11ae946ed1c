"""Shared test helpers: random inputs, an independent float64 oracle, tolerances.

The oracle is written in NumPy with explicit loops so that it shares no code with the
backends (not even ``torch.nn.functional``).
"""

from __future__ import annotations

import numpy as np
import torch

import m2d_kernels as m2d

# dtype -> (atol, rtol) against the float64 oracle, for fp64/fp32. bf16/fp16 use
# `low_precision_bound`: no worse than twice the reference's own error in that dtype.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-4),
    # fp32 inputs multiplied as Triton's tf32x3 (on the GPU, emulated under the interpreter): the big halves
    # keep 11 bits, the small ones 11 of the remaining 13 and small*small is dropped, about 22 of fp32's 24
    # bits: 4x fp32's tolerances (benchmarks/tf32_error.py measures it).
    "tf32x3": (4e-5, 4e-4),
}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def make_inputs(n_layers, n_queries, n_docs, n_features, dtype=torch.float64, device="cpu", seed=None,
                requires_grad=True):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    queries = torch.randn(n_layers, n_queries, n_features, generator=generator, dtype=torch.float64)
    docs = torch.randn(n_layers, n_docs, n_features, generator=generator, dtype=torch.float64)
    # Correlate positives with their queries so the losses are not all near log(N).
    docs[:, :n_queries] += 0.7 * queries
    queries = queries.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    docs = docs.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return queries, docs


def oracle_pair_losses(queries, docs, dims, weights=None, scale=20.0, positive_index=None, symmetric=False):
    """Unweighted [L, M] losses in float64 NumPy (0 where the weight is 0)."""
    q_all = queries.detach().double().cpu().numpy()
    k_all = docs.detach().double().cpu().numpy()
    n_layers, n_queries, _ = q_all.shape
    positives = np.arange(n_queries) if positive_index is None else positive_index.cpu().numpy()
    out = np.zeros((n_layers, len(dims)))
    for layer in range(n_layers):
        for m, d in enumerate(dims):
            if weights is not None and float(weights[layer][m]) == 0:
                continue
            q = q_all[layer, :, :d]
            k = k_all[layer, :, :d]
            q = q / np.maximum(np.sqrt((q * q).sum(1, keepdims=True)), 1e-12)
            k = k / np.maximum(np.sqrt((k * k).sum(1, keepdims=True)), 1e-12)
            logits = scale * (q @ k.T)
            top = logits.max(1, keepdims=True)
            row_lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
            positive = logits[np.arange(n_queries), positives]
            loss = np.mean(row_lse - positive)
            if symmetric:
                columns = logits[:, positives]  # [queries, positives]
                top = columns.max(0, keepdims=True)
                col_lse = top[0] + np.log(np.exp(columns - top).sum(0))
                loss = (loss + np.mean(col_lse - positive)) / 2
            out[layer, m] = loss
    return out


def loss_and_grads(queries, docs, dims, weights=None, backend="reference", **kwargs):
    queries = queries.detach().clone().requires_grad_(True)
    docs = docs.detach().clone().requires_grad_(True)
    loss = m2d.matryoshka_2d_infonce(queries, docs, dims, weights, backend=backend, **kwargs)
    loss.backward()
    return loss.detach(), queries.grad, docs.grad


def assert_close(actual, expected, dtype, name=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def assert_within_twice_reference_error(backend, queries64, docs64, dims, dtype, device="cpu", **kwargs):
    """flash-attention's rule: a low-precision backend may be at most twice as far from the
    float64 truth as the reference computed in that same low precision (plus a tiny floor).
    The truth is computed from the rounded inputs, so input rounding is no one's error."""
    low_q = queries64.detach().to(device=device, dtype=dtype)
    low_d = docs64.detach().to(device=device, dtype=dtype)
    truth = loss_and_grads(low_q.double().cpu(), low_d.double().cpu(), dims, backend="reference", **kwargs)
    ref_low = loss_and_grads(low_q, low_d, dims, backend="reference", **kwargs)
    got = loss_and_grads(low_q, low_d, dims, backend=backend, **kwargs)
    for name, t, r, g in zip(("loss", "grad_queries", "grad_docs"), truth, ref_low, got):
        assert g.dtype == dtype, f"{name} has dtype {g.dtype}, expected {dtype}"
        ref_error = (r.double().cpu() - t).abs().max().item()
        error = (g.double().cpu() - t).abs().max().item()
        floor = 1e-3 * t.abs().max().item() + 1e-6
        assert error <= 2 * ref_error + floor, (
            f"{name}: error {error:.3g} > 2 x reference's {ref_error:.3g} + {floor:.1g}"
        )


# The shared-tile pass modes of the backend tests (rules.triangle, rules.column_statistics), against the
# float64 reference pass: name -> (triangle, n_cols(R), K(R, C)); R = C is query_to_query's square,
# C = 2R + 5 doc_to_doc's D+ vs D_all layout; K = R < C, K = C, and both rules together.
SHARED_PASS_MODES = {
    "triangle-square": (True, lambda r: r, lambda r, c: 0),
    "triangle": (True, lambda r: 2 * r + 5, lambda r, c: 0),
    "columns": (False, lambda r: 2 * r + 5, lambda r, c: r),
    "columns-all": (False, lambda r: 2 * r + 5, lambda r, c: c),
    "both-square": (True, lambda r: r, lambda r, c: r),
    "both": (True, lambda r: 2 * r + 5, lambda r, c: r),
}
