#!/usr/bin/env python3
"""Turns one bench/run results directory into the docs/benchmarks.md section between
`<!-- bench/run:begin -->` and `<!-- bench/run:end -->` (the rest of the file is left alone)."""
import csv
import json
import os
import sys

BEGIN, END = "<!-- bench/run:begin -->", "<!-- bench/run:end -->"
NAMES = {
    "direct": "direct (no proxy)",
    "palisade": "Palisade pair",
    "palisade-log": "Palisade pair, access log on",
    "nginx": "nginx pair",
    "haproxy": "HAProxy pair",
}
LOAD_LIMIT = 1.0
# A CPU taken away by the host for longer than this (bench/run's stall probe) marks the latency
# verdicts of a run as the host's rather than the proxies'.
STALL_LIMIT_MS = 2.0


def load_oha(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ms(v):
    return "—" if v is None else f"{v * 1000:.2f}"


# Buckets for the flat profile: first match wins, on the symbol or the [k] kernel marker.
BUCKETS = [
    ("policy evaluation (palisade::policy, regorus)", ("palisade::policy", "regorus")),
    ("TLS and crypto (rustls, aws-lc)", ("rustls", "aws_lc", "aws-lc", "sha256", "gcm", "aes", "chacha")),
    ("HTTP (hyper, h2, httparse, http)", ("hyper", "h2::", "httparse", "http::")),
    ("access log, metrics, tracing", ("serde_json", "prometheus", "tracing", "access")),
    # jemalloc's symbols (the sidecar's allocator since d7d0138) all start with `_rjem_`.
    ("memory allocation (malloc/free)", ("malloc", "free", "cfree", "realloc", "memcpy", "memmove", "_int_", "_rjem_")),
    ("async runtime (tokio)", ("tokio",)),
]


def profile_section(out):
    top = os.path.join(out, "profile.txt")
    allp = os.path.join(out, "profile-all.txt")
    if not os.path.exists(top) or os.path.getsize(top) == 0:
        return []
    lines = ["### Profile of the Palisade pair (5000 req/s, `perf record -F 999`)", ""]
    lines.append(
        "Flat self-time profile of both sidecars together (`dist` build, no frame pointers, "
        "so no inclusive call-graph figures); `[k]` = kernel. Buckets by symbol name:"
    )
    lines.append("")
    buckets = {name: 0.0 for name, _ in BUCKETS}
    kernel = other = 0.0
    with open(allp) as f:
        for line in f:
            parts = line.split()
            if not parts or not parts[0].endswith("%"):
                continue
            try:
                pctv = float(parts[0].rstrip("%"))
            except ValueError:
                continue
            sym = " ".join(parts[1:])
            if "[k]" in sym:
                kernel += pctv
                continue
            low = sym.lower()
            for name, keys in BUCKETS:
                if any(k in low for k in keys):
                    buckets[name] += pctv
                    break
            else:
                other += pctv
    lines.append("| bucket | share of samples |")
    lines.append("|---|---|")
    lines.append(f"| kernel (syscalls, TCP loopback, scheduler) | {kernel:.1f}% |")
    for name, _ in BUCKETS:
        lines.append(f"| {name} | {buckets[name]:.1f}% |")
    lines.append(f"| other user space | {other:.1f}% |")
    lines.append("")
    lines.append("Top entries (comm, object, symbol):")
    lines.append("")
    lines.append("```")
    with open(top) as f:
        for i, line in enumerate(f):
            if i >= 30:
                break
            lines.append(line.rstrip()[:160])
    lines.append("```")
    lines.append("")
    return lines


def main(out, doc):
    machine = {}
    with open(os.path.join(out, "machine.txt")) as f:
        for line in f:
            k, _, v = line.partition(": ")
            machine[k.strip()] = v.strip()
    clk = int(machine.get("clk_tck", "100"))
    topos = machine["topologies"].split()
    rates = machine["rates"].split()
    meas = {}
    with open(os.path.join(out, "measurements.tsv")) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            meas[(row["topology"], row["step"])] = row

    def res(topo, step):
        return load_oha(os.path.join(out, f"{topo}-{step}.json"))

    def pct(topo, step, p):
        r = res(topo, step)
        if not r:
            return None
        return r.get("latencyPercentiles", {}).get(p)

    def rps(topo, step):
        r = res(topo, step)
        return r["summary"]["requestsPerSec"] if r else None

    def ok_count(topo, step):
        r = res(topo, step)
        if not r:
            return 0, 0
        codes = r.get("statusCodeDistribution", {})
        ok = codes.get("200", 0)
        # Requests still in flight when `-z` ends are reported as errors; they are not failures.
        errs = {k: v for k, v in r.get("errorDistribution", {}).items() if "deadline" not in k}
        total = sum(codes.values()) + sum(errs.values())
        return ok, total

    def loadcell(topo, step):
        m = meas.get((topo, step))
        if not m:
            return "—"
        lb, la = float(m["load_before"]), float(m["load_after"])
        flag = " **loaded**" if max(lb, la) > LOAD_LIMIT else ""
        return f"{lb:.2f}→{la:.2f}{flag}"

    def cpu_per_k(topo, step, side):
        m = meas.get((topo, step))
        r = res(topo, step)
        if not m or not r or topo == "direct":
            return None
        ok, total = ok_count(topo, step)
        if total == 0:
            return None
        return int(m[f"{side}_ticks"]) / clk / total * 1000

    def mib(topo, step, side, field):
        m = meas.get((topo, step))
        if not m or topo == "direct":
            return None
        return int(m[f"{side}_{field}_kib"]) / 1024

    def ratio(a, b):
        if a is None or b is None or b == 0:
            return "—"
        if a < 0 or b < 0:
            return "n/a (≤ 0: noise)"
        return f"{a / b:.2f}×"

    def f2(v, fmt="{:.2f}"):
        return "—" if v is None else fmt.format(v)

    rounds = int(machine.get("rounds", "0"))
    first = f"rate{rates[0]}"

    def median(v):
        v = sorted(v)
        if not v:
            return None
        mid = len(v) // 2
        return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2

    def per_round(fn):
        """fn(r) for each round, dropping rounds where it has no value."""
        return [x for x in (fn(r) for r in range(1, rounds + 1)) if x is not None]

    def added_p99(t, r):
        p, d = pct(t, f"r{r}-{first}", "p99"), pct("direct", f"r{r}-{first}", "p99")
        return None if p is None or d is None else p - d

    def round_max(t, r):
        return rps(t, f"r{r}-max")

    def round_cpu(t, r):
        c, s = cpu_per_k(t, f"r{r}-max", "client"), cpu_per_k(t, f"r{r}-max", "server")
        return None if c is None or s is None else c + s

    def vs_nginx(fn, t):
        """fn(t, r) / fn("nginx", r) for each round where both have a value."""

        def one(r):
            a, b = fn(t, r), fn("nginx", r)
            return None if a is None or not b else a / b

        return per_round(one)

    def spread(v, fmt):
        if not v:
            return "—"
        return f"{fmt(median(v))} ({fmt(min(v))}–{fmt(max(v))})"

    lines = [BEGIN, "", "## Whole-system benchmark (`bench/run`)", ""]
    lines.append(
        f"Generated by `{machine.get('command', 'bench/run')}` on {machine['date']}; raw results in "
        f"`bench/results/{os.path.basename(out.rstrip('/'))}/` (not in git)."
    )
    lines.append("")
    lines.append(
        f"Machine: {machine['nproc']} CPUs, {machine['cpu']}, {machine['kernel']}. "
        f"Load average (1/5/15 min) at start: {' '.join(machine['load_start'].split()[:3])}; "
        f"at end: {' '.join(machine.get('load_end', '? ? ?').split()[:3])}. "
        f"Tools: {machine['oha']}, {machine['nginx']}, {machine['haproxy'].split(' - ')[0]}, "
        f"Palisade {machine['palisade']}."
    )
    lines.append("")
    if machine.get("palisade_bin"):
        lines.append(
            f"Palisade binary: {machine['palisade_bin']}; the commit above is the checkout that "
            "ran the script, not necessarily the source of that binary."
        )
        lines.append("")
    # Host stalls: bench/run's busy-loop probe per CPU at start and end ("cpu:longest_ms:gaps").
    probes = {}
    for when in ("start", "end"):
        for item in machine.get(f"stalls_{when}", "").split():
            cpu, longest, gaps = item.split(":")
            probes.setdefault(when, []).append((cpu, float(longest), int(gaps)))
    worst_stall = max((longest for p_ in probes.values() for _, longest, _ in p_), default=None)
    if probes:
        said = "; ".join(
            f"at {when} " + ", ".join(f"CPU {c} {l:.1f} ms ({g} over 0.5 ms)" for c, l, g in p_)
            for when, p_ in probes.items()
        )
        lines.append(
            f"Host stalls (a busy loop on every CPU for 5 s; the longest time the host took the CPU "
            f"away, and how often it took more than 0.5 ms): {said}."
        )
        lines.append("")
    noisy_host = worst_stall is not None and worst_stall > STALL_LIMIT_MS
    loaded = any(
        max(float(m["load_before"]), float(m["load_after"])) > LOAD_LIMIT for m in meas.values()
    )
    if loaded:
        lines.append(
            f"**Contaminated run:** the 1-minute load average exceeded {LOAD_LIMIT} during steps "
            "marked **loaded** below (other work was running on this 2-core machine). Those "
            "figures are not clean; compare rows against each other (same run), not against "
            "other machines, and rerun on a quiet machine before drawing absolute conclusions."
        )
        lines.append("")
    lines += [
        "Setup: client (oha) → proxy → proxy → backend, all on loopback; the backend is nginx "
        "`return 200` with a 1 KiB body. The client, backend and Palisade control plane are pinned "
        "to CPU 0 and both proxies of the pair under test to CPU 1 (`taskset`); each proxy runs "
        "one worker (nginx `worker_processes 1`, HAProxy `nbthread 1`, Palisade "
        "`--workers 1`). Proxy-to-proxy hops are mTLS, TLS 1.3 only, with keep-alive "
        "pooling (nginx `keepalive` upstream, HAProxy `http-reuse always`) and no session "
        "resumption. Palisade runs with authorization on (a 10-rule ALLOW policy selected by "
        "`app=orders`; the request matches only the last rule; a non-matching path is checked "
        "to get 403 before measuring) and `--access-log off` unless the row says otherwise "
        "(access log on = JSON lines to stdout redirected to a file).",
        "",
        f"Load: oha, {machine['conns']} connections, HTTP/1.1 keep-alive. Open-loop steps use "
        f"`-q RATE --latency-correction` for {machine['duration']} s (coordinated omission "
        "corrected); `max` is closed-loop for the same time; `conn/req` is closed-loop with "
        "`--disable-keepalive` (a new client→first-proxy TCP connection per request; the "
        "proxy↔proxy mTLS connections stay pooled, so this measures accept + request setup, "
        "not the mTLS handshake); `h2` is closed-loop HTTP/2 prior knowledge (h2c) from the "
        "client to the first proxy (`-c 4 -p 8`); nginx and HAProxy forward it as HTTP/1.1 "
        "(HTTP/1.1 over mTLS between them), Palisade carries HTTP/2 between its sidecars. "
        + ("In this run Palisade's server sidecar forwarded h2 to the app, so for that step it "
           "was restarted with the backend's h2c port as its app. "
           if machine.get("h2_app_restart") == "yes" else
           "In this run Palisade's server sidecar forwarded it to the app as HTTP/1.1. ")
        + "Latencies in ms. An *added* figure is the topology's percentile minus direct's; "
        "a negative one means the difference is below the noise of this machine.",
        "",
    ]

    for rate in rates:
        step = f"rate{rate}"
        lines.append(f"### Open loop, {rate} req/s")
        lines.append("")
        lines.append(
            "| topology | p50 | p90 | p99 | p99.9 | added p50 | added p99 | added p99.9 | added p99 vs nginx | achieved req/s | non-200 | load avg |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for t in topos:
            p = {q: pct(t, step, q) for q in ("p50", "p90", "p99", "p99.9")}
            d = {q: pct("direct", step, q) for q in ("p50", "p99", "p99.9")}
            add = {
                q: (p[q] - d[q]) if p[q] is not None and d[q] is not None else None
                for q in ("p50", "p99", "p99.9")
            }
            n99 = pct("nginx", step, "p99")
            nadd = (n99 - d["p99"]) if n99 is not None and d["p99"] is not None else None
            ok, total = ok_count(t, step)
            lines.append(
                f"| {NAMES.get(t, t)} | {ms(p['p50'])} | {ms(p['p90'])} | {ms(p['p99'])} | {ms(p['p99.9'])} | "
                + (
                    "— | — | — | — | "
                    if t == "direct"
                    else f"{ms(add['p50'])} | {ms(add['p99'])} | {ms(add['p99.9'])} | {ratio(add['p99'], nadd)} | "
                )
                + f"{f2(rps(t, step), '{:.0f}')} | {total - ok} | {loadcell(t, step)} |"
            )
        lines.append("")

    lines.append("### Throughput")
    lines.append("")
    lines.append(
        "| topology | max req/s (closed loop) | vs nginx | p99 at max | conn/req req/s | vs nginx | h2 req/s | vs nginx | non-200 (max/conn/h2) | load avg (max) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for t in topos:
        bad = []
        for s in ("max", "conn-per-request", "h2"):
            ok, total = ok_count(t, s)
            bad.append(str(total - ok) if res(t, s) else "—")
        lines.append(
            f"| {NAMES.get(t, t)} | {f2(rps(t, 'max'), '{:.0f}')} | {ratio(rps(t, 'max'), rps('nginx', 'max'))} | "
            f"{ms(pct(t, 'max', 'p99'))} | {f2(rps(t, 'conn-per-request'), '{:.0f}')} | "
            f"{ratio(rps(t, 'conn-per-request'), rps('nginx', 'conn-per-request'))} | "
            f"{f2(rps(t, 'h2'), '{:.0f}')} | {ratio(rps(t, 'h2'), rps('nginx', 'h2'))} | "
            f"{'/'.join(bad)} | {loadcell(t, 'max')} |"
        )
    lines.append("")

    lines.append("### Cost per proxy")
    lines.append("")
    lines.append(
        "CPU seconds per 1000 requests from utime+stime in `/proc/PID/stat` (process and its "
        "children, all threads) before and after the step; peak RSS is `VmHWM` (nginx: master + "
        "worker summed) read after the step, so the column at "
        f"{rates[0]} req/s is the peak up to and including that step (warm-up included), and "
        "*end* is the peak after the max and conn/req steps (before h2). client = the sidecar next to the caller, server = "
        "the one next to the backend."
    )
    lines.append("")
    lines.append(
        f"| topology | CPU s/1k req @{rates[0]} client | server | vs nginx (sum) | CPU s/1k req @max client | server | vs nginx (sum) | peak RSS MiB @{rates[0]} client | server | vs nginx (sum) | peak RSS MiB end client | server |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def sum2(a, b):
        return None if a is None or b is None else a + b

    for t in topos:
        if t == "direct":
            continue
        c1, s1 = cpu_per_k(t, first, "client"), cpu_per_k(t, first, "server")
        cm, sm = cpu_per_k(t, "max", "client"), cpu_per_k(t, "max", "server")
        n1 = sum2(cpu_per_k("nginx", first, "client"), cpu_per_k("nginx", first, "server"))
        nm = sum2(cpu_per_k("nginx", "max", "client"), cpu_per_k("nginx", "max", "server"))
        r1c, r1s = mib(t, first, "client", "hwm"), mib(t, first, "server", "hwm")
        rn = sum2(mib("nginx", first, "client", "hwm"), mib("nginx", first, "server", "hwm"))
        last = "conn-per-request"
        lines.append(
            f"| {NAMES.get(t, t)} | {f2(c1, '{:.3f}')} | {f2(s1, '{:.3f}')} | {ratio(sum2(c1, s1), n1)} | "
            f"{f2(cm, '{:.3f}')} | {f2(sm, '{:.3f}')} | {ratio(sum2(cm, sm), nm)} | "
            f"{f2(r1c, '{:.1f}')} | {f2(r1s, '{:.1f}')} | {ratio(sum2(r1c, r1s), rn)} | "
            f"{f2(mib(t, last, 'client', 'hwm'), '{:.1f}')} | {f2(mib(t, last, 'server', 'hwm'), '{:.1f}')} |"
        )
    lines.append("")

    if rounds > 0:
        rt = [t for t in ("direct", "palisade", "nginx", "haproxy") if t in topos]
        lines.append(f"### Repeated rounds ({rounds} interleaved; the goals are judged on these)")
        lines.append("")
        lines.append(
            f"One pass gives one sample per topology, and on a noisy VM a topology's maximum can "
            f"move by 20 % or more between identical passes. So after the pass above the script "
            f"runs {rounds} rounds; each starts every "
            f"topology in turn (the order rotates per round), runs {rates[0]} req/s open loop and "
            f"the closed-loop max for {machine.get('round_duration', '?')} s each, and stops it. "
            "Cells are the median over the rounds with the range in brackets; ratios against nginx "
            "are per round (same minute), then the median."
        )
        lines.append("")
        lines.append(
            f"| topology | max req/s | max vs nginx | CPU s/1k req @max (client+server) | vs nginx | p99 @{rates[0]} | added p99 @{rates[0]} | p99.9 @{rates[0]} |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        f0 = lambda v: f"{v:.0f}"
        fx = lambda v: f"{v:.2f}×"
        fm = lambda v: f"{v * 1000:.2f}"
        f3 = lambda v: f"{v:.3f}"
        for t in rt:
            maxes = per_round(lambda r: round_max(t, r))
            ratios = vs_nginx(round_max, t)
            cpus = per_round(lambda r: round_cpu(t, r))
            cpu_ratios = vs_nginx(round_cpu, t)
            p99s = per_round(lambda r: pct(t, f"r{r}-{first}", "p99"))
            p999s = per_round(lambda r: pct(t, f"r{r}-{first}", "p99.9"))
            adds = per_round(lambda r: added_p99(t, r))
            lines.append(
                f"| {NAMES.get(t, t)} | {spread(maxes, f0)} | {'—' if t == 'direct' else spread(ratios, fx)} | "
                f"{'—' if t == 'direct' else spread(cpus, f3)} | {'—' if t == 'direct' else spread(cpu_ratios, fx)} | "
                f"{spread(p99s, fm)} | {'—' if t == 'direct' else spread(adds, fm)} | {spread(p999s, fm)} |"
            )
        lines.append("")

    # Goals of issue 8.
    lines.append("### Goals of issue 8")
    lines.append("")
    if rounds > 0 and "palisade" in topos and "nginx" in topos and "direct" in topos:
        both = [(added_p99("palisade", r), added_p99("nginx", r)) for r in range(1, rounds + 1)]
        pairs = [(p_, n_) for p_, n_ in both if p_ is not None and n_ is not None]
        if pairs:
            mp, mn = median([p_ for p_, _ in pairs]), median([n_ for _, n_ in pairs])
            wins = sum(1 for p_, n_ in pairs if p_ <= n_)
            verdict = "met" if mp <= mn else f"**missed** by {(mp - mn) * 1000:.2f} ms"
            lines.append(
                f"- Added p99 at {rates[0]} req/s ≤ nginx pair's (median of {len(pairs)} rounds): "
                f"Palisade {mp * 1000:.2f} ms, nginx {mn * 1000:.2f} ms — {verdict}; Palisade's was "
                f"≤ nginx's in {wins} of {len(pairs)} rounds."
            )
        ratios = vs_nginx(round_max, "palisade")
        if ratios:
            mr = median(ratios)
            wins = sum(1 for x in ratios if x >= 1)
            verdict = "met" if mr >= 1 else f"**missed** by {(1 - mr) * 100:.0f}%"
            lines.append(
                f"- Max throughput ≥ nginx pair's (median of per-round ratios, {len(ratios)} rounds): "
                f"{mr:.2f}× — {verdict}; Palisade was ahead in {wins} of {len(ratios)} rounds "
                f"(medians: Palisade {median(per_round(lambda r: round_max('palisade', r))):.0f} req/s, "
                f"nginx {median(per_round(lambda r: round_max('nginx', r))):.0f} req/s)."
            )
        lines.append("- The single pass above, for comparison (one sample each):")
    if "palisade" in topos and "nginx" in topos:
        ind = "  " if rounds > 0 and "direct" in topos else ""
        d99 = pct("direct", first, "p99")
        pa = pct("palisade", first, "p99")
        na = pct("nginx", first, "p99")
        add_p = pa - d99 if pa is not None and d99 is not None else None
        add_n = na - d99 if na is not None and d99 is not None else None
        if add_p is not None and add_n is not None:
            verdict = "met" if add_p <= add_n else f"**missed** by {(add_p - add_n) * 1000:.2f} ms (nginx's added p99 is ≤ 0, i.e. within the noise of the direct baseline on this loaded machine)" if add_n <= 0 else f"**missed** by {(add_p - add_n) * 1000:.2f} ms ({add_p / add_n:.2f}× nginx's)" if add_n > 0 else f"**missed** by {(add_p - add_n) * 1000:.2f} ms"
            lines.append(
                f"{ind}- Added p99 at {rates[0]} req/s ≤ nginx pair's: Palisade {add_p * 1000:.2f} ms, nginx {add_n * 1000:.2f} ms — {verdict}."
            )
        if pa is not None and na is not None:
            lines.append(
                f"{ind}  Raw p99 at {rates[0]} req/s (same run): Palisade {pa * 1000:.2f} ms, nginx "
                f"{na * 1000:.2f} ms ({pa / na:.2f}×); p99.9: Palisade "
                f"{ms(pct('palisade', first, 'p99.9'))} ms, nginx {ms(pct('nginx', first, 'p99.9'))} ms."
            )
        pm, nm = rps("palisade", "max"), rps("nginx", "max")
        if pm and nm:
            verdict = "met" if pm >= nm else f"**missed** by {nm - pm:.0f} req/s ({(1 - pm / nm) * 100:.0f}% below)"
            lines.append(
                f"{ind}- Max throughput ≥ nginx pair's: Palisade {pm:.0f} req/s, nginx {nm:.0f} req/s — {verdict}."
            )
        rc, rs = mib("palisade", first, "client", "hwm"), mib("palisade", first, "server", "hwm")
        if rc is not None and rs is not None:
            worst = max(rc, rs)
            verdict = "met" if worst < 20 else f"**missed** by {worst - 20:.1f} MiB"
            lines.append(
                f"- Sidecar peak RSS < 20 MiB at {rates[0]} req/s: client {rc:.1f} MiB, server {rs:.1f} MiB — {verdict}."
            )
        if loaded:
            lines.append(
                "- These verdicts come from a run on a loaded machine (see above); the ratios are "
                "from the same run, but treat small gaps as noise."
            )
        if noisy_host:
            lines.append(
                f"- **Noisy host:** the probe saw a CPU taken away for {worst_stall:.1f} ms (more than "
                f"{STALL_LIMIT_MS} ms). Such stalls land in every proxy pair's latency tail and not in "
                "the direct baseline's; the p99 verdicts of this run say more about the host than "
                "about the proxies."
            )
    else:
        lines.append("- (Palisade or nginx topology not in this run.)")
    lines.append("")
    lines += profile_section(out)
    profile = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile.md")
    if os.path.exists(profile):
        with open(profile) as f:
            lines.append(f.read().rstrip())
        lines.append("")
    lines.append(END)
    section = "\n".join(lines)

    try:
        with open(doc) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with open(doc, "w") as f:
        f.write(text)
    with open(os.path.join(out, "section.md"), "w") as f:
        f.write(section + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
