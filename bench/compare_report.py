#!/usr/bin/env python3
"""The table of bench/compare-llamacpp.sh, from the raw results it left in a folder.

    python3 bench/compare_report.py OUT_DIR

OUT_DIR holds meta.json, int8peak.json (the machine's multiply-add peak;
missing in older folders), depth.jsonl (generation after D tokens of context:
one {"engine", "model", "depth", "out"} a line; missing in older folders), membw-start.json and membw-end.json,
membw-rounds.jsonl (the readings around every engine run, each with its
"model", "round" and "next" engine; missing in older folders), models.jsonl
(one {"model", "path"} a line) and results.jsonl (one {"engine", "model",
"round", "others_running", "out"} a line, "out" being llama-bench's `-o json`
array or `minnow bench --json`'s object).

The decode ceiling of a model is bandwidth ÷ the bytes of weights read per
generated token: every tensor of the file once, except the token embedding
table, of which one row is read, unless the model has no separate output
matrix and multiplies by the embedding table instead (tied embeddings); and
of a mixture-of-experts layer's expert tensors (`*_exps`), only the share of
the experts a token is routed to (`expert_used_count / expert_count`). The
KV cache read at these short contexts is left out (under 1% here).

Which bandwidth: a model's ceiling uses the median of the readings taken
around its own rounds (before each engine run and after the last), matching
the engines' medians over the same rounds; on a machine whose bandwidth
changes from one second to the next, a reading taken minutes away says little
about the seconds the engines ran in. Closer still, each engine run is paired
with its own ceiling: the higher of the readings just before and just after
it (the higher, so a run that straddles a change is held to the faster
mode); the "% of own ceilings" columns are the median over an engine's runs
of each run's share of its own ceiling, and the issue-5 decode verdict uses
minnow's. The table also says whether the decode target holds against the
best reading of the whole run (the strictest test, and the only one for
folders without per-round readings).
Standard library only.
"""

import json
import statistics
import struct
import sys
from pathlib import Path

# GGUF metadata value types: struct format of the fixed-size ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f):
        self.f = f

    def unpack(self, fmt):
        return struct.unpack(fmt, self.f.read(struct.calcsize(fmt)))[0]

    def string(self):
        return self.f.read(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, ty):
        if ty in _SCALARS:
            return self.unpack(_SCALARS[ty])
        if ty == _STRING:
            return self.string()
        if ty == _ARRAY:
            elem, n = self.unpack("<I"), self.unpack("<Q")
            if elem in _SCALARS:  # skip: no array value is needed here
                self.f.seek(n * struct.calcsize(_SCALARS[elem]), 1)
            else:
                for _ in range(n):
                    self.value(elem)
            return None
        raise ValueError(f"unknown GGUF value type {ty}")


def tensor_bytes(path):
    """{tensor name: bytes in the file}, the tensor shapes and the metadata's
    scalar and string values, from a GGUF header.

    A tensor's size is the distance to the next tensor's data (the last one's
    to the end of the file), which includes alignment padding of at most
    `general.alignment` bytes: no table of block sizes needed.
    """
    with open(path, "rb") as f:
        r = _Reader(f)
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = r.unpack("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.unpack("<I"))
        alignment = meta.get("general.alignment") or 32
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
            r.unpack("<I")  # type
            infos.append((r.unpack("<Q"), name, dims))
        data_start = -(-f.tell() // alignment) * alignment
        f.seek(0, 2)
        data_len = f.tell() - data_start
    infos.sort()
    sizes, shapes = {}, {}
    for i, (offset, name, dims) in enumerate(infos):
        end = infos[i + 1][0] if i + 1 < len(infos) else data_len
        sizes[name], shapes[name] = end - offset, dims
    return sizes, shapes, meta


def bytes_per_token(path):
    sizes, shapes, meta = tensor_bytes(path)
    arch = meta.get("general.architecture", "")
    n_expert = meta.get(f"{arch}.expert_count") or 0
    n_used = meta.get(f"{arch}.expert_used_count") or 0
    if n_expert and n_used:
        # A token reads only its routed experts' slices of the stacked tensors.
        for name in sizes:
            if name.endswith("_exps.weight"):
                sizes[name] = sizes[name] * n_used // n_expert
    total = sum(sizes.values())
    embd = sizes.get("token_embd.weight")
    if embd is None or "output.weight" not in sizes:
        return total  # tied: the embedding table is the output matrix, read whole
    rows = shapes["token_embd.weight"][-1]  # ggml lists the row length first
    return total - embd + embd // rows


def kv_bytes_per_token(path, depth, cache):
    """Bytes of KV cache one generated token reads with `depth` tokens
    already in the cache: keys and values of every layer at every position
    it attends to (a sliding-window layer only its window: Gemma 3's local
    layers, five of every six), at 2 bytes an element for f16 and 34 per 32
    for q8_0."""
    _, _, meta = tensor_bytes(path)
    arch = meta.get("general.architecture", "")
    n_layer = meta.get(f"{arch}.block_count") or 0
    n_head = meta.get(f"{arch}.attention.head_count") or 1
    n_kv = meta.get(f"{arch}.attention.head_count_kv") or n_head
    if isinstance(n_kv, list):
        n_kv = max(n_kv)
    head = (meta.get(f"{arch}.embedding_length") or 0) // n_head
    k_len = meta.get(f"{arch}.attention.key_length") or head
    v_len = meta.get(f"{arch}.attention.value_length") or head
    window = meta.get(f"{arch}.attention.sliding_window")
    per_elem = 2.0 if cache == "f16" else 34 / 32
    total = 0.0
    for layer in range(n_layer):
        local = arch == "gemma3" and window and (layer + 1) % 6 != 0
        seen = min(depth + 1, window) if local else depth + 1
        total += n_kv * (k_len + v_len) * seen * per_elem
    return total


def macs_per_token(path):
    """Multiply-adds of the weight products per prompt token: one per
    element of every weight matrix in the blocks (`blk.*`, two or more
    dimensions), of a mixture-of-experts layer's expert tensors only the
    routed share. The output head is left out (prefill computes logits for
    the last position only), and so are attention's own products (a few
    percent at pp512)."""
    sizes, shapes, meta = tensor_bytes(path)
    arch = meta.get("general.architecture", "")
    n_expert = meta.get(f"{arch}.expert_count") or 0
    n_used = meta.get(f"{arch}.expert_used_count") or 0
    total = 0
    for name, dims in shapes.items():
        if not name.startswith("blk.") or len(dims) < 2:
            continue
        n = 1
        for d in dims:
            n *= d
        if name.endswith("_exps.weight") and n_expert and n_used:
            n = n * n_used // n_expert
        total += n
    return total


def peak_table(out, models, res, pp):
    """Prefill as a share of the machine's multiply-add peak (int8peak.json,
    `crates/kernels/examples/int8peak.rs`): prefill is compute-bound, so
    this share is its honest figure, as decode's is the bandwidth's."""
    path = out / "int8peak.json"
    if not path.exists():
        return
    peak = json.loads(path.read_text())
    gmacs = peak["int8_best_gmacs"]
    print()
    print(f"Prefill against the compute peak: int8 multiply-adds, {peak['int8_path']}, {peak['threads']} threads, "
          f"best of {peak['runs']} runs {gmacs:.1f} GMAC/s (f32 FMA: {peak['f32_best_gmacs']:.1f}). "
          "A token's multiply-adds are its weight products (`macs_per_token`); issue 24: pp ≥ 2× llama.cpp.")
    print()
    print(f"| model | MACs/token | llama.cpp pp{pp} | minnow pp{pp} | pp ratio | llama.cpp % of int8 peak "
          f"| minnow % of int8 peak | pp ≥ 2× |")
    print("|---|--:|--:|--:|--:|--:|--:|:-:|")
    for m in models:
        name = m["model"]
        l, n = res.get(("llama", name)), res.get(("minnow", name))
        if not l or not n or not l["pp"] or not n["pp"]:
            continue
        macs = macs_per_token(m["path"])
        lpp, npp = statistics.median(l["pp"]), statistics.median(n["pp"])
        share = lambda tps: 100 * tps * macs / (gmacs * 1e9)
        print(f"| {name} | {macs / 1e6:.0f} M | {lpp:.1f} | {npp:.1f} | {npp / lpp:.2f}× | {share(lpp):.0f}% "
              f"| {share(npp):.0f}% | {'✓' if npp >= 2 * lpp else '✗'} |")


def paired_gbps(around, model, engine):
    """{round: GB/s}: for each of `engine`'s runs on `model`, the higher of
    the readings just before and just after it (readings are in the order
    taken; each engine run has one before it, and the model's last run one
    after it)."""
    paired = {}
    for i, r in enumerate(around):
        if r["model"] == model and r["next"] == engine:
            after = around[i + 1]["best_gbps"] if i + 1 < len(around) else r["best_gbps"]
            paired[r["round"]] = max(r["best_gbps"], after)
    return paired


def tg_by_round(records, engine, model):
    """{round: generation tok/s} of one engine's runs on one model."""
    out = {}
    for rec in records:
        if rec["engine"] != engine or rec["model"] != model:
            continue
        if engine == "llama":
            tg = [t["avg_ts"] for t in rec["out"] if t["n_gen"] != 0]
            if tg:
                out[rec["round"]] = tg[0]
        else:
            out[rec["round"]] = rec["out"]["tg_tps"]
    return out


def own_ceiling_pct(records, around, engine, model, per_tok):
    """Median over `engine`'s runs on `model` of each run's tg as a
    percentage of its own ceiling (`paired_gbps`); None without readings."""
    gbps = paired_gbps(around, model, engine)
    tg = tg_by_round(records, engine, model)
    pcts = [100 * tg[r] * per_tok / (gbps[r] * 1e9) for r in tg if r in gbps]
    return statistics.median(pcts) if pcts else None


def load_results(records):
    """{(engine, model): {"pp": [tok/s per round], "tg": [...]}} from results.jsonl's records."""
    res = {}
    for rec in records:
        slot = res.setdefault((rec["engine"], rec["model"]), {"pp": [], "tg": [], "rss": []})
        if rec.get("max_rss_kib"):
            slot["rss"].append(rec["max_rss_kib"] / 1024)
        if rec["engine"] == "llama":
            for test in rec["out"]:
                kind = "pp" if test["n_gen"] == 0 else "tg"
                slot[kind].append(test["avg_ts"])
        else:
            slot["pp"].append(rec["out"]["pp_tps"])
            slot["tg"].append(rec["out"]["tg_tps"])
    return res


def main():
    out = Path(sys.argv[1])
    meta = json.loads((out / "meta.json").read_text())
    # The start and end readings, and those around every engine run.
    bw = max((json.loads(p.read_text()) for p in out.glob("membw*.json")), key=lambda b: b["best_gbps"])
    rounds_file = out / "membw-rounds.jsonl"
    around = [json.loads(l) for l in rounds_file.read_text().splitlines()] if rounds_file.exists() else []
    best_gbps = max([bw["best_gbps"]] + [r["best_gbps"] for r in around])
    models = [json.loads(l) for l in (out / "models.jsonl").read_text().splitlines()]
    pp, tg = meta["pp"], meta["tg"]

    print(f"minnow vs llama.cpp, {meta['date']}: {meta['cpu']}, {meta['cpus']} CPUs, "
          f"{meta['threads']} threads, pp{pp} / tg{tg} tok/s, median of {meta['rounds']} alternating rounds; "
          f"load average {meta['load_before']} before, {meta['load_after']} after.")
    records = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    res = load_results(records)
    levels = sorted({r["out"].get("simd") for r in records
                     if r.get("engine") == "minnow" and isinstance(r.get("out"), dict) and r["out"].get("simd")})
    kernels = f" (kernels: {', '.join(levels)})" if levels else ""
    each = ", ".join(f"{p.stem.removeprefix('membw-')} {json.loads(p.read_text())['best_gbps']:.1f}"
                     for p in sorted(out.glob("membw*.json")))
    print(f"minnow {meta['commit']}{kernels}; llama.cpp from {meta['llamacpp']}. "
          f"Read bandwidth ({bw['threads']} threads, each reading the best of {bw['runs']} passes): "
          f"{each}; best of the run {best_gbps:.1f} GB/s"
          + (f" ({len(around)} readings around the engine runs, "
             f"{min(r['best_gbps'] for r in around):.1f}–{max(r['best_gbps'] for r in around):.1f})" if around else "")
          + ". Ratios are minnow ÷ llama.cpp.")
    others = [r["others_running"] for r in records if "others_running" in r]
    if others:
        mean = sum(others) / len(others)
        print(f"Other programs' runnable tasks at the start of each engine run: mean {mean:.1f}, max {max(others)}.")
        if mean > 0.5:
            print(f"\n**Warning: the machine was busy ({mean:.1f} other runnable tasks on average, "
                  f"{meta['cpus']} CPUs). Under contention llama.cpp's spinning threads lose far more than "
                  "minnow's, and the bandwidth is a share of the machine's: rerun on a quiet machine "
                  "before trusting these ratios.**")
    print()
    print(f"| model | weights/token | llama.cpp pp{pp} | minnow pp{pp} | pp ratio "
          f"| llama.cpp tg{tg} | minnow tg{tg} | tg ratio | bandwidth GB/s | tg ceiling | llama.cpp % of ceiling "
          f"| minnow % of ceiling | llama.cpp / minnow % of own ceilings | issue-5 targets pp / tg "
          f"| tg vs the run's best reading |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|:-:|")
    spread = []
    for m in models:
        name = m["model"]
        per_tok = bytes_per_token(m["path"])
        mine = [r["best_gbps"] for r in around if r["model"] == name]
        gbps = statistics.median(mine) if mine else best_gbps
        ceiling = gbps * 1e9 / per_tok
        best_ceiling = best_gbps * 1e9 / per_tok
        l, n = res.get(("llama", name)), res.get(("minnow", name))
        if not l or not n or not l["pp"] or not n["pp"]:
            print(f"| {name} | {per_tok / 1e6:.0f} MB | (no result) |||||||||||||")
            continue
        lpp, ltg = statistics.median(l["pp"]), statistics.median(l["tg"])
        npp, ntg = statistics.median(n["pp"]), statistics.median(n["tg"])
        # Issue 5: pp ≥ 1.25× llama.cpp; tg ≥ the lower of 1.25× llama.cpp and
        # 90% of the ceiling, i.e. either of the two. The ceiling: each minnow
        # run's own where there are per-round readings, else the median's.
        own = {e: own_ceiling_pct(records, around, e, name, per_tok) for e in ("llama", "minnow")}
        ok_pp = "✓" if npp >= 1.25 * lpp else "✗"
        tg_met = lambda c: "✓" if ntg >= min(1.25 * ltg, 0.9 * c) else "✗"
        if own["minnow"] is not None:
            ok_tg = "✓" if ntg >= 1.25 * ltg or own["minnow"] >= 90 else "✗"
        else:
            ok_tg = tg_met(ceiling)
        own_cell = " / ".join("–" if own[e] is None else f"{own[e]:.0f}%" for e in ("llama", "minnow"))
        strict = f"{tg_met(best_ceiling)} ({100 * ntg / best_ceiling:.0f}% of {best_ceiling:.1f})"
        print(f"| {name} | {per_tok / 1e6:.0f} MB | {lpp:.1f} | {npp:.1f} | {npp / lpp:.2f}× "
              f"| {ltg:.1f} | {ntg:.1f} | {ntg / ltg:.2f}× | {gbps:.1f} | {ceiling:.1f} | {100 * ltg / ceiling:.0f}% "
              f"| {100 * ntg / ceiling:.0f}% | {own_cell} | {ok_pp} / {ok_tg} | {strict} |")
        fmt = lambda xs: " ".join(f"{x:.1f}" for x in xs)
        spread.append(f"- {name}: llama.cpp pp {fmt(l['pp'])}, tg {fmt(l['tg'])}; "
                      f"minnow pp {fmt(n['pp'])}, tg {fmt(n['tg'])}"
                      + (f"; bandwidth GB/s {fmt(mine)}" if mine else "")
                      + (f"; minnow's own ceilings GB/s {fmt(paired_gbps(around, name, 'minnow').values())}"
                         if around else ""))
    print()
    print("Per round (tok/s):")
    print("\n".join(spread))
    rss = [(m["model"], res.get(("llama", m["model"]), {}).get("rss"), res.get(("minnow", m["model"]), {}).get("rss"))
           for m in models]
    rss = [(name, l, n) for name, l, n in rss if l and n]
    if rss:
        print()
        print("Peak resident memory of a whole bench run (median over rounds, MiB; same model, context of "
              f"pp{pp} + tg{tg}):")
        print()
        print("| model | llama.cpp | minnow | minnow ÷ llama.cpp |")
        print("|---|--:|--:|--:|")
        for name, l, n in rss:
            lm, nm = statistics.median(l), statistics.median(n)
            print(f"| {name} | {lm:.0f} | {nm:.0f} | {nm / lm:.2f}× |")

    peak_table(out, models, res, pp)
    gbps_of = {}
    for m in models:
        mine = [r["best_gbps"] for r in around if r["model"] == m["model"]]
        gbps_of[m["model"]] = statistics.median(mine) if mine else best_gbps
    depth_table(out, models, tg, gbps_of)
    alternating_table(out, models, tg)


def depth_table(out, models, tg, gbps_of):
    """Generation speed with context: each engine's median tg at each depth,
    and the change from the shallowest to the deepest, per KV cache type;
    then each as a share of its memory ceiling at that depth (bandwidth ÷
    the weights plus the KV cache a step reads, `gbps_of[model]` the
    bandwidth of the model's own rounds)."""
    path = out / "depth.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    if not rows:
        return
    speeds = {}
    for r in rows:
        tps = r["out"][0]["avg_ts"] if r["engine"] == "llama" else r["out"]["tg_tps"]
        # (Runs before --depth-caches recorded no cache type: f16.)
        speeds.setdefault((r["engine"], r["model"], r["depth"], r.get("cache", "f16")), []).append(tps)
    depths = sorted({r["depth"] for r in rows})
    caches = sorted({r.get("cache", "f16") for r in rows})
    lo, hi = depths[0], depths[-1]
    print()
    print(f"Generation with context (tg{tg} after d tokens already in the KV cache, median of "
          f"{max(len(v) for v in speeds.values())} alternating rounds; issue 5: d{hi} within 15% of d{lo}; "
          "q8_0: llama.cpp -fa 1 -ctk q8_0 -ctv q8_0, minnow --ctk q8_0 --ctv q8_0):")
    print()
    cols = " | ".join(f"{e} d{d}" for e in ("llama.cpp", "minnow") for d in depths)
    print(f"| model | KV cache | {cols} | llama.cpp d{lo}→d{hi} | minnow d{lo}→d{hi} "
          f"| minnow ÷ llama.cpp at d{hi} | within 15% |")
    print("|---|:-:|" + "--:|" * (2 * len(depths) + 3) + ":-:|")
    for m in models:
        name = m["model"]
        for c in caches:
            med = {(e, d): statistics.median(speeds[(e, name, d, c)]) for e in ("llama", "minnow") for d in depths
                   if (e, name, d, c) in speeds}
            if len(med) < 2 * len(depths):
                continue
            change = lambda e: 100 * (med[(e, hi)] / med[(e, lo)] - 1)
            cells = " | ".join(f"{med[(e, d)]:.1f}" for e in ("llama", "minnow") for d in depths)
            ok = "✓" if med[("minnow", hi)] >= 0.85 * med[("minnow", lo)] else "✗"
            print(f"| {name} | {c} | {cells} | {change('llama'):+.0f}% | {change('minnow'):+.0f}% "
                  f"| {med[('minnow', hi)] / med[('llama', hi)]:.2f}× | {ok} |")
    print()
    print("The same runs against the memory ceiling at each depth: bandwidth (the median reading around the "
          "model's rounds) ÷ the bytes one step reads, its weights (as in the first table) plus the KV cache at "
          "that depth (`kv_bytes_per_token`); issue 24: minnow ≥ 90% at every depth, f16 cache.")
    print()
    cols = " | ".join(f"{e} d{d}" for d in depths for e in ("MB read", "llama.cpp", "minnow"))
    print(f"| model | KV cache | {cols} | ≥ 90% |")
    print("|---|:-:|" + "--:|" * (3 * len(depths)) + ":-:|")
    for m in models:
        name = m["model"]
        if name not in gbps_of:
            continue
        for c in caches:
            med = {(e, d): statistics.median(speeds[(e, name, d, c)]) for e in ("llama", "minnow") for d in depths
                   if (e, name, d, c) in speeds}
            if len(med) < 2 * len(depths):
                continue
            cells, ok = [], True
            for d in depths:
                read = bytes_per_token(m["path"]) + kv_bytes_per_token(m["path"], d, c)
                ceiling = gbps_of[name] * 1e9 / read
                share = {e: 100 * med[(e, d)] / ceiling for e in ("llama", "minnow")}
                ok = ok and share["minnow"] >= 90
                cells.append(f"{read / 1e6:.0f} | {share['llama']:.0f}% | {share['minnow']:.0f}%")
            print(f"| {name} | {c} | {' | '.join(cells)} | {'✓' if ok else '✗'} |")


def alternating_table(out, models, tg):
    """minnow's change from the shallowest depth to the deepest, measured in
    one process with decode steps alternating between the two caches."""
    path = out / "alternating.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    if not rows:
        return
    lo, hi = rows[0]["alternate_depth"], rows[0]["depth"]
    print()
    print(f"minnow alone, the same change in one process (`minnow bench -n {tg} -r 3 -d {hi} --alternate-depth {lo}`: "
          f"decode steps alternating between a cache at d{lo} and one at d{hi}, median step times):")
    print()
    print(f"| model | KV cache | minnow d{lo} | minnow d{hi} | d{lo}→d{hi} | within 15% |")
    print("|---|:-:|--:|--:|--:|:-:|")
    order = {m["model"]: i for i, m in enumerate(models)}
    for r in sorted(rows, key=lambda r: (order.get(r["model"], 99), r["type_k"])):
        ok = "✓" if r["change_pct"] >= -15 else "✗"
        print(f"| {r['model']} | {r['type_k']} | {r['tg_tps_alternate']:.1f} | {r['tg_tps']:.1f} "
              f"| {r['change_pct']:+.1f}% | {ok} |")


if __name__ == "__main__":
    main()
