#!/usr/bin/env python3
"""Flood measurement for lb-proxy (tests/flood/run.sh runs it; see tests/flood/README.md).

A normal sipp caller places calls at a modest rate through the proxy to two sipp MRCP-like
servers while the proxy is flooded, and this reports how many of the normal calls succeeded,
with the proxy's CPU and memory. One phase per line of the report, each on a fresh proxy:

  baseline        the normal calls alone
  garbage         + a UDP flood of garbage from another address (random bytes, truncated
                    INVITEs, INVITEs with a bad CSeq that must be answered 400)
  invite          + an INVITE flood from one address (sipp, uac_200_or_503.xml), default limits
  invite-limited  the same with limits.perSource {rate: 100, window: 1s, burst: 200}
  refused         no normal calls: an INVITE flood against zero capacity, every INVITE refused
                    with 503; VmRSS before and after

Addresses (FLOOD_BASE, default 127.0.1.50): proxy base+0, servers +1 and +2, normal caller +3,
garbage sender +4, INVITE flooder +5. Every process started here is stopped by its PID.
Environment: LB_PROXY (binary, default target/release/lb-proxy), FLOOD_SECS (20),
FLOOD_NORMAL_RATE (50), FLOOD_GARBAGE_RATE (100000 datagrams/s), FLOOD_INVITE_RATE (5000
INVITEs/s asked of sipp), FLOOD_PHASES (comma list), FLOOD_WORKDIR (target/flood-run),
FLOOD_PIN (a CPU list: the proxy and the flooders share it, so the flood starves the proxy).
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIPP_DIR = ROOT / "tests" / "sipp"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def env_int(name, default):
    return int(os.environ.get(name, default))


def ips():
    base = os.environ.get("FLOOD_BASE", "127.0.1.50")
    a, b, c, d = (int(x) for x in base.split("."))
    return [f"{a}.{b}.{c}.{d + k}" for k in range(6)]


# ---- the garbage sender (a child process of its own) ----------------------------------------


def garbage_main(src, dst, rate, secs):
    """Sends garbage datagrams from src to dst (ip:port) at `rate` a second for `secs`; prints
    how many it sent."""
    host, port = dst.rsplit(":", 1)
    dst = (host, int(port))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.setblocking(False)
    me = f"{src}:{s.getsockname()[1]}"
    rnd = random.Random(7)
    pool = []
    for i in range(64):
        pool.append(bytes([0xFF]) + rnd.randbytes(rnd.randint(100, 1400)))
        invite = (
            f"INVITE sip:service@{host}:{dst[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {me};branch=z9hG4bK-g{i}\r\n"
            f"From: <sip:g@{me}>;tag=g{i}\r\nTo: <sip:service@{host}>\r\n"
            f"Call-ID: garbage-{i}@{src}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        pool.append(invite[: invite.index("CSeq") + 3].encode())  # truncated: dropped
        pool.append(invite.replace("CSeq: 1 INVITE", "CSeq: x INVITE").encode())  # 400
    sent = dropped = 0
    start = time.monotonic()
    end = start + secs
    batch = max(1, rate // 1000)
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) * rate)
        while sent + dropped < due:
            for _ in range(batch):
                try:
                    s.sendto(pool[(sent + dropped) % len(pool)], dst)
                    sent += 1
                except BlockingIOError:
                    dropped += 1
                # Answers (400s) are not read: the kernel drops them when the buffer fills.
        time.sleep(0.0005)
    print(json.dumps({"sent": sent, "not_sent": dropped, "secs": time.monotonic() - start}))


# ---- processes --------------------------------------------------------------------------------


class Procs:
    """Every process started, stopped by PID at the end."""

    def __init__(self):
        self.procs = []

    def start(self, name, args, cwd, **kw):
        cwd.mkdir(parents=True, exist_ok=True)
        out = open(cwd / f"{name}.out", "w")
        p = subprocess.Popen(
            args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kw
        )
        self.procs.append((name, p))
        return p

    def stop(self, p, sig=signal.SIGTERM, wait=5.0):
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs = []


def proc_stat(pid):
    """(utime + stime in seconds, VmRSS KiB, VmHWM KiB) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return cpu, rss, hwm


def udp_drops(addr):
    """Datagrams the kernel dropped because the UDP socket bound to addr was full (ss -uam)."""
    try:
        out = subprocess.run(
            ["ss", "-uamn", f"src {addr}"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.findall(r"skmem:\([^)]*\bd(\d+)\)", out)
    return sum(int(x) for x in found) if found else None


def http_json(url):
    with urllib.request.urlopen(url, timeout=3) as r:
        return json.loads(r.read())


def metrics(admin):
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=3) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def sipp_row(path):
    """The last row of a sipp -trace_stat / -trace_counts CSV, as a dict."""
    try:
        lines = [l for l in Path(path).read_text(errors="replace").splitlines() if l.strip()]
    except FileNotFoundError:
        return {}
    if len(lines) < 2:
        return {}
    return dict(zip(lines[0].split(";"), lines[-1].split(";")))


def sipp_counts(d):
    files = list(Path(d).glob("*_counts.csv"))
    return sipp_row(files[0]) if files else {}


# ---- one phase --------------------------------------------------------------------------------


def config(p, s1, s2, capacity, limits):
    return f"""listeners:
  - udp:{p}:5060
  - tcp:{p}:5060
admin:
  listen: {p}:8081
routing:
  group: 1
  resources: [pstn]
  mode: absolute
  retryAfter: 5s
probing:
  interval: 2s
{limits}destinations:
  - {{id: 1, group: 1, uri: "sip:{s1}:5080", resources: pstn={capacity}}}
  - {{id: 2, group: 1, uri: "sip:{s2}:5080", resources: pstn={capacity}}}
"""


def run_phase(name, work, proxy_bin):
    secs = env_int("FLOOD_SECS", 20)
    normal_rate = env_int("FLOOD_NORMAL_RATE", 50)
    garbage_rate = env_int("FLOOD_GARBAGE_RATE", 100000)
    invite_rate = env_int("FLOOD_INVITE_RATE", 5000)
    p, s1, s2, caller, garbage_ip, flooder = ips()
    # FLOOD_PIN=0: the proxy and the flooders share that CPU list (taskset), a proxy that the
    # attack traffic starves of CPU.
    pin = ["taskset", "-c", os.environ["FLOOD_PIN"]] if os.environ.get("FLOOD_PIN") else []
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    limits = ""
    capacity = 500
    if name == "invite-limited":
        limits = "limits:\n  perSource: {rate: 100, window: 1s, burst: 200}\n"
    if name == "refused":
        capacity = 0
    (d / "config.yaml").write_text(config(p, s1, s2, capacity, limits))
    procs = Procs()
    admin = f"{p}:8081"
    result = {"phase": name}
    try:
        proxy = procs.start(
            "proxy",
            pin + [str(proxy_bin), "--config", "config.yaml", "--log-level", "info"],
            d,
            env={**os.environ, "NO_COLOR": "1"},
        )
        for i, s in enumerate((s1, s2)):
            procs.start(
                f"server{i + 1}",
                ["sipp", "-sf", str(SIPP_DIR / "uas.xml"), "-i", s, "-p", "5080", "-nostdin",
                 "-ci", s, "-cp", "8890", "-mp", "21000", "-trace_err",
                 "-error_file", str(d / f"server{i + 1}-errors.log")],
                d / f"server{i + 1}",
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                ds = http_json(f"http://{admin}/v1/destinations")["destinations"]
                if len(ds) == 2 and all(x["state"] == "up" for x in ds):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proxy.poll() is not None:
                raise RuntimeError(f"{name}: proxy or destinations not up; see {d}/proxy.out")
            time.sleep(0.2)
        time.sleep(0.5)
        m0 = metrics(admin)
        cpu0, rss0, _ = proc_stat(proxy.pid)
        t0 = time.monotonic()
        normal = None
        if name != "refused":
            normal = procs.start(
                "normal",
                ["sipp", "-sf", str(SIPP_DIR / "uac.xml"), "-i", caller, "-p", "5070", "-nostdin",
                 "-ci", caller, "-cp", "8890", "-mp", "21000", "-r", str(normal_rate),
                 "-m", str(normal_rate * secs), "-d", "1000", "-l", "100000",
                 "-timeout", f"{secs + 60}s", "-trace_stat", "-stf", "stat.csv", "-fd", "1",
                 "-trace_err", "-error_file", "errors.log", f"{p}:5060"],
                d / "normal",
            )
        flood = garbage = None
        if name == "garbage":
            garbage = procs.start(
                "garbage",
                pin + [sys.executable, __file__, "garbage", garbage_ip, f"{p}:5060",
                 str(garbage_rate), str(secs)],
                d / "garbage",
            )
        if name in ("invite", "invite-limited", "refused"):
            scen = "uac_expect_503.xml" if name == "refused" else "uac_200_or_503.xml"
            flood = procs.start(
                "flood",
                pin + ["sipp", "-sf", str(SIPP_DIR / scen), "-i", flooder, "-p", "5070", "-nostdin",
                 "-ci", flooder, "-cp", "8890", "-mp", "21000", "-r", str(invite_rate),
                 "-d", "1000", "-l", "100000", "-trace_counts", "-trace_stat", "-stf",
                 "stat.csv", "-fd", "1", "-trace_err", "-error_file", "errors.log",
                 f"{p}:5060"],
                d / "flood",
            )
        peak_hwm = peak_queue = 0
        while time.monotonic() - t0 < secs:
            time.sleep(0.5)
            peak_hwm = max(peak_hwm, proc_stat(proxy.pid)[2])
            try:
                q = metrics(admin).get("mrcp_lb_event_queue_depth", 0)
                peak_queue = max(peak_queue, int(q))
            except OSError:
                pass
        # CPU and memory over the flood window exactly; the flooders stop right after.
        cpu1, rss1, _ = proc_stat(proxy.pid)
        wall = time.monotonic() - t0
        if flood is not None:
            procs.stop(flood, signal.SIGUSR1, wait=15)
        if garbage is not None:
            garbage.wait(10)
        if normal is not None:
            try:
                normal.wait(secs + 90)
            except subprocess.TimeoutExpired:
                procs.stop(normal)
        m1 = metrics(admin)
        _, _, hwm_end = proc_stat(proxy.pid)
        drops = udp_drops(f"{p}:5060")

        def delta(k):
            return int(m1.get(k, 0) - m0.get(k, 0))

        result.update(
            secs=round(wall, 1),
            cpu_pct=round(100 * (cpu1 - cpu0) / wall, 1),
            rss_before_mib=round(rss0 / 1024, 1),
            rss_after_mib=round(rss1 / 1024, 1),
            hwm_mib=round(max(hwm_end, peak_hwm) / 1024, 1),
            malformed=delta("mrcp_lb_sip_messages_malformed_total"),
            limited_rate=delta('mrcp_lb_requests_limited_total{reason="source_rate"}'),
            no_capacity=delta("mrcp_lb_rejected_no_capacity_total"),
            routed=delta("mrcp_lb_calls_routed_total"),
            udp_drops=drops if drops is not None else "?",
            queue_peak=peak_queue,
        )
        if normal is not None:
            st = sipp_row(d / "normal" / "stat.csv")
            ok = int(st.get("SuccessfulCall(C)", 0))
            failed = int(st.get("FailedCall(C)", 0))
            result.update(
                normal_calls=ok + failed,
                normal_ok=ok,
                normal_pct=round(100 * ok / max(1, ok + failed), 2),
                normal_retrans=int(st.get("Retransmissions(C)", 0)),
            )
        if garbage is not None:
            g = json.loads((d / "garbage" / "garbage.out").read_text().strip().splitlines()[-1])
            result.update(flood_sent=g["sent"], flood_rate=round(g["sent"] / g["secs"]))
        if flood is not None:
            st = sipp_row(d / "flood" / "stat.csv")
            created = int(st.get("TotalCallCreated", 0))
            counts = sipp_counts(d / "flood")
            got503 = sum(int(v) for k, v in counts.items() if k.endswith("_503_Recv"))
            result.update(
                flood_sent=created,
                flood_rate=round(created / secs),
                flood_503=got503,
            )
    finally:
        procs.stop_all()
    return result


def report(rows):
    out = [
        "| phase | flood sent (rate/s) | normal calls ok | normal retransmissions | proxy CPU % of a core | VmRSS MiB: before → end of flood (peak) | malformed | 503 rate limit | 503 no capacity | UDP drops (socket full) | core queue peak |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flood = "—"
        if "flood_sent" in r:
            flood = f"{r['flood_sent']} ({r['flood_rate']}/s)"
        normal = "—"
        if "normal_calls" in r:
            normal = f"{r['normal_ok']}/{r['normal_calls']} ({r['normal_pct']} %)"
        retrans = r.get("normal_retrans", "—")
        out.append(
            f"| {r['phase']} | {flood} | {normal} | {retrans} | {r['cpu_pct']} | "
            f"{r['rss_before_mib']} → {r['rss_after_mib']} ({r['hwm_mib']}) | {r['malformed']} | "
            f"{r['limited_rate']} | {r['no_capacity']} | {r['udp_drops']} | {r['queue_peak']} |"
        )
    return "\n".join(out)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "garbage":
        garbage_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
        return
    proxy_bin = Path(os.environ.get("LB_PROXY", ROOT / "target" / "release" / "lb-proxy")).resolve()
    work = Path(os.environ.get("FLOOD_WORKDIR", ROOT / "target" / "flood-run"))
    work.mkdir(parents=True, exist_ok=True)
    phases = os.environ.get(
        "FLOOD_PHASES", "baseline,garbage,invite,invite-limited,refused"
    ).split(",")
    rows = []
    for ph in phases:
        print(f"[flood] phase {ph} ...", flush=True)
        r = run_phase(ph, work, proxy_bin)
        print(f"[flood] {json.dumps(r)}", flush=True)
        rows.append(r)
    load = open("/proc/loadavg").read().split()[:3]
    text = report(rows)
    print()
    print(text)
    print(f"\nload average after the run: {' '.join(load)}; binary {proxy_bin}")
    (work / "report.md").write_text(text + "\n")
    (work / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
