"""The text of each scenario's section in docs/BENCHMARKS.md.

Templates: every figure, and every verdict word ("close to the ceiling", "faster"), comes
from the medians and ratios of the run being reported; the explanations say what the code
does on each path (so why the figures differ), never a number that was not measured.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from benchsuite.report import _short, fmt, fx, med, pct, ratio, rstat, val


def _case(sc: dict[str, Any], key: str, value: Any) -> dict[str, Any] | None:
    return next((c for c in sc.get("cases", []) if c.get("extra", {}).get(key) == value), None)


def _verdict(r: float | None) -> str:
    if r is None:
        return ""
    if r >= 0.9:
        return "at the ceiling"
    if r >= 0.7:
        return "close to the ceiling"
    if r >= 0.5:
        return "within 2x of the ceiling"
    return "well below the ceiling"


def _times(r: float | None) -> str:
    """'3.2x faster' / '0.4x (slower)' wording for a higher-is-better ratio."""
    if r is None:
        return "n/a"
    return f"{fx(r)} ({'faster' if r >= 1 else 'slower'})"


def para_s1(sc: dict[str, Any], results: dict[str, Any]) -> list[str]:
    u, z = _case(sc, "dist", "uniform"), _case(sc, "dist", "zipf")
    lat = next((c for c in sc["cases"] if c["unit"] == "us"), None)
    n = sc.get("notes", {})
    batch = n.get("batch", 4096)
    e_u, c_u = med(u, "embstore"), med(u, "c_gather")
    rc = [ratio(x, "embstore", "c_gather") for x in (u, z)]
    p = [f"With the {n.get('table_bytes', 0) / 1e9:.2f} GB table ({n.get('rows', 0):,} x "
         f"{n.get('dim')} float32) in page cache and batches of {batch} ids, "
         f"`Table.gather(out=)` delivered {fmt(e_u, 'rows/s')} on uniform ids and "
         f"{fmt(med(z, 'embstore'), 'rows/s')} on Zipf(1.05) ids: {fx(rc[0])} and {fx(rc[1])} "
         f"of the C ceiling (memcpy gather from the same shard file with prefetch 16, measured "
         f"in the same rounds), {_verdict(min(r for r in rc if r is not None) if any(rc) else None)}."]
    one = med(lat, "embstore")
    if e_u and c_u and one is not None:
        extra_us = (batch / e_u - batch / c_u) * 1e6
        if extra_us > 0:
            p[-1] += (f" Per batch embstore spends {extra_us:.0f} µs more than the ceiling "
                      f"(uniform); a call with a single id costs {one:.1f} µs "
                      f"(np.take: {med(lat, 'np_take') or 0:.1f} µs), so fixed per-call work "
                      f"(validating ids and `out=`, entering native code) explains about "
                      f"{min(1.0, one / extra_us):.0%} of the gap. The rest grows with the "
                      "rows: per row embstore does what the raw memcpy loop does not — it "
                      "checks the id against the table size, and reads the row's chunk "
                      "counter (another cache line) before and after copying it, in groups "
                      "of 32 rows, so a concurrent writer can never hand out a torn row.")
        else:
            p[-1] += f" A call with a single id costs {one:.1f} µs."
    tf_e, tf_f = med(u, "tf_gather_eager"), med(u, "tf_gather_function")
    peers = (f"Against other in-process paths (uniform ids; Zipf in the tables below): "
             f"{rstat(u, 'embstore', 'np_take')} np.take(out=) on an in-RAM copy (numpy's take "
             f"copies row by row with no software prefetch), {rstat(u, 'embstore', 'np_memmap')} "
             f"np.memmap[ids] (which also allocates a fresh result array per batch)")
    if tf_e:
        peers += (f", {rstat(u, 'embstore', 'tf_gather_eager')} eager tf.gather and "
                  f"{rstat(u, 'embstore', 'tf_gather_function')} tf.gather inside tf.function "
                  f"on an in-RAM tf.Variable (embedding_lookup: "
                  f"{rstat(u, 'embstore', 'tf_lookup_eager')} / "
                  f"{rstat(u, 'embstore', 'tf_lookup_function')})")
        if tf_f and tf_f < tf_e:
            peers += (f"; at this batch size tf.function costs about "
                      f"{(batch / tf_f - batch / tf_e) * 1e6:.0f} µs more per call than eager "
                      "execution")
    else:
        t = u["contenders"].get("tf_gather_eager", {}) if u else {}
        peers += f"; TensorFlow: {t.get('skipped', 'not measured')}"
    p.append(peers + ".")
    slow = []
    for k, what in (("lmdb_get", "LMDB (one Python-level txn.get per key)"),
                    ("redis_mget", "Redis MGET (the client encodes every key, the reply comes "
                                   "over loopback)"),
                    ("h5py", "h5py (fancy indexing needs sorted unique ids; each selection "
                             "is a hyperslab read)")):
        v = med(u, k)
        if v:
            slow.append(f"{what} {fmt(v, 'rows/s')} = {1e6 / v:.1f} µs per row, so embstore is "
                        f"{rstat(u, 'embstore', k)} as fast")
        elif u and k in u["contenders"]:
            slow.append(f"{what}: not measured ({u['contenders'][k].get('skipped')})")
    if slow:
        p.append("Per-key stores pay per row what embstore pays per batch: " + "; ".join(slow) + ".")
    if med(z, "embstore") and e_u and c_u and med(z, "c_gather"):
        gain, cgain = med(z, "embstore") / e_u, med(z, "c_gather") / c_u
        s = (f"Zipf ids ran at {gain:.2f}x the uniform rate for embstore and {cgain:.2f}x "
             "for the C ceiling")
        if gain > 1.05 and cgain > 1.05:
            s += ": hot rows repeat within a batch and stay in the CPU caches"
        elif cgain > 1.05 >= gain:
            s += ("; the ceiling gains from hot rows staying in the CPU caches and embstore "
                  "does not, a sign that its time goes to per-row work rather than to memory "
                  "misses")
        p.append(s + ".")
    return p


def para_s2(sc: dict[str, Any], results: dict[str, Any]) -> list[str]:
    n = sc["notes"]
    ra = results["machine"].get("read_ahead_kb")
    p = [f"The {n['table_bytes'] / 1e9:.2f} GB table was read by a process in a memory cgroup "
         f"limited to {n['memory_limit_bytes'] / 1e9:.2f} GB, page cache included, so at most "
         "half of it (less the process and embstore's cache) can be resident. Each run starts "
         f"with the table evicted, warms up for {n['warm_s']:.0f} s, then measures "
         f"{n['measure_s']:.0f} s on a stream of {n['stream_ids'] / 2**20:.0f} Mi Zipf ids that "
         "never wraps (a wrapped stream repeats ids the cache already holds). The ceilings "
         f"are {n['cold_count']:,} cold random reads of one row each (native_bench coldread)."]
    for case in sc["cases"]:
        if "threads" in case["extra"]:
            p.append(_s2_threads(case))
            continue
        a = case["extra"]["alpha"]
        ours = [o for o in case["ours"] if med(case, o)]
        if not ours:
            continue
        hits = case["extra"]["hit_rate"]
        disk = case["extra"]["disk_reads_per_s"]
        best = max(ours, key=lambda o: med(case, o))
        worst = min(ours, key=lambda o: med(case, o))
        c1, c16 = med(case, "cold_mmap_random"), med(case, "cold_pread16")
        s = (f"Zipf({a}): embstore served {fmt(med(case, best), 'rows/s')} with "
             f"{_short(case, best)} (cache hit rate {pct(hits[best]['median'])})")
        if worst != best:
            s += (f" and {fmt(med(case, worst), 'rows/s')} with {_short(case, worst)} "
                  f"(hit rate {pct(hits[worst]['median'])})")
        rs = sorted(r for r in (ratio(case, o, "np_memmap") for o in ours) if r)
        s += (f"; np.memmap[ids] under the same limit managed "
              f"{fmt(med(case, 'np_memmap'), 'rows/s')}, so embstore ran at "
              + (f"{fx(rs[0])}–{fx(rs[-1])}" if len(rs) > 1 else fx(rs[0]) if rs else "n/a")
              + " np.memmap's rate.")
        dr = disk.get(best, {}).get("median")
        if dr and c1:
            s += (f" With {_short(case, best)}, the reader waited on "
                  f"{fmt(dr, 'rows/s').replace('rows/s', 'page faults/s')} that read the disk "
                  f"(major faults; pages its misses requested ahead with MADV_WILLNEED arrive "
                  f"without one), {fx(dr / c1)} the one-thread MADV_RANDOM cold-read rate "
                  f"({fmt(c1, 'rows/s')}); pread with 16 reads in flight reaches "
                  f"{fmt(c16, 'rows/s')}.")
            if dr / c1 > 0.6 and c16 and c16 > 1.5 * c1:
                s += (" Most misses still waited for the disk one page fault at a time "
                      "(their MADV_WILLNEED requests had not arrived); reads kept in flight "
                      f"could serve them up to {c16 / c1:.1f}x faster.")
        mm_dr = disk.get("np_memmap", {}).get("median")
        if mm_dr is not None and med(case, "np_memmap"):
            s += (f" np.memmap took {mm_dr / med(case, 'np_memmap'):.2f} major faults per row"
                  + (f" at {1e3 / mm_dr:.1f} ms each" if mm_dr > 0 else "") +
                  f": without MADV_RANDOM each fault reads a window around the row "
                  f"(read_ahead_kb {ra}), and under the limit those pages evict rows that are "
                  "needed again.")
        order = sorted(ours, key=lambda o: int(re.sub(r"\D", "", o) or 0))
        rates = [med(case, o) for o in order]
        fills = case["extra"].get("cache_fill", {})
        if len(order) > 1:
            s += (" A bigger cache helped at every step." if rates == sorted(rates) else
                  " A bigger cache did not help at every step.")
        unfilled = [o for o in order if fills.get(o, {}).get("median", 1) < 0.95]
        if unfilled:
            s += (" At the end of a run the cache was only "
                  + ", ".join(f"{pct(fills[o]['median'])} full ({_short(case, o)})"
                              for o in unfilled)
                  + f": it had not filled within the {n['warm_s'] + n['measure_s']:.0f} s "
                  "a run lasts (each miss is a disk read), so these figures describe a "
                  "serving process's first seconds, not its steady state, and understate "
                  "what a full cache would reach.")
        p.append(s)
    return p


def _s2_threads(case: dict[str, Any]) -> str:
    x = case["extra"]
    n, pc = x["threads"], round(x["budget"] * 100)
    on, off = f"embstore_cache{pc}_t{n}", f"embstore_nocache_t{n}"
    one = f"embstore_cache{pc}"
    s = (f"Concurrent readers, Zipf({x['alpha']}), same limit: {n} threads sharing the stream "
         f"served {fmt(med(case, on), 'rows/s')} with a {pc}% cache "
         f"({rstat(case, on, one)} the one-thread rate with the same cache) and "
         f"{fmt(med(case, off), 'rows/s')} with the cache off (the cached run is "
         f"{rstat(case, on, off)} that); 16 preads in flight reach "
         f"{fmt(med(case, 'cold_pread16'), 'rows/s')} on rows that are all cold.")
    r_one, r_off = ratio(case, on, one), ratio(case, on, off)
    if r_one is not None:
        s += (" The cache's mutex is not held while a missed row is read from the mapping "
              "(RowCache_gather in embstore/_native/rows.c: the slot is reserved under the "
              "lock and filled after the read), and a reader whose misses wait for the disk "
              "requests all their pages at once (MADV_WILLNEED) before reading them, so even "
              f"one thread keeps many disk reads in flight: {n} threads served {fx(r_one)} "
              "the rows of one.")
    return s


def para_s3(sc: dict[str, Any], results: dict[str, Any]) -> list[str]:
    if sc["status"] != "ok":
        return ["Nothing was measured: the TensorFlow integration (embstore/tensorflow/ and "
                "tools/bench_tf.py) is being written separately. When tools/bench_tf.py "
                "exposes `suite(quick, repeats, rows, batch, workdir) -> dict` (or a `--json` "
                "command line), this scenario calls it and its figures appear here."]
    n = sc.get("notes", {})
    p = [f"Measured by tools/bench_tf.py (`{n.get('command', '')}`), which builds its own "
         f"{n.get('rows', 0):,}-row store and an in-RAM tf.Variable of the same table and "
         "interleaves its variants; the suite turns its per-repeat figures into the tables "
         "below (the last variant of each measurement is the in-RAM TensorFlow baseline)."]
    if not sc.get("cases"):
        p.append(f"tools/bench_tf.py reported nothing the suite could read "
                 f"({n.get('unparsed', 'no measurement with two or more variants')}).")
    for case in sc.get("cases", []):
        base = case["extra"].get("baseline", "tf_baseline")
        parts = [f"{case['contenders'][o]['label']} {val(case, o)}, "
                 f"{rstat(case, o, base)} the baseline"
                 + (f" and {rstat(case, o, 'c_gather')} of the C gather ceiling"
                    if case.get("ceiling") else "")
                 for o in [k for k in case["contenders"] if k.startswith("embstore")]
                 if med(case, o)]
        p.append(f"{case['title']}: " + "; ".join(parts) + f" (baseline: "
                 f"{case['contenders'][base]['label']} {val(case, base)}).")
    if any(c.get("ceiling") for c in sc.get("cases", [])):
        p.append("bench_tf.py runs as one process, so the C ceiling could not take turns with "
                 "it: it was measured right before and after, and its ratios pair repeats "
                 "that did not run in the same round.")
    return p


def para_s4(sc: dict[str, Any], results: dict[str, Any]) -> list[str]:
    case = sc["cases"][0]
    x = case["extra"]
    e = med(case, "embstore")
    batch = results["config"]["batch"]
    fs = x.get("last_round", {}).get("fsync_us", {})
    p = [f"Each step applies SGD to {batch} random rows of a {x['rows']:,} x 64 float32 table, "
         f"logs the new rows ({x['log_bytes_per_step'] / 1024:.0f} KiB) and fdatasyncs the log "
         f"before returning ({x['source']}). embstore reached {fmt(e, 'rows/s')}"
         + (f" ({batch / e * 1e3:.2f} ms per step)" if e else "") +
         f", {rstat(case, 'embstore', 'fsync_ceiling')} of the rate that fdatasync alone "
         f"allows ({fmt(med(case, 'fsync_ceiling'), 'rows/s')}"
         + (f"; sync after a {x['log_bytes_per_step'] >> 10} KiB write: "
            + ", ".join(f"{k} {v:.0f} µs" for k, v in fs.items()) if fs else "") + ")."]
    bd = (x.get("last_round", {}).get("embstore") or {}).get("breakdown_ms_per_step")
    if bd:
        top = sorted(bd.items(), key=lambda kv: -kv[1])[:4]
        p[-1] += (" Where a step's time went (last round, tools/bench_write.py's breakdown): "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in top) + ".")
    peers = []
    for k in ("redis_always", "redis_raw_always", "redis_everysec", "redis_raw_everysec"):
        if med(case, k):
            peers.append(f"{case['contenders'][k]['label']} {fmt(med(case, k), 'rows/s')} "
                         f"(embstore {rstat(case, 'embstore', k)})")
    if peers:
        p.append("Durable peer: " + "; ".join(peers) + ". With appendfsync always Redis "
                 "writes and fsyncs its AOF once per pass of its event loop, before replying, "
                 "and it reads a client's pipeline in 16 KiB pieces, so one step of "
                 f"{batch} SETs costs it many syncs where embstore pays one; the redis-py "
                 "figures are also bound by building every command in Python.")
    ram = [f"{case['contenders'][k]['label']} {fmt(med(case, k), 'rows/s')} "
           f"(embstore {rstat(case, 'embstore', k)})"
           for k in ("numpy_scatter", "tf_keras_sgd", "tf_scatter_sub") if med(case, k)]
    if ram:
        p.append("Not durable, in RAM, for scale: " + "; ".join(ram) + ".")
    return p


def para_s5(sc: dict[str, Any], results: dict[str, Any]) -> list[str]:
    p = []
    opens = []
    for case in sc["cases"]:
        x = case["extra"]
        bd = x.get("breakdown_s", {})
        eo = bd.get("embstore", {}).get("open_s", {}).get("median")
        ef = bd.get("embstore", {}).get("first_s", {}).get("median")
        opens.append((x["table_bytes"], eo))
        s = (f"{x['table_bytes'] / 1e9:.2f} GB table, file(s) evicted from the page cache "
             f"before every open: embstore's open + first gather of 4096 random rows took "
             f"{fmt(med(case, 'embstore'), 's')} (open {fmt(eo, 's')}, first gather "
             f"{fmt(ef, 's')}). np.load(mmap_mode='r') + first index: "
             f"{fmt(med(case, 'npy_mmap'), 's')} (embstore ÷ it: {rstat(case, 'embstore', 'npy_mmap')}); "
             f"full np.load: {fmt(med(case, 'npy_full'), 's')} ({rstat(case, 'embstore', 'npy_full')}); "
             f"h5py: {fmt(med(case, 'h5py'), 's')} ({rstat(case, 'embstore', 'h5py')})")
        if med(case, "tf_restore"):
            tfb = bd.get("tf", {})
            s += (f"; tf.train.Checkpoint restore + tf.gather: {fmt(med(case, 'tf_restore'), 's')} "
                  f"({rstat(case, 'embstore', 'tf_restore')}), plus "
                  f"{fmt(tfb.get('create_var_s', {}).get('median'), 's')} to create the "
                  "tf.Variable it restores into")
        c1, c16 = med(case, "cold_mmap_random"), med(case, "cold_pread16")
        s += (f". Fetching 4096 random rows cold takes {fmt(c16, 's')} with 16 preads in flight "
              f"(the ceiling) and {fmt(c1, 's')} through a MADV_RANDOM mapping on one thread")
        if ef and c1:
            s += (f"; embstore's first gather, which faults its rows in one at a time, took "
                  f"{fx(ef / c1)} the one-thread time and {fx(ef / c16) if c16 else 'n/a'} "
                  "the ceiling's")
        p.append(s + ".")
    if len(opens) > 1 and all(o for _, o in opens):
        p.append("Opening reads the manifest and maps the shards; no row is read until one "
                 "is asked for: " + ", ".join(f"{fmt(o, 's')} for {b / 1e9:.2f} GB"
                                              for b, o in opens) + ".")
    return p


def para_s6(sc: dict[str, Any], results: dict[str, Any]) -> list[str]:
    cases = sorted(sc["cases"], key=lambda c: c["extra"]["processes"])
    tb = sc["notes"]["table_bytes"]
    parts = [f"{c['extra']['processes']} process{'es' if c['extra']['processes'] > 1 else ''}: "
             f"embstore {fmt(med(c, 'embstore'), 'bytes')}, numpy {fmt(med(c, 'numpy'), 'bytes')} "
             f"(embstore ÷ numpy {rstat(c, 'embstore', 'numpy')}), ideal "
             f"{fmt(med(c, 'ideal'), 'bytes')}" for c in cases]
    p = [f"Each process opens the {tb / 1e9:.2f} GB table and gathers every row once, then "
         "the total proportional set size (PSS, /proc/PID/smaps_rollup) of all of them is "
         "read: " + "; ".join(parts) + "."]
    if len(cases) > 1:
        n0, n1 = cases[0]["extra"]["processes"], cases[-1]["extra"]["processes"]
        se = ((med(cases[-1], "embstore") or 0) - (med(cases[0], "embstore") or 0)) / (n1 - n0)
        sm = ((med(cases[-1], "numpy") or 0) - (med(cases[0], "numpy") or 0)) / (n1 - n0)
        p.append(f"Each extra embstore process added {fmt(se, 'bytes')}, each extra numpy "
                 f"process {fmt(sm, 'bytes')}: the mapped shard is page cache that every "
                 "process shares (PSS splits a shared page between its mappers), while "
                 "np.load copies the table into private memory in every process.")
    ready = [(c["extra"]["processes"], c["extra"]["ready_s"]) for c in cases]
    p.append("Time until the slowest process had touched every row: " + "; ".join(
        f"N={nproc}: embstore {fmt(r['embstore']['median'], 's')}, numpy "
        f"{fmt(r['numpy']['median'], 's')}" for nproc, r in ready) +
        " (the table was in page cache for both).")
    return p


def para_s7(sc: dict[str, Any], results: dict[str, Any]) -> list[str]:
    imp = next(c for c in sc["cases"] if "embstore_import" in c["ours"])
    exp = next(c for c in sc["cases"] if "embstore_export" in c["ours"])
    shards = imp.get("extra", {}).get("shards", {})
    p = [f"Import of a .npy already in page cache into a new table created with "
         f"`expected_rows` (as `embstore-cli import` does; {shards.get('expected_rows')} "
         f"shard(s)) ran at {fmt(med(imp, 'embstore_import'), 'GB/s')}, "
         f"{rstat(imp, 'embstore_import', 'seqio_write')} of the sequential write + fsync "
         f"ceiling ({fmt(med(imp, 'seqio_write'), 'GB/s')}); np.save + fsync of the in-RAM "
         f"array reached {fmt(med(imp, 'np_save'), 'GB/s')} "
         f"(embstore ÷ it {rstat(imp, 'embstore_import', 'np_save')}) and h5py "
         f"{fmt(med(imp, 'h5_write'), 'GB/s')} ({rstat(imp, 'embstore_import', 'h5_write')}). "
         "Import reads the file in 32 MiB chunks, checks that every value is finite, writes "
         "the rows with pwrite and syncs the shards before publishing them in the manifest; "
         "np.save writes one in-memory buffer."]
    nh = med(imp, "embstore_import_nohint")
    if nh:
        p.append(f"Without the size hint (`create_table(name, dim)` then `import_npy`) the "
                 f"table grows in small shards ({shards.get('no_hint')} of them for this "
                 f"table) and the import ran at {fmt(nh, 'GB/s')}, "
                 f"{fx(nh / med(imp, 'embstore_import')) if med(imp, 'embstore_import') else 'n/a'} "
                 "the hinted import: every shard is a file to create, preallocate, map and "
                 "sync.")
    p.append(f"Export to .npy (read the shards, write and fsync a new file) ran at "
             f"{fmt(med(exp, 'embstore_export'), 'GB/s')} "
             f"({rstat(exp, 'embstore_export', 'seqio_write')} of the write ceiling). Reading "
             f"the whole table into one array ran at {fmt(med(exp, 'embstore_read_all'), 'GB/s')}"
             f" against np.load {fmt(med(exp, 'np_load'), 'GB/s')} "
             f"({rstat(exp, 'embstore_read_all', 'np_load')}) and h5py read_direct "
             f"{fmt(med(exp, 'h5_read'), 'GB/s')} ({rstat(exp, 'embstore_read_all', 'h5_read')}); "
             f"the warm sequential read ceiling is {fmt(med(exp, 'seqio_read_warm'), 'GB/s')}. "
             "iter_rows, under both, preads each 32 MiB chunk of float32 rows straight into "
             "a freshly allocated array (other dtypes decode from one reused buffer), and "
             "the harness copies each chunk into the result: two passes over the data and a "
             "new allocation per chunk, where np.load reads straight into its array.")
    return p


def para_s8(sc: dict[str, Any], results: dict[str, Any]) -> list[str]:
    n = sc["notes"]
    p = []
    for case in sc["cases"]:
        e, er = med(case, "embstore"), med(case, "embstore_rows")
        s = (f"{case['title']}: {n['keys']:,} random int64 keys; the keyed gather (hash lookup "
             f"of the keys, then the row gather) served {fmt(e, 'rows/s')}, "
             f"{rstat(case, 'embstore', 'embstore_rows')} of the same gather by row id "
             f"({fmt(er, 'rows/s')})")
        if e and er and er > e:
            s += f", so a key lookup costs about {(1 / e - 1 / er) * 1e9:.0f} ns"
        s += (f"; the C row-gather ceiling was {fmt(med(case, 'c_gather'), 'rows/s')} "
              f"({rstat(case, 'embstore', 'c_gather')}). LMDB get per key: "
              f"{val(case, 'lmdb_get')}, embstore ÷ it {rstat(case, 'embstore', 'lmdb_get')}; "
              f"Redis MGET: {val(case, 'redis_mget')}, embstore ÷ it "
              f"{rstat(case, 'embstore', 'redis_mget')}.")
        p.append(s)
    if n.get("index_bytes_per_key"):
        p.append(f"The in-memory hash took {n['index_bytes_per_key']:.1f} bytes per key "
                 f"(building the table of {n['keys']:,} keys: {n['build_s']:.1f} s). The peers "
                 "were handed their keys already encoded as bytes (untimed), a benefit embstore, "
                 "fed int64 arrays, does not need.")
    return p


PARAGRAPHS: dict[str, Callable[..., Any]] = {
    "S1": para_s1, "S2": para_s2, "S3": para_s3, "S4": para_s4, "S5": para_s5,
    "S6": para_s6, "S7": para_s7, "S8": para_s8,
}
