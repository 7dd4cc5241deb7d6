"""Retrieval prediction: chunked ``tl.retrieve`` vs a per-query loop reference.

Ours
    :func:`mclstexp_lite.tl.retrieve` (cosine top-k, L1 distance, inverse-square
    weights), which works on chunks of queries so that the query x key similarity
    matrix is never allocated in full.

Reference (written here; a plain transcription of the published evaluation)
    A NumPy loop over queries: cosine similarity of the query to every key (keys
    L2-normalised once, before the loop), a stable descending sort for the top k, the L1
    distance of the raw query to those keys, weights ``1 / d**2`` normalised, and
    ``np.average`` of their expression. (The published script also averages the key
    embeddings in the same loop; that output is not part of a prediction and is left
    out, which only makes the reference faster.) The loop is slow, so it runs on a
    random subset of the queries and its time per query is extrapolated to all of
    them; the subset is timed before and after ours and the two times are averaged.
    Its results on the subset are compared with ours (max absolute difference).

Inputs are SYNTHETIC, seeded: Gaussian embeddings (D = 256) and log-normal expression.
Peak memory is the process's resident-set peak during the call (the kernel's VmHWM,
reset before the call) and, for NumPy allocations, ``tracemalloc``'s peak (torch
allocations are invisible to tracemalloc, hence the RSS figure).

Stage 2 runs ours alone at 100,000 queries x 100,000 keys in a fresh subprocess and
reports its wall time and peak RSS, to show that memory stays bounded (the full
similarity matrix would be 100k x 100k x 4 bytes = 37 GiB).

Run ``python benchmarks/bench_retrieval.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np

import _common as C


def make_inputs(n_query: int, n_keys: int, n_genes: int, dim: int, seed: int):
    """SYNTHETIC float32 query/key embeddings and non-negative key expression."""
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((n_query, dim), dtype=np.float32)
    keys = rng.standard_normal((n_keys, dim), dtype=np.float32)
    expr = np.empty((n_keys, n_genes), dtype=np.float32)
    for start in range(0, n_keys, 10_000):  # in blocks: no float64 temporary of it all
        block = rng.standard_normal((min(10_000, n_keys - start), n_genes), dtype=np.float32)
        np.exp(block, out=block)
        expr[start:start + len(block)] = block
    return query, keys, expr


def reference_retrieve(query, keys, key_expr, top_k: int, rows) -> np.ndarray:
    """Per-query NumPy loop over ``rows`` of ``query`` (the reference)."""
    keys_unit = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    out = np.empty((len(rows), key_expr.shape[1]), dtype=np.float64)
    for n, i in enumerate(rows):
        q = query[i]
        sims = keys_unit @ (q / max(np.linalg.norm(q), 1e-12))
        top = np.argsort(-sims, kind="stable")[:top_k]
        d = np.abs(keys[top].astype(np.float64) - q.astype(np.float64)).sum(axis=1)
        w = 1.0 / d**2
        out[n] = np.average(key_expr[top].astype(np.float64), axis=0, weights=w / w.sum())
    return out


def time_reference(query, keys, expr, top_k, rows):
    tracemalloc.start()
    t = C.Timer()
    with t:
        pred = reference_retrieve(query, keys, expr, top_k, rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return pred, t, peak


def run_ours(query, keys, expr, top_k):
    from mclstexp_lite import tl

    tracemalloc.start()
    t = C.Timer()
    before = resource.getrusage(resource.RUSAGE_SELF)
    with C.peak_rss() as mem, t:
        pred = tl.retrieve(query, keys, expr, top_k=top_k, metric="l1")
    after = resource.getrusage(resource.RUSAGE_SELF)
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mem.update(cpu_seconds=t.cpu_seconds, user_s=after.ru_utime - before.ru_utime,
               system_s=after.ru_stime - before.ru_stime,
               minor_page_faults=after.ru_minflt - before.ru_minflt)
    return pred, t.seconds, mem, numpy_peak


def profile_chunk(query, keys, expr, top_k) -> dict | None:
    """Milliseconds per stage of ours on its first chunk of queries.

    Calls the kernels of :mod:`mclstexp_lite._retrieval` in the order ``retrieve`` does;
    returns None if they have changed. Also times the alternative for the last stage (the
    blocked gather used for banks too large to copy to float64), with its largest
    difference.
    """
    import torch
    import torch.nn.functional as F

    from mclstexp_lite import _retrieval as rv
    from mclstexp_lite import tl

    try:
        chunk = min(tl.default_chunk_size(len(keys), expr.shape[1]), len(query))
        q = torch.from_numpy(query[:chunk])
        k = torch.from_numpy(keys)
        e = torch.from_numpy(expr)
        acc = torch.float64
        out = {"chunk_queries": chunk}
        with torch.no_grad(), rv.full_precision_matmul():
            ku = F.normalize(k, p=2, dim=1)
            buffer = torch.empty((chunk, len(keys)), dtype=torch.float32)
            t = C.Timer()
            with t:
                sims = rv.similarity_block(F.normalize(q, p=2, dim=1), ku, out=buffer)
            out["cosine_matmul_ms"] = t.seconds * 1000
            t = C.Timer()
            with t:
                idx = rv.topk_lowest_index(sims, top_k)
            out["top_k_ms"] = t.seconds * 1000
            del sims
            t = C.Timer()
            with t:
                dist = rv.distances(q.to(acc), k, idx, "l1", acc, tl.CPU_GATHER_BYTES)
                w = rv.inverse_square_weights(dist)
            out["l1_distances_weights_ms"] = t.seconds * 1000
            # the weighted sum as retrieve does it on the CPU (a CSR matrix of the top_k
            # weights per query times the float64 bank, converted once per call) and,
            # for comparison, the blocked gather it falls back to for very large banks
            t = C.Timer()
            with t:
                e64 = e.to(acc)
            out["bank_to_float64_once_ms"] = t.seconds * 1000
            t = C.Timer()
            with t:
                sparse = rv.weighted_sum_sparse(w, e64, idx)
            out["weighted_expression_sum_ms"] = t.seconds * 1000
            t = C.Timer()
            with t:
                dense = rv.weighted_sum(w, e, idx, acc, tl.CPU_GATHER_BYTES)
            out["alternative_blocked_gather_sum_ms"] = t.seconds * 1000
            out["alternative_max_abs_diff"] = float((sparse - dense).abs().max())
        return {key: round(v, 1) if key.endswith("_ms") else v for key, v in out.items()}
    except AttributeError as err:  # internals renamed
        print(f"(no stage profile: {err})")
        return None


def big_stage(args) -> dict:
    """Ours alone at --big-queries x --big-keys, in this (fresh) process."""
    C.set_threads(args.threads)
    from mclstexp_lite import tl

    query, keys, expr = make_inputs(args.big_queries, args.big_keys, args.big_genes, args.dim,
                                    args.seed + 1)
    rss_inputs = C.rss_mib()
    pred, seconds, mem, numpy_peak = run_ours(query, keys, expr, args.top_k)
    assert pred.shape == (args.big_queries, args.big_genes) and np.isfinite(pred).all()
    return {"queries": args.big_queries, "keys": args.big_keys, "genes": args.big_genes,
            "seconds": seconds, "per_query_ms": seconds / args.big_queries * 1000,
            "cpu_seconds": mem["cpu_seconds"],
            "rss_after_inputs_mib": rss_inputs, "peak_rss_mib": mem["peak_rss_mib"],
            "peak_rss_delta_mib": mem["peak_delta_mib"], "rss_method": mem["method"],
            "tracemalloc_numpy_peak_mib": numpy_peak / 2**20,
            "chunk_size": tl.default_chunk_size(args.big_keys, args.big_genes),
            "full_similarity_matrix_gib": args.big_queries * args.big_keys * 4 / 2**30,
            "inputs_mib": (query.nbytes + keys.nbytes + expr.nbytes) / 2**20}


def run_big_stage(args) -> dict:
    """Stage 2: ours alone on the big sizes, in a fresh process (its peak memory is then
    its own); the JSON line it prints, with the process's wall time."""
    print(f"\nstage 2: ours alone, {args.big_queries} x {args.big_keys} x {args.big_genes} "
          "genes, in a fresh process ...", flush=True)
    cmd = [sys.executable, __file__, "--big-only", "--threads", str(args.threads),
           "--big-queries", str(args.big_queries), "--big-keys", str(args.big_keys),
           "--big-genes", str(args.big_genes), "--dim", str(args.dim),
           "--top-k", str(args.top_k), "--seed", str(args.seed)]
    if args.block_mib is not None:
        cmd += ["--block-mib", str(args.block_mib)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stdout, done.stderr, file=sys.stderr)
        raise SystemExit(f"stage 2 failed with exit code {done.returncode}")
    big = json.loads(done.stdout.strip().splitlines()[-1])
    big["process_wall_s"] = time.perf_counter() - t0
    print(f"ours: {big['seconds']:.0f} s ({big['per_query_ms']:.2f} ms/query), chunk "
          f"{big['chunk_size']} queries; RSS {big['rss_after_inputs_mib']:.0f} MiB with the "
          f"inputs ({big['inputs_mib']:.0f} MiB of arrays), peak {big['peak_rss_mib']:.0f} MiB "
          f"(+{big['peak_rss_delta_mib']:.0f} MiB during the call, {big['rss_method']}); the "
          f"full similarity matrix would be {big['full_similarity_matrix_gib']:.1f} GiB",
          flush=True)
    return big


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1k x 4k, and 5k x 20k alone")
    ap.add_argument("--queries", type=int, default=None, help="default 10000 (quick 1000)")
    ap.add_argument("--keys", type=int, default=None, help="default 20000 (quick 4000)")
    ap.add_argument("--genes", type=int, default=785)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=200)
    ap.add_argument("--ref-queries", type=int, default=None,
                    help="queries the reference loop runs on (default 200; quick 100)")
    ap.add_argument("--big-queries", type=int, default=None, help="default 100000 (quick 5000)")
    ap.add_argument("--big-keys", type=int, default=None, help="default 100000 (quick 20000)")
    ap.add_argument("--big-genes", type=int, default=None, help="default --genes")
    ap.add_argument("--skip-big", action="store_true", help="skip stage 2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-mib", type=int, default=None,
                    help="experiment: set mclstexp_lite.tl.BLOCK_BYTES (MiB) for this run")
    ap.add_argument("--big-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from mclstexp_lite import tl

    if args.block_mib is not None:
        tl.BLOCK_BYTES = args.block_mib * 2**20
    args.queries = args.queries or (1_000 if args.quick else 10_000)
    args.keys = args.keys or (4_000 if args.quick else 20_000)
    args.ref_queries = min(args.ref_queries or (100 if args.quick else 200), args.queries)
    args.big_queries = args.big_queries or (5_000 if args.quick else 100_000)
    args.big_keys = args.big_keys or (20_000 if args.quick else 100_000)
    args.big_genes = args.big_genes or args.genes

    if args.big_only:  # the subprocess of stage 2
        C.emit(big_stage(args))
        return 0

    C.header("bench_retrieval", args)
    threads = C.set_threads(args.threads)
    load_before = C.load_average()
    query, keys, expr = make_inputs(args.queries, args.keys, args.genes, args.dim, args.seed)
    rows = np.sort(np.random.default_rng(args.seed).choice(args.queries, args.ref_queries,
                                                           replace=False))
    print(f"stage 1: {args.queries} queries x {args.keys} keys x {args.genes} genes, D={args.dim}, "
          f"top_k={args.top_k}; reference on {len(rows)} random queries", flush=True)

    ref_pred, ref_t1, ref_peak = time_reference(query, keys, expr, args.top_k, rows)
    pred, ours_s, mem, ours_numpy_peak = run_ours(query, keys, expr, args.top_k)
    _, ref_t2, _ = time_reference(query, keys, expr, args.top_k, rows)
    ref_s1, ref_s2 = ref_t1.seconds, ref_t2.seconds
    ref_per_query = (ref_s1 + ref_s2) / 2 / len(rows)
    ref_total = ref_per_query * args.queries
    ratio = ref_total / ours_s
    ref_cpu_per_query = (ref_t1.cpu_seconds + ref_t2.cpu_seconds) / 2 / len(rows)
    cpu_ratio = ref_cpu_per_query * args.queries / mem["cpu_seconds"]
    max_diff = float(np.abs(pred[rows].astype(np.float64) - ref_pred).max())
    rel_diff = max_diff / float(np.abs(ref_pred).max())
    print(f"ours: {ours_s:.2f} s ({ours_s / args.queries * 1e3:.3f} ms/query), peak RSS "
          f"+{mem['peak_delta_mib']:.0f} MiB over {mem['rss_before_mib']:.0f} MiB "
          f"({mem['method']}), NumPy (tracemalloc) peak {ours_numpy_peak / 2**20:.0f} MiB; "
          f"user {mem['user_s']:.1f} s, system {mem['system_s']:.1f} s, "
          f"{mem['minor_page_faults']:,} minor page faults")
    print(f"reference: {ref_s1:.2f} s and {ref_s2:.2f} s for {len(rows)} queries -> "
          f"{ref_per_query * 1e3:.2f} ms/query, extrapolated {ref_total:.0f} s for "
          f"{args.queries}; NumPy (tracemalloc) peak {ref_peak / 2**20:.1f} MiB")
    print(f"max |ours - reference| on those queries: {max_diff:.2e} (relative {rel_diff:.1e})")
    verdict = "met" if ratio >= 50 else "NOT met"
    print(f"ratio reference/ours: {ratio:.1f}x (goal >= 50x: {verdict}); in CPU time "
          f"{cpu_ratio:.1f}x; {threads} threads, load {load_before} -> {C.load_average()}",
          flush=True)

    prof = profile_chunk(query, keys, expr, args.top_k)
    if prof:
        print("ours, one chunk of " + str(prof["chunk_queries"]) + " queries (ms): " + ", ".join(
            f"{k[:-3]} {v:.0f}" for k, v in prof.items() if k.endswith("_ms")) +
            f" (alternative differs by {prof['alternative_max_abs_diff']:.1e})", flush=True)

    big = None if args.skip_big else run_big_stage(args)

    load_after = C.load_average()
    C.emit({
        "benchmark": "retrieval", "quick": args.quick,
        "queries": args.queries, "keys": args.keys, "genes": args.genes, "dim": args.dim,
        "block_bytes": tl.BLOCK_BYTES,
        "cpu_gather_bytes": tl.CPU_GATHER_BYTES,
        "top_k": args.top_k, "metric": "l1",
        "ours_s": ours_s, "ours_ms_per_query": ours_s / args.queries * 1000,
        "ours_peak_rss_mib": mem["peak_rss_mib"], "ours_peak_rss_delta_mib": mem["peak_delta_mib"],
        "ours_rss_method": mem["method"], "ours_user_s": mem["user_s"],
        "ours_system_s": mem["system_s"], "ours_minor_page_faults": mem["minor_page_faults"],
        "ours_tracemalloc_numpy_peak_mib": ours_numpy_peak / 2**20,
        "reference_queries_timed": int(len(rows)), "reference_s_runs": [ref_s1, ref_s2],
        "reference_ms_per_query": ref_per_query * 1000,
        "reference_extrapolated_s": ref_total,
        "reference_tracemalloc_numpy_peak_mib": ref_peak / 2**20,
        "max_abs_diff": max_diff, "max_rel_diff": rel_diff,
        "ratio": ratio, "goal": 50.0, "goal_met": ratio >= 50, "profile_chunk_ms": prof,
        "cpu_ratio": cpu_ratio, "ours_cpu_s": mem["cpu_seconds"],
        "reference_cpu_ms_per_query": ref_cpu_per_query * 1000,
        "big": big, "load_before": load_before, "load_after": load_after,
        "machine": C.machine(threads),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
