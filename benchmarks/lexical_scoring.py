"""Sparse (top-k) vs dense lexical scoring over the full vocabulary, on the same vectors.

The vectors are real lexical vectors: the frozen SmolLM2-135M's in-context lexical prediction for every
Tux Paint caption (the LM head's logits at the answer position of `vla_lit.lexical.lexical_prompt`), over
the full 49,152-token vocabulary, through `vla_lit.lexical.text_lexical_weights` with the probability
threshold p0 set so that `--active` words per caption are active on average, then top-k. Both paths score the *same* top-k
vectors (queries = documents = all captions): dense = [N, V] @ [V, N] with torch; sparse = the
CSR x CSR product of `vla_lit.lexical.sparse_scores` (timed with and without a prebuilt inverted index). The script checks that both give the same
scores and prints the time ratio dense / sparse (median of --repeats), plus the storage of each.

    python benchmarks/lexical_scoring.py [--k 64] [--repeats 5] [--synthetic]

`--synthetic` uses random top-k vectors of the same shape instead (no model needed).
"""
import argparse, statistics, time
import torch
from vla_lit.lexical import (lexical_activation, topk_sparsify, to_sparse, sparse_scores, sparse_index, dense_scores, lexical_prompt,
                             text_lexical_weights, calibrate_log_threshold)

def real_vectors(active: float):
    from vla_lit.models import load_lm
    from vla_lit.data import tuxpaint
    from vla_lit.features import extract_text_features
    lm = load_lm("smollm2-135m-embedded")
    rs = tuxpaint()
    H = extract_text_features(lm, [lexical_prompt(r.caption) for r in rs], pooling="last", progress=False).get("hidden").float()
    with torch.no_grad():                                                # the LM head (the frozen text codebook): [N, 49152]
        Z = torch.cat([lm.lm_head(H[i:i + 256].to(lm.dtype)).float() for i in range(0, len(H), 256)])
    return text_lexical_weights(Z, calibrate_log_threshold(Z, active)), "frozen SmolLM2 lexical prediction of Tux Paint captions"

def timeit(fn, repeats):
    fn()                                                                 # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=64); ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--active", type=float, default=64, help="mean active words per caption (sets the threshold p0)")
    ap.add_argument("--synthetic", action="store_true"); ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    if a.synthetic: W, src = lexical_activation(torch.randn(950, 49152) - 2.5), "random"
    else: W, src = real_vectors(a.active)
    Wk = topk_sparsify(W, a.k)                                           # the same top-k vectors for both paths
    sp = to_sparse(Wk, a.k)
    N, V = Wk.shape
    S_dense = dense_scores(Wk, Wk); S_sparse = sparse_scores(sp, sp)
    assert torch.allclose(S_dense, S_sparse, rtol=1e-4, atol=1e-4), "sparse and dense scores differ"
    t_dense = timeit(lambda: dense_scores(Wk, Wk), a.repeats)
    t_sparse = timeit(lambda: sparse_scores(sp, sp), a.repeats)
    index = sparse_index(sp)                                             # the documents' inverted index, built once
    t_index = timeit(lambda: sparse_scores(sp, index), a.repeats)
    print(f"data: {src}; {N} queries x {N} documents, |V| = {V}, top-{a.k} (mean active before top-k: {(W > 0).sum(1).float().mean():.0f})")
    print(f"dense  scoring (torch matmul over the full vocabulary): {t_dense * 1e3:9.1f} ms   storage {Wk.numel() * 4 / 2**20:8.1f} MiB")
    print(f"sparse scoring (CSR x CSR, top-{a.k} indices + values):   {t_sparse * 1e3:9.1f} ms   storage {(sp.indices.numel() * 8 + sp.values.numel() * 4) / 2**20:8.1f} MiB")
    print(f"sparse scoring with a prebuilt inverted index:            {t_index * 1e3:9.1f} ms")
    print(f"ratio dense / sparse time: {t_dense / t_sparse:.2f}x (with prebuilt index {t_dense / t_index:.2f}x)   (median of {a.repeats}, {a.threads} threads; same scores, max |diff| {float((S_dense - S_sparse).abs().max()):.2e})")

if __name__ == "__main__": main()
