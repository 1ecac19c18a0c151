#!/usr/bin/env python3
"""Benchmark harness of mrcp-lb (issue 6): lb-proxy and Kamailio 5.6 doing the same job,
measured with the same sipp traffic on loopback (127.0.8.x only). Start it with bench/run.sh,
which installs what is missing and builds the release binary first.

Every process this script starts is recorded (PID and name) in WORKDIR/pids and stopped by
its PID, on success, on error and on SIGINT/SIGTERM; run.sh's EXIT trap stops whatever a
killed interpreter left behind. Timing never fails the run: the exit status is 0 unless
something is broken (a proxy does not start, Kamailio misroutes, calls fail at the lowest
rate).

Knobs (environment):
  BENCH_TRANSPORTS   udp,tcp
  BENCH_PHASES       verify,rate,fixed,memory,micro   (verify always runs)
  BENCH_TARGETS      lb-proxy,kamailio   (the proxies measured; "lb-proxy" alone is quicker)
  BENCH_LB_BIN       the lb-proxy binary (default: CARGO_TARGET_DIR or target/, release/lb-proxy)
  BENCH_LB_CFG       lb-proxy's configuration (default bench/lb-proxy.yaml; bench/lb-proxy-sdp.yaml
                     routes by the SDP offer's MRCP channels instead of a fixed list)
  BENCH_RATES        calls/s steps of the rate search (default below)
  BENCH_STEP_SECS    seconds per step (5)
  BENCH_RATE_BUDGET  seconds the rate search may take per transport (300)
  BENCH_FIXED_RATE   calls/s of the CPU/latency runs (0: half the lower maximum of the
                     transport, rounded down to 100, between 100 and 1000)
  BENCH_FIXED_SECS   seconds per CPU/latency run (15); BENCH_FIXED_ROUNDS (2) runs each
  BENCH_MEM_DIALOGS  10000,50000,100000; BENCH_MEM_RATE calls/s of the ramp (1500)
  BENCH_MEM_SETTLE   seconds between reaching a dialog count and sampling memory (3)
  BENCH_LB_LOG_LEVEL lb-proxy --log-level (default: none, i.e. lb-proxy's default, info)
  BENCH_OUT          report file (BENCHMARKS.md in the repository root)
  BENCH_WORKDIR      logs, statistics and captures (target/bench-run)
  BENCH_MICRO_DIR    workspace copy to run the criterion bench in (default: this one)

`python3 bench/bench.py --report` writes the report again from the last run's results.
"""

import datetime
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

CLIENT_IP = "127.0.8.1"
LB_IP = "127.0.8.2"
KAM_IP = "127.0.8.3"
PROXY_PORT = 5060
LB_ADMIN = f"http://{LB_IP}:8081"
# Each target has its own pair of servers; "direct" (no proxy) has one.
SERVERS = {
    "lb-proxy": ("127.0.8.11", "127.0.8.12"),
    "kamailio": ("127.0.8.13", "127.0.8.14"),
    "direct": ("127.0.8.15",),
}
SERVER_PORT = {"udp": 5080, "tcp": 5081}
SIPP_T = {"udp": "u1", "tcp": "t1"}
# BENCH_TARGETS: the proxies measured (e.g. "lb-proxy" alone for a quicker memory run).
PROXIES = [p.strip() for p in (os.environ.get("BENCH_TARGETS", "").strip()
                               or "lb-proxy,kamailio").split(",") if p.strip()]

# The binary cargo built: under CARGO_TARGET_DIR when that is set (as run.sh's build did);
# BENCH_LB_BIN names another one (e.g. a copy of the build before a change, for an A/B).
LB_BIN = Path(os.environ.get("BENCH_LB_BIN", "").strip() or (
    Path(os.environ.get("CARGO_TARGET_DIR", "").strip() or str(ROOT / "target"))
    / "release" / "lb-proxy"))
LB_CFG = Path(os.environ.get("BENCH_LB_CFG", "").strip() or (BENCH / "lb-proxy.yaml"))
KAM_CFG = BENCH / "kamailio" / "kamailio.cfg"
KAM_LIST = BENCH / "kamailio" / "dispatcher.list"
UAC = BENCH / "sipp" / "uac.xml"
UAS = BENCH / "sipp" / "uas.xml"

DEFAULT_RATES = "250,500,750,1000,1250,1500,2000,2500,3000,4000,5000,6000,8000,10000,12000"


def env_str(name, default):
    v = os.environ.get(name, "").strip()
    return v if v else default


def env_num(name, default):
    v = os.environ.get(name, "").strip()
    return float(v) if v else default


def env_list(name, default):
    return [x.strip() for x in env_str(name, default).split(",") if x.strip()]


TRANSPORTS = env_list("BENCH_TRANSPORTS", "udp,tcp")
PHASES = set(env_list("BENCH_PHASES", "verify,rate,fixed,memory,micro")) | {"verify"}
RATES = [int(x) for x in env_list("BENCH_RATES", DEFAULT_RATES)]
STEP_SECS = env_num("BENCH_STEP_SECS", 5)
RATE_BUDGET = env_num("BENCH_RATE_BUDGET", 300)
FIXED_RATE = int(env_num("BENCH_FIXED_RATE", 0))
FIXED_SECS = env_num("BENCH_FIXED_SECS", 15)
FIXED_ROUNDS = int(env_num("BENCH_FIXED_ROUNDS", 2))
MEM_DIALOGS = [int(x) for x in env_list("BENCH_MEM_DIALOGS", "10000,50000,100000")]
MEM_RATE = int(env_num("BENCH_MEM_RATE", 1500))
MEM_SETTLE = env_num("BENCH_MEM_SETTLE", 3)
LB_LOG_LEVEL = os.environ.get("BENCH_LB_LOG_LEVEL", "").strip()
OUT = Path(env_str("BENCH_OUT", str(ROOT / "BENCHMARKS.md")))
WORK = Path(env_str("BENCH_WORKDIR", str(ROOT / "target" / "bench-run")))
CALL_MS = 100  # pause between ACK and BYE in the rate and CPU runs

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Broken(Exception):
    """Something is wrong with the setup (not a slow proxy): the run exits non-zero."""


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Processes


class Procs:
    """Every child, recorded by PID in WORKDIR/pids while it runs and stopped by PID. Each line
    of the file is `PID<TAB>marker`, the marker being an argument only this bench passes
    (a 127.0.8.x address or a bench/ path), so that run.sh's trap never hits a reused PID."""

    def __init__(self, pidfile):
        self.pidfile = pidfile
        self.live = []  # (name, Popen)
        self.commands = []  # (name, argv) in start order
        self._write()

    def _write(self):
        tmp = self.pidfile.with_suffix(".tmp")
        tmp.write_text("".join(f"{p.pid}\t{p.marker}\n" for _, p in self.live))
        tmp.replace(self.pidfile)

    def spawn(self, name, argv, logfile, cwd=None):
        self.commands.append((name, [str(a) for a in argv]))
        with open(WORK / "commands.log", "a") as f:
            f.write(f"{name}: {' '.join(str(a) for a in argv)}\n")
        out = open(logfile, "ab")
        p = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
        out.close()
        p.marker = next((str(a) for a in argv if "127.0.8." in str(a) or "/bench/" in str(a)),
                        str(argv[0]))
        self.live.append((name, p))
        self._write()
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=8):
        """Stops one child by its PID (and a Kamailio's forked children by theirs)."""
        kids = descendants(p.pid)
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
                if sig == signal.SIGTERM:
                    # lb-proxy drains open calls for up to 30 s on SIGTERM and stops at once on
                    # a second one; Kamailio stops on the first.
                    try:
                        p.wait(2)
                    except subprocess.TimeoutExpired:
                        os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        # Kamailio's main process takes its children down; make sure (by their PIDs).
        deadline = time.time() + 5
        for k in kids:
            while alive(k) and time.time() < deadline:
                time.sleep(0.05)
            if alive(k):
                try:
                    os.kill(k, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.live = [(n, q) for (n, q) in self.live if q is not p]
        self._write()

    def stop_all(self):
        for name, p in reversed(list(self.live)):
            self.stop(p, signal.SIGKILL if name.startswith("sipp-client") else signal.SIGTERM)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def descendants(pid):
    """PIDs of every process below `pid` (a Kamailio main process forks its workers)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cpu_seconds(pids):
    """utime + stime of each process (all its threads), summed."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def memory_kib(pids):
    """(VmRSS summed, Pss summed) in KiB over the processes."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M)
            rss += int(m.group(1)) if m else 0
            with open(f"/proc/{pid}/smaps_rollup") as f:
                m = re.search(r"^Pss:\s+(\d+)", f.read(), re.M)
            pss += int(m.group(1)) if m else 0
        except OSError:
            pass
    return rss, pss


ROLES = {f"{LB_IP}:{PROXY_PORT}": "lb-proxy", f"{KAM_IP}:{PROXY_PORT}": "kamailio"}
ROLES.update({f"{ip}:{SERVER_PORT['udp']}": f"server {ip}" for ips in SERVERS.values() for ip in ips})


def udp_drops():
    """Datagrams dropped (receive buffer full) per UDP socket on 127.0.8.x, from `ss -uanm`."""
    try:
        text = subprocess.run(["ss", "-uanmH"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out, local = {}, None
    for line in text.splitlines():
        if line[:1] not in (" ", "\t"):
            parts = line.split()
            local = parts[3] if len(parts) > 3 else None
            continue
        m = re.search(r"\bd(\d+)\)", line)
        if m and local and local.startswith("127.0.8."):
            out[local] = out.get(local, 0) + int(m.group(1))
    return out


def role(addr):
    if addr in ROLES:
        return ROLES[addr]
    return "client" if addr.startswith(CLIENT_IP + ":") else addr


# ---------------------------------------------------------------------------------------------
# sipp


class Sipp:
    """sipp processes: unique control/media ports, statistics files in WORKDIR."""

    def __init__(self, procs):
        self.procs = procs
        self.n = 0

    def _ports(self):
        self.n += 1
        return 8800 + self.n, 20000 + 10 * self.n

    def server(self, ip, transport, tag):
        cp, mp = self._ports()
        d = WORK / "sipp" / f"{tag}-{ip}-{transport}-{self.n}"
        d.mkdir(parents=True, exist_ok=True)
        argv = [
            "sipp", "-sf", UAS, "-t", SIPP_T[transport], "-i", ip, "-p", SERVER_PORT[transport],
            "-nostdin", "-ci", ip, "-cp", cp, "-mp", mp, "-buff_size", 4194304,
            "-max_socket", 16000, "-trace_err", "-error_file", d / "errors.log",
            "-trace_stat", "-stf", d / "stat.csv", "-fd", 1,
        ]
        p = self.procs.spawn(f"sipp-server {ip} {transport}", argv, d / "out.log", cwd=d)
        p.statfile = d / "stat.csv"
        return p

    def client(self, target_ip, target_port, transport, tag, rate, calls, call_ms, port=5070,
               limit=None, timeout=None):
        cp, mp = self._ports()
        d = WORK / "sipp" / f"{tag}-{self.n}"
        d.mkdir(parents=True, exist_ok=True)
        if limit is None:
            limit = max(2000, rate * 10)
        if timeout is None:
            timeout = int(calls / rate + call_ms / 1000 + 40)
        argv = [
            "sipp", "-sf", UAC, "-t", SIPP_T[transport], "-i", CLIENT_IP, "-p", port,
            "-nostdin", "-ci", CLIENT_IP, "-cp", cp, "-mp", mp, "-buff_size", 4194304,
            "-max_socket", 16000, "-trace_err", "-error_file", d / "errors.log",
            "-trace_stat", "-stf", d / "stat.csv", "-fd", 1,
            "-r", rate, "-rp", 1000, "-m", calls, "-l", limit, "-d", call_ms,
            "-recv_timeout", 10000, "-timeout", f"{timeout}s", "-timeout_error",
            f"{target_ip}:{target_port}",
        ]
        p = self.procs.spawn(f"sipp-client {tag}", argv, d / "out.log", cwd=d)
        p.statfile = d / "stat.csv"
        p.deadline = time.time() + timeout + 15
        return p


def last_stats(statfile):
    """The last line of a sipp statistics file, as {column: value}."""
    try:
        lines = [ln for ln in Path(statfile).read_text(errors="replace").splitlines() if ln]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    head = lines[0].split(";")
    return dict(zip(head, lines[-1].split(";")))


def stat_int(stats, key):
    try:
        return int(stats.get(key, "0") or 0)
    except ValueError:
        return 0


def server_totals(servers):
    t = {"calls": 0, "retrans": 0, "failed": 0}
    for s in servers:
        st = last_stats(s.statfile)
        t["calls"] += stat_int(st, "IncomingCall(C)")
        t["retrans"] += stat_int(st, "Retransmissions(C)")
        t["failed"] += stat_int(st, "FailedCall(C)")
    return t


# ---------------------------------------------------------------------------------------------
# SIP readiness ping


def sip_options(ip, port, timeout=0.5):
    """One UDP OPTIONS to a proxy; True when it answers 200."""
    branch = f"z9hG4bK-bench-{time.time_ns()}"
    msg = (
        f"OPTIONS sip:{ip}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {CLIENT_IP}:5069;branch={branch};rport\r\n"
        f"From: <sip:bench@{CLIENT_IP}>;tag=b{time.time_ns()}\r\n"
        f"To: <sip:{ip}:{port}>\r\n"
        f"Call-ID: bench-ping-{time.time_ns()}@{CLIENT_IP}\r\n"
        "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((CLIENT_IP, 0))
        s.settimeout(timeout)
        s.sendto(msg, (ip, port))
        data, _ = s.recvfrom(65535)
        return data.startswith(b"SIP/2.0 200")
    except OSError:
        return False
    finally:
        s.close()


def http_json(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------------------------------
# The proxies


class Proxy:
    def __init__(self, name, procs):
        self.name = name
        self.procs = procs
        self.p = None
        self.ip = LB_IP if name == "lb-proxy" else KAM_IP
        self.starts = 0

    def start(self):
        self.starts += 1
        d = WORK / "proxies"
        d.mkdir(parents=True, exist_ok=True)
        logfile = d / f"{self.name}-{self.starts}.log"
        if self.name == "lb-proxy":
            argv = [LB_BIN, "--config", LB_CFG]
            if LB_LOG_LEVEL:
                argv += ["--log-level", LB_LOG_LEVEL]
        else:
            rundir = WORK / "kamailio-run"
            rundir.mkdir(parents=True, exist_ok=True)
            self.ctl = f"unix:{rundir}/kamailio_ctl"
            argv = [
                "kamailio", "-f", KAM_CFG, "-DD", "-E", "-m", 2048, "-M", 32,
                "-P", rundir / "kamailio.pid", "-Y", rundir,
                "-A", f'DS_LIST="{KAM_LIST}"', "-A", f'CTL_SOCK="{self.ctl}"',
            ]
        self.p = self.procs.spawn(self.name, argv, logfile)
        self.logfile = logfile
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise Broken(f"{self.name} exited at start (status {self.p.returncode}); see {logfile}")
            if sip_options(self.ip, PROXY_PORT):
                time.sleep(0.5)  # let every worker come up
                return
            time.sleep(0.2)
        raise Broken(f"{self.name} does not answer OPTIONS on {self.ip}:{PROXY_PORT}; see {logfile}")

    def stop(self):
        if self.p is not None:
            self.procs.stop(self.p)
            self.p = None

    def restart(self):
        self.stop()
        self.start()

    def pids(self):
        if self.p is None or self.p.poll() is not None:
            raise Broken(f"{self.name} is not running; see {self.logfile}")
        return [self.p.pid] + descendants(self.p.pid)

    def dialogs(self):
        """(active dialogs, dialogs processed) as the proxy counts them."""
        try:
            if self.name == "lb-proxy":
                s = http_json(f"{LB_ADMIN}/v1/dialogs/stats")
                return int(s["active"]), int(s["processed"])
            out = subprocess.run(
                ["kamcmd", "-s", self.ctl, "stats.get_statistics", "dialog:"],
                capture_output=True, text=True, timeout=10,
            ).stdout
            act = re.search(r"active_dialogs = (\d+)", out)
            proc = re.search(r"processed_dialogs = (\d+)", out)
            return int(act.group(1)) if act else -1, int(proc.group(1)) if proc else -1
        except (OSError, ValueError, KeyError, subprocess.SubprocessError):
            return -1, -1

    def extra_memory(self):
        """Kamailio's own view of its shared memory (bytes used), for the notes."""
        if self.name != "kamailio":
            return None
        try:
            out = subprocess.run(["kamcmd", "-s", self.ctl, "core.shmmem"], capture_output=True,
                                 text=True, timeout=10).stdout
            m = re.search(r"real_used:\s*(\d+)", out)
            return int(m.group(1)) if m else None
        except (OSError, subprocess.SubprocessError):
            return None


# ---------------------------------------------------------------------------------------------
# Packet capture: INVITE -> 200 latency seen on the client's address, microsecond timestamps


class Capture:
    def __init__(self, procs, tag):
        self.file = WORK / "pcap" / f"{tag}.pcap"
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.logfile = WORK / "pcap" / f"{tag}.log"
        self.p = procs.spawn("tcpdump", ["tcpdump", "-i", "lo", "-n", "-s", 0, "-B", 65536,
                                         "-w", self.file, "host", CLIENT_IP], self.logfile)
        self.procs = procs
        deadline = time.time() + 10
        while time.time() < deadline:
            if "listening on" in self.logfile.read_text(errors="replace"):
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.1)
        raise Broken(f"tcpdump did not start; see {self.logfile}")

    def stop(self):
        self.procs.stop(self.p, signal.SIGINT)
        text = self.logfile.read_text(errors="replace")
        m = re.search(r"(\d+) packets dropped by kernel", text)
        self.dropped = int(m.group(1)) if m else 0


def pcap_messages(path):
    """Yields (timestamp, src_ip, dst_ip, message bytes) of every SIP message in a capture of
    UDP and TCP traffic on loopback (TCP streams reassembled in capture order and framed by
    Content-Length; a message's time is the time of the segment that carries its first byte)."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        return
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0xA1B2C3D4:
        endian, scale = "<", 1e-6
    elif magic == 0xA1B23C4D:
        endian, scale = "<", 1e-9
    elif magic == 0xD4C3B2A1:
        endian, scale = ">", 1e-6
    else:
        endian, scale = ">", 1e-9
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    off = 24
    streams = {}  # flow -> [bytearray, base offset, [(abs offset, ts)]]
    while off + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack(endian + "IIII", data[off:off + 16])
        pkt = data[off + 16:off + 16 + incl]
        off += 16 + incl
        ts = sec + frac * scale
        if linktype == 1:  # Ethernet (Linux lo)
            if len(pkt) < 14 or pkt[12:14] != b"\x08\x00":
                continue
            ip = pkt[14:]
        elif linktype == 113:  # Linux cooked
            ip = pkt[16:]
        elif linktype in (0, 12, 101):
            ip = pkt[4:] if linktype == 0 else pkt
        else:
            continue
        if len(ip) < 20 or ip[0] >> 4 != 4:
            continue
        ihl = (ip[0] & 15) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        proto = ip[9]
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        seg = ip[ihl:total]
        if proto == 17:
            payload = seg[8:]
            if payload.strip(b"\r\n"):
                yield ts, src, dst, bytes(payload)
        elif proto == 6:
            if len(seg) < 20:
                continue
            sport, dport = struct.unpack("!HH", seg[:4])
            payload = seg[(seg[12] >> 4) * 4:]
            if not payload:
                continue
            key = (src, sport, dst, dport)
            st = streams.setdefault(key, [bytearray(), 0, []])
            st[2].append((st[1] + len(st[0]), ts))
            st[0] += payload
            yield from _tcp_frames(st, src, dst)


def _tcp_frames(st, src, dst):
    buf = st[0]
    while True:
        # skip keep-alive CRLFs
        i = 0
        while i < len(buf) and buf[i] in (13, 10):
            i += 1
        if i:
            del buf[:i]
            st[1] += i
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        m = re.search(rb"\r\n(?:Content-Length|l)[ \t]*:[ \t]*(\d+)", bytes(buf[:end + 2]), re.I)
        length = end + 4 + (int(m.group(1)) if m else 0)
        if len(buf) < length:
            return
        start = st[1]
        ts = st[2][0][1]
        for o, t in st[2]:
            if o <= start:
                ts = t
            else:
                break
        msg = bytes(buf[:length])
        del buf[:length]
        st[1] += length
        st[2] = [(o, t) for (o, t) in st[2] if o >= st[1]] or [(st[1], ts)]
        yield ts, src, dst, msg


CALLID = re.compile(rb"\r\n(?:Call-ID|i)[ \t]*:[ \t]*([^\r\n]+)", re.I)
CSEQ = re.compile(rb"\r\nCSeq[ \t]*:[ \t]*\d+[ \t]+([A-Za-z]+)", re.I)


def invite_latencies(path):
    """INVITE sent by the client -> first 200 for it received by the client, in ms."""
    sent, answered = {}, {}
    for ts, src, dst, msg in pcap_messages(path):
        cid = CALLID.search(msg)
        if not cid:
            continue
        cid = cid.group(1).strip()
        if src == CLIENT_IP and msg.startswith(b"INVITE "):
            sent.setdefault(cid, ts)
        elif dst == CLIENT_IP and msg.startswith(b"SIP/2.0 200"):
            cs = CSEQ.search(msg)
            if cs and cs.group(1).upper() == b"INVITE":
                answered.setdefault(cid, ts)
    lat = sorted((answered[c] - t) * 1000 for c, t in sent.items() if c in answered)
    return lat, len(sent) - len(lat)


def percentile(sorted_vals, q):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------
# The bench


class Bench:
    def __init__(self):
        self.procs = Procs(WORK / "pids")
        self.sipp = Sipp(self.procs)
        self.proxies = {n: Proxy(n, self.procs) for n in PROXIES}
        self.servers = {}  # target -> [Popen]
        self.last_traffic = {}  # target -> time its servers last saw calls
        self.results = {"transports": {}, "notes": [], "started": time.time()}
        self.broken = []

    # -- servers

    def start_servers(self, transport):
        for target, ips in SERVERS.items():
            self.servers[target] = [self.sipp.server(ip, transport, target) for ip in ips]
        time.sleep(0.5)
        for target, ss in self.servers.items():
            for s in ss:
                if s.poll() is not None:
                    raise Broken(f"sipp server of {target} exited (status {s.returncode}); "
                                 f"see {s.statfile.parent}/out.log")

    def restart_servers(self, target, transport):
        for s in self.servers.get(target, []):
            self.procs.stop(s, signal.SIGKILL)
        self.servers[target] = [self.sipp.server(ip, transport, target)
                                for ip in SERVERS[target]]
        time.sleep(0.5)

    def stop_servers(self):
        for ss in self.servers.values():
            for s in ss:
                self.procs.stop(s, signal.SIGKILL)
        self.servers = {}

    def target_addr(self, target, transport):
        if target == "direct":
            return SERVERS["direct"][0], SERVER_PORT[transport]
        return self.proxies[target].ip, PROXY_PORT

    # -- one batch of calls

    def calls(self, target, transport, rate, n, tag, cpu=False):
        """n calls at `rate` through `target`; returns the outcome (and proxy CPU seconds)."""
        ip, port = self.target_addr(target, transport)
        servers = self.servers[target]
        # servers dump their counters every second: wait for a dump after their last traffic
        time.sleep(max(0.0, self.last_traffic.get(target, 0) + 1.1 - time.time()))
        before = server_totals(servers)
        pids = self.proxies[target].pids() if target in self.proxies else []
        cpu0 = cpu_seconds(pids) if cpu else 0.0
        drops0 = udp_drops() if transport == "udp" else {}
        t0 = time.time()
        c = self.sipp.client(ip, port, transport, tag, rate, n, CALL_MS)
        while c.poll() is None and time.time() < c.deadline:
            time.sleep(0.05)
        wall = time.time() - t0
        if c.poll() is None:
            self.procs.stop(c, signal.SIGKILL)
        else:
            self.procs.stop(c)
        if cpu:
            pids = self.proxies[target].pids() if target in self.proxies else []
        cpu1 = cpu_seconds(pids) if cpu else 0.0
        mem = memory_kib(pids) if cpu else (0, 0)
        drops1 = udp_drops() if transport == "udp" else {}
        self.last_traffic[target] = time.time()
        time.sleep(1.1)
        after = server_totals(servers)
        st = last_stats(c.statfile)
        r = {
            "rate": rate,
            "calls": n,
            "ok": stat_int(st, "SuccessfulCall(C)"),
            "failed": stat_int(st, "FailedCall(C)"),
            "client_retrans": stat_int(st, "Retransmissions(C)"),
            "server_retrans": after["retrans"] - before["retrans"],
            "server_failed": after["failed"] - before["failed"],
            "wall": wall,
            "sipp_status": c.returncode,
            "cpu": cpu1 - cpu0,
            "rss_kib": mem[0],
            "pss_kib": mem[1],
            "udp_drops": {role(a): n - drops0.get(a, 0) for a, n in drops1.items()
                          if n - drops0.get(a, 0) > 0},
            "dir": str(c.statfile.parent),
        }
        r["retrans_pct"] = 100.0 * (r["client_retrans"] + r["server_retrans"]) / max(n, 1)
        expected = n / rate + CALL_MS / 1000
        problems = []
        if r["failed"] or r["ok"] != n:
            problems.append(f"{r['failed']} failed, {r['ok']}/{n} ok")
        if r["server_failed"]:
            problems.append(f"{r['server_failed']} failed on the servers")
        if r["retrans_pct"] >= 1.0:
            problems.append(f"{r['retrans_pct']:.1f}% retransmissions")
        if wall > expected * 1.10 + 1.0:
            problems.append(f"took {wall:.1f} s for {expected:.1f} s of calls")
        r["pass"] = not problems
        if problems and r["udp_drops"]:
            problems.append("datagrams dropped by full receive buffers: " + ", ".join(
                f"{k} {v}" for k, v in sorted(r["udp_drops"].items())))
        r["why"] = "; ".join(problems)
        return r

    # -- phases

    def verify(self, transport):
        """A few calls through each proxy: zero failures, both servers used, dialogs counted."""
        out = {}
        for name in PROXIES:
            px = self.proxies[name]
            _, processed0 = px.dialogs()
            before = [server_totals([s])["calls"] for s in self.servers[name]]
            r = self.calls(name, transport, 50, 200, f"verify-{transport}-{name}")
            after = [server_totals([s])["calls"] for s in self.servers[name]]
            active, processed1 = px.dialogs()
            per_server = [a - b for a, b in zip(after, before)]
            r.update({"per_server": per_server, "dialogs_processed": processed1 - processed0,
                      "dialogs_active": active})
            out[name] = r
            log(f"verify {transport} {name}: {r['ok']}/200 ok, failed {r['failed']}, "
                f"servers {per_server}, dialogs processed {processed1 - processed0}")
            if not r["pass"] or min(per_server) < 40 or processed1 - processed0 != 200:
                raise Broken(f"{name} over {transport} does not route calls correctly: "
                             f"{r['why'] or 'uneven'}; servers {per_server}, dialogs "
                             f"{processed1 - processed0}; see {r['dir']}")
        return out

    def rate_search(self, transport):
        """Steps up the rate, the proxies alternating; the no-proxy pair runs at each rate where
        a proxy failed, to show whether the limit was the proxy's or the load generator's."""
        targets = ["lb-proxy", "kamailio", "direct"]
        best = {t: None for t in targets}
        steps = {t: [] for t in targets}
        done = set()
        t_start = time.time()
        for i, rate in enumerate(RATES):
            if all(t in done for t in PROXIES):
                break
            if time.time() - t_start > RATE_BUDGET:
                self.results["notes"].append(
                    f"{transport}: rate search stopped at the time budget ({RATE_BUDGET:.0f} s) "
                    f"before {rate} calls/s")
                for t in PROXIES:
                    if t not in done:
                        steps[t].append({"rate": rate, "pass": None, "why": "time budget"})
                        done.add(t)
                break
            order = [t for t in (PROXIES if i % 2 == 0 else PROXIES[::-1]) if t not in done]
            n = int(rate * STEP_SECS)
            failed_here = False
            for t in order + ["direct"]:
                if t == "direct" and not failed_here:
                    break
                r = self.step(t, transport, rate, n)
                steps[t].append(r)
                if r["pass"]:
                    best[t] = max(best[t] or 0, rate)
                    continue
                if t == "direct":
                    self.results["notes"].append(
                        f"{transport}: the sipp client and server alone (no proxy) failed at "
                        f"{rate} calls/s: limits at that rate are the load generator's")
                    continue
                failed_here = True
                done.add(t)
                if i == 0:
                    raise Broken(f"{t} over {transport} fails at the lowest rate {rate}/s: "
                                 f"{r['why']}; see {r['dir']}")
                self.fresh(t, transport)
        return {"best": best, "steps": steps,
                "capped": [t for t in PROXIES if t not in done]}

    def step(self, t, transport, rate, n):
        """One step; a failure is retried once after a fresh start of that target."""
        r = self.calls(t, transport, rate, n, f"rate-{transport}-{t}-{rate}")
        if not r["pass"]:
            log(f"rate {transport} {t} {rate}/s: FAIL ({r['why']}), retrying on a fresh start")
            self.fresh(t, transport)
            r2 = self.calls(t, transport, rate, n, f"rate-{transport}-{t}-{rate}-retry")
            r2["first_try"] = r["why"]
            r = r2
        log(f"rate {transport} {t} {rate}/s: {'ok' if r['pass'] else 'FAIL ' + r['why']}"
            f" (retrans {r['retrans_pct']:.2f}%, {r['wall']:.1f} s)")
        return r

    def fresh(self, target, transport):
        """A clean start for a target after a failed step: its servers, and its proxy."""
        self.restart_servers(target, transport)
        if target in self.proxies:
            self.proxies[target].restart()

    def fixed(self, transport, rate):
        runs = {t: [] for t in ("lb-proxy", "kamailio", "direct")}
        n = int(rate * FIXED_SECS)
        for rnd in range(FIXED_ROUNDS):
            order = PROXIES[:] if rnd % 2 == 0 else PROXIES[::-1]
            for t in order:
                runs[t].append(self.fixed_run(t, transport, rate, n, rnd))
        runs["direct"].append(self.fixed_run("direct", transport, rate, n, 0))
        out = {}
        for t, rs in runs.items():
            if not rs:  # a target left out by BENCH_TARGETS: no figures
                out[t] = {"runs": [], "calls": 0, "failed": 0, "cpu_s": None, "cpu_per_1000": None,
                          "cpu_per_1000_runs": [], "rss_kib": None, "pss_kib": None, "p50": None,
                          "p90": None, "p99": None, "mean": None, "samples": 0, "unanswered": 0,
                          "pcap_dropped": 0}
                continue
            lat = sorted(x for r in rs for x in r["latencies"])
            calls = sum(r["ok"] for r in rs)
            cpu = sum(r["cpu"] for r in rs)
            out[t] = {
                "runs": [{k: v for k, v in r.items() if k != "latencies"} for r in rs],
                "calls": calls,
                "failed": sum(r["failed"] for r in rs),
                "cpu_s": cpu,
                "cpu_per_1000": (1000 * cpu / calls) if calls and t in PROXIES else None,
                "cpu_per_1000_runs": [1000 * r["cpu"] / r["ok"] for r in rs if r["ok"]],
                "rss_kib": max(r["rss_kib"] for r in rs),
                "pss_kib": max(r["pss_kib"] for r in rs),
                "p50": percentile(lat, 0.5),
                "p90": percentile(lat, 0.9),
                "p99": percentile(lat, 0.99),
                "mean": (sum(lat) / len(lat)) if lat else None,
                "samples": len(lat),
                "unanswered": sum(r["unanswered"] for r in rs),
                "pcap_dropped": sum(r["pcap_dropped"] for r in rs),
            }
            o = out[t]
            log(f"fixed {transport} {t} {rate}/s: {calls} calls, failed {o['failed']}, "
                f"cpu/1000 {fmt(o['cpu_per_1000'], 3)} s, p50 {fmt(o['p50'], 3)} ms, "
                f"p99 {fmt(o['p99'], 3)} ms")
        return out

    def fixed_run(self, target, transport, rate, n, rnd):
        cap = Capture(self.procs, f"fixed-{transport}-{target}-{rnd}")
        try:
            r = self.calls(target, transport, rate, n, f"fixed-{transport}-{target}-{rnd}",
                           cpu=target in PROXIES)
        finally:
            cap.stop()
        lat, unanswered = invite_latencies(cap.file)
        r.update({"latencies": lat, "unanswered": unanswered, "pcap_dropped": cap.dropped})
        try:
            cap.file.unlink()  # large; the figures are kept
        except OSError:
            pass
        return r

    def memory(self, transport, name, rate):
        px = self.proxies[name]
        self.restart_servers(name, transport)
        px.restart()
        time.sleep(2)
        rss0, pss0 = memory_kib(px.pids())
        points = [{"dialogs": 0, "active": 0, "rss_kib": rss0, "pss_kib": pss0,
                   "shm": px.extra_memory()}]
        clients = []
        prev = 0
        ok = True
        try:
            for i, total in enumerate(MEM_DIALOGS):
                n = total - prev
                c = self.sipp.client(px.ip, PROXY_PORT, transport, f"mem-{transport}-{name}-{total}",
                                     rate, n, 3_600_000, port=5071 + i, limit=max(MEM_DIALOGS) * 2,
                                     timeout=3600)
                clients.append(c)
                deadline = time.time() + n / rate + 60
                active, last, still = -1, -1, 0
                while time.time() < deadline:
                    active, _ = px.dialogs()
                    if active >= total or c.poll() is not None:
                        break
                    # every call sent and no new dialog for 5 s: some calls failed
                    sent = stat_int(last_stats(c.statfile), "OutgoingCall(C)")
                    still = still + 1 if active == last else 0
                    if sent >= n and still >= 5:
                        break
                    last = active
                    time.sleep(1)
                reached = active >= total
                time.sleep(MEM_SETTLE)
                active, _ = px.dialogs()
                rss, pss = memory_kib(px.pids())
                failed = sum(stat_int(last_stats(x.statfile), "FailedCall(C)") for x in clients)
                points.append({"dialogs": total, "active": active, "rss_kib": rss, "pss_kib": pss,
                               "shm": px.extra_memory(), "client_failed": failed,
                               "reached": reached})
                log(f"memory {transport} {name} {total} dialogs: active {active}, "
                    f"VmRSS {rss / 1024:.1f} MiB, PSS {pss / 1024:.1f} MiB, failed {failed}")
                if not reached:
                    self.results["notes"].append(
                        f"{transport} {name}: only {active} of {total} dialogs became active "
                        f"(client failed calls: {failed}); the memory figures stop there")
                    ok = False
                    break
                prev = total
        finally:
            for c in clients:
                self.procs.stop(c, signal.SIGKILL)
            px.stop()
            self.restart_servers(name, transport)
        return {"points": points, "complete": ok, "rate": rate}

    # -- whole run

    def run(self):
        self.results["host"] = host_info()
        self.results["load_start"] = loadavg()
        self.results["versions"] = versions()
        for transport in TRANSPORTS:
            log(f"=== {transport} ===")
            tr = self.results["transports"].setdefault(transport, {})
            self.start_servers(transport)
            try:
                for px in self.proxies.values():
                    px.start()
                tr["verify"] = self.verify(transport)
                best = {}
                if "rate" in PHASES:
                    tr["rate"] = self.rate_search(transport)
                    best = tr["rate"]["best"]
                    for px in self.proxies.values():
                        px.restart()
                if "fixed" in PHASES:
                    rate = FIXED_RATE
                    if not rate:
                        lows = [best.get(p) for p in PROXIES if best.get(p)]
                        rate = max(100, min(1000, (min(lows) // 2) // 100 * 100)) if lows else 200
                    tr["fixed_rate"] = rate
                    tr["fixed"] = self.fixed(transport, rate)
                for px in self.proxies.values():
                    px.stop()
                if "memory" in PHASES:
                    rate = MEM_RATE
                    tr["memory"] = {}
                    order = PROXIES[:] if transport == TRANSPORTS[0] else PROXIES[::-1]
                    for name in order:
                        tr["memory"][name] = self.memory(transport, name, rate)
            finally:
                for px in self.proxies.values():
                    px.stop()
                self.stop_servers()
        if "micro" in PHASES:
            self.results["micro"] = micro()
        self.results["load_end"] = loadavg()
        self.results["finished"] = time.time()


# ---------------------------------------------------------------------------------------------
# Routing microbenchmark (criterion, lb-proxy/benches/routing.rs)


def micro():
    # BENCH_MICRO_DIR: another copy of the workspace to run it in (e.g. one whose
    # lb-proxy/Cargo.toml already declares the bench while this one does not yet).
    root = Path(env_str("BENCH_MICRO_DIR", str(ROOT)))
    cargo_toml = (root / "lb-proxy" / "Cargo.toml").read_text()
    if "criterion" not in cargo_toml or not (root / "lb-proxy" / "benches" / "routing.rs").exists():
        log("micro: lb-proxy/Cargo.toml has no criterion [[bench]] yet: skipped")
        return {"skipped": "lb-proxy/Cargo.toml does not declare the routing bench (criterion) yet"}
    target = Path(os.environ.get("CARGO_TARGET_DIR", str(root / "target")))
    crit = target / "criterion" / "choose"
    if crit.exists():
        shutil.rmtree(crit)
    argv = ["cargo", "bench", "-p", "lb-proxy", "--bench", "routing", "--",
            "--warm-up-time", "1", "--measurement-time", "3", "--noplot"]
    log("micro: " + " ".join(argv) + (f" (in {root})" if root != ROOT else ""))
    with open(WORK / "micro.log", "w") as f:
        rc = subprocess.run(argv, cwd=root, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise Broken(f"cargo bench failed (status {rc}); see {WORK / 'micro.log'}")
    out = {"command": " ".join(argv), "results": [],
           "elsewhere": str(root) if root != ROOT else None}
    for est in sorted(crit.glob("*/*/new/estimates.json")):
        case, n = est.parts[-4], est.parts[-3]
        e = json.loads(est.read_text())
        out["results"].append({
            "case": case, "destinations": int(n),
            "median_ns": e["median"]["point_estimate"],
            "mean_ns": e["mean"]["point_estimate"],
            "mean_lo_ns": e["mean"]["confidence_interval"]["lower_bound"],
            "mean_hi_ns": e["mean"]["confidence_interval"]["upper_bound"],
        })
    out["results"].sort(key=lambda r: (r["case"], r["destinations"]))
    for r in out["results"]:
        log(f"micro {r['case']}/{r['destinations']}: median {fmt_ns(r['median_ns'])}")
    out["alloc"] = alloc_counts(root)
    return out


def alloc_counts(root):
    """Heap allocations per call and per parse (lb-proxy/benches/alloc.rs: exact counts)."""
    if not (root / "lb-proxy" / "benches" / "alloc.rs").exists():
        return None
    argv = ["cargo", "bench", "-p", "lb-proxy", "--bench", "alloc"]
    log("alloc: " + " ".join(argv))
    r = subprocess.run(argv, cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise Broken(f"cargo bench --bench alloc failed (status {r.returncode}): {r.stderr[-500:]}")
    lines = [l.strip() for l in r.stdout.splitlines() if l.startswith("per ")]
    for l in lines:
        log("alloc " + l)
    return {"command": " ".join(argv), "lines": lines}


# ---------------------------------------------------------------------------------------------
# Machine and versions


def sh(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def loadavg():
    return Path("/proc/loadavg").read_text().split()[:3]


def host_info():
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": os.uname().release,
        "os": next((ln.split("=", 1)[1].strip('"') for ln in Path("/etc/os-release").read_text()
                    .splitlines() if ln.startswith("PRETTY_NAME=")), "unknown"),
    }


def versions():
    sipp_v = sh(["sipp", "-v"])
    m = re.search(r"SIPp v[^\s,]+", sipp_v)
    rev = sh(["git", "rev-parse", "--short=12", "HEAD"])
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "kamailio": sh(["kamailio", "-v"]).splitlines()[0].replace("version:", "").strip(),
        "sipp": (m.group(0) if m else sipp_v.splitlines()[0] if sipp_v else "?").rstrip(".,"),
        "rustc": sh(["rustc", "-V"]),
        "git": rev + (" (with uncommitted changes)" if dirty else ""),
        "tcpdump": sh(["tcpdump", "--version"]).splitlines()[0],
    }


# ---------------------------------------------------------------------------------------------
# Report


def fmt(v, digits=1):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{digits}f}"


def report(res, procs):
    h, v = res["host"], res["versions"]
    la0, la1 = res["load_start"], res["load_end"]
    started = datetime.datetime.fromtimestamp(res["started"], datetime.timezone.utc)
    minutes = (res["finished"] - res["started"]) / 60
    busy = float(la0[0]) >= 0.5 * (h["nproc"] or 1)
    L = []
    w = L.append
    w("# Benchmarks: lb-proxy and Kamailio 5.6")
    w("")
    w("Generated by `make bench` (`bench/run.sh` → `bench/bench.py`); every figure below comes "
      "from one run. Re-run to refresh; the harness never fails on timing.")
    w("")
    w(f"- **Date**: {started:%Y-%m-%d %H:%M} UTC, {minutes:.0f} minutes")
    w(f"- **Machine**: {h['nproc']} CPUs ({h['cpu']}), {h['mem_gib']} GiB memory, "
      f"{h['os']}, Linux {h['kernel']}")
    w(f"- **Load average** (1/5/15 min): {' / '.join(la0)} just before the run, "
      f"{' / '.join(la1)} at its end (the bench's own load included)")
    if busy:
        w(f"- **The machine was not idle when the bench started** (load average {la0[0]} on "
          f"{h['nproc']} CPUs: other work had just run, or was running). Absolute figures may be "
          f"noisy; the two proxies were measured alternately in the same run, so the ratios are "
          f"the more reliable part.")
    w(f"- **Versions**: lb-proxy at git `{v['git']}` ({v['rustc']}, release build); "
      f"`{v['kamailio']}` (Debian package); {v['sipp']} (Debian `sip-tester`); {v['tcpdump']}")
    w("")
    targets(res, w)
    w("## Set-up")
    w("")
    w("All on loopback, 127.0.8.x only: sipp client 127.0.8.1, lb-proxy 127.0.8.2:5060 "
      "(UDP+TCP), Kamailio 127.0.8.3:5060 (UDP+TCP), two sipp MRCP-like servers per proxy "
      "(lb-proxy: 127.0.8.11/.12, Kamailio: 127.0.8.13/.14; UDP port 5080, TCP 5081), one for "
      "the no-proxy floor (127.0.8.15). Calls: INVITE (MRCP SDP offer) → 100 → 200 → ACK → "
      f"{CALL_MS} ms → BYE → 200, client and servers honouring Record-Route "
      "(`bench/sipp/uac.xml`, `bench/sipp/uas.xml`); the servers answer the proxies' OPTIONS "
      "probes (every 10 s) throughout.")
    w("")
    w(f"- **lb-proxy** (`{LB_CFG.relative_to(ROOT) if LB_CFG.is_relative_to(ROOT) else LB_CFG}`): defaults (absolute least-loaded routing, "
      "probing 10 s, log level "
      f"{LB_LOG_LEVEL or 'info: one log line per call, to a file'}); UDP listener → group 1, "
      "TCP listener → group 2; capacity 100000 per server.")
    w("- **Kamailio** (`bench/kamailio/kamailio.cfg`, `dispatcher.list`): `dispatcher` "
      "algorithm 10 (call load, `duid`, `maxload=100000`) with `ds_load_update`/`ds_load_unset`, "
      "`dialog` (`dlg_manage`), `rr`, `tm` (fr_timer 3 s, fr_inv_timer 30 s), failover to "
      "`ds_next_dst` in a failure_route (408/5xx/timeout), OPTIONS probing "
      "(`ds_ping_interval=10`, `ds_probing_mode=1`), `sanity`, `maxfwd`, `children=2`, "
      "`tcp_children=2`, shared memory 2 GiB (`-m 2048`), log level 2 (no per-call line). "
      "Started by hand in the foreground (`-DD -E`) with its own PID file, never as a service.")
    w(f"- Before measuring, 200 calls went through each proxy per transport: 0 failed, both of "
      f"its servers used, every call counted as a dialog by the proxy "
      f"(lb-proxy `/v1/dialogs/stats`, Kamailio `dialog:processed_dialogs`).")
    w("")
    w("How each figure is taken:")
    w("")
    w(f"1. **Highest sustained rate**: steps of {STEP_SECS:g} s at "
      f"{', '.join(str(r) for r in RATES)} calls/s, the two proxies alternating (which goes "
      "first changes every step). A step passes with every call successful, no failed call on "
      "the servers, retransmissions (client + servers) < 1% of the calls, and the calls done "
      "within 10% (+1 s) of their schedule. A failed step is retried once after a fresh start "
      "of that proxy and its servers; a second failure ends that proxy's search. At each rate "
      "where a proxy failed, the sipp client runs straight to one sipp server (no proxy) as a "
      "check that the load generator itself held that rate. For UDP the datagrams dropped by "
      "full socket receive buffers (`ss -uam`) are shown with a failure. The search stops after "
      f"{RATE_BUDGET:.0f} s per transport.")
    w(f"2. **CPU per 1000 calls**: utime+stime from `/proc/<pid>/stat` of every process of "
      f"the proxy (lb-proxy: one process, all threads; Kamailio: the main process and all its "
      f"forked children) before and after {FIXED_ROUNDS} runs of {FIXED_SECS:g} s at a fixed "
      f"rate both hold (half the lower maximum, between 100 and 1000 calls/s), proxies "
      f"alternating; CPU of probes and timers during the run included.")
    w("3. **INVITE→200 latency**: from a packet capture (tcpdump on lo, host 127.0.8.1) of "
      "the same runs: time from the client's INVITE to the 200 it receives, per call, "
      "microsecond timestamps (sipp's own response times have 1 ms resolution). The no-proxy "
      "row is the floor: sipp client straight to a sipp server at the same rate. sipp's own "
      "reaction time is part of every row; it depends on the rate and on the transport (its "
      "TCP mode answers about 1 ms later than its UDP mode), so compare rows of one table.")
    w(f"4. **Memory with N concurrent dialogs**: a fresh proxy; sipp clients open calls at "
      f"{MEM_RATE} calls/s that stay up (INVITE → 200 → ACK, then a pause of 1 h) until the "
      f"proxy itself reports N active dialogs; {MEM_SETTLE:g} s later VmRSS (from "
      f"`/proc/<pid>/status`) and PSS (from `/proc/<pid>/smaps_rollup`) are summed over every "
      f"process of the proxy. VmRSS summed over Kamailio's processes counts its shared memory "
      f"once per process that touched it; PSS shares each page among them and is the fair "
      f"total. Per dialog = (memory at N − memory idle) / N. The figures include the "
      f"transactions the proxies still hold: lb-proxy keeps an INVITE server transaction "
      f"64×T1 = 32 s after its 2xx (RFC 6026 Timer L), Kamailio's tm 5 s (wait timer), and "
      f"neither gives the memory back to the system afterwards; the marginal figure between "
      f"the two largest counts, where both hold a steady number of transactions, is the "
      f"closest to the cost of a dialog alone.")
    w("5. **Routing microbenchmark**: criterion, `lb-proxy/benches/routing.rs`: "
      "`Destinations::choose` (the routing index, as the proxy chooses) over 2, 100, 1000 "
      "real `Destination`s.")
    w("")

    for transport, tr in res["transports"].items():
        w(f"## {transport.upper()}")
        w("")
        if "rate" in tr:
            best = tr["rate"]["best"]
            capped = set(tr["rate"].get("capped", []))
            w("### 1. Highest sustained call rate")
            w("")
            w("| target | calls/s | steps (calls/s: result) |")
            w("|---|---:|---|")
            for t in ("lb-proxy", "kamailio", "direct"):
                if t == "direct" and not tr["rate"]["steps"][t]:
                    continue
                label = "no proxy (generator check)" if t == "direct" else t
                st = []
                for s_ in tr["rate"]["steps"][t]:
                    if s_.get("pass") is None:
                        st.append(f"{s_['rate']}: not run ({s_.get('why')})")
                    elif s_["pass"]:
                        st.append(f"{s_['rate']}: ok" + (f" (2nd try; 1st: {s_['first_try']})"
                                                         if s_.get("first_try") else ""))
                    else:
                        st.append(f"{s_['rate']}: **{s_['why']}**"
                                  + (f" (1st try: {s_['first_try']})" if s_.get("first_try") else ""))
                val = (("≥ " if t in capped else "") + str(best[t])) if best[t] else f"< {RATES[0]}"
                if t == "direct":
                    val = (f"held {', '.join(str(x['rate']) for x in tr['rate']['steps'][t] if x['pass'])}"
                           or "failed")
                w(f"| {label} | **{val}** | {'; '.join(st)} |")
            w("")
            lb, km = best["lb-proxy"], best["kamailio"]
            bound = "≥ " if "lb-proxy" in capped and "kamailio" not in capped else \
                "≤ " if "kamailio" in capped and "lb-proxy" not in capped else ""
            w(f"lb-proxy / Kamailio: **{bound}{ratio(lb, km)}**")
            if capped >= {"lb-proxy", "kamailio"}:
                w("")
                w("Both proxies held the highest step: raise BENCH_RATES to find their limits.")
            elif tr["rate"]["steps"]["direct"] and all(x["pass"] for x in tr["rate"]["steps"]["direct"]):
                w("")
                w("At each rate where a proxy failed, the sipp client and server alone (no proxy) "
                  "held it: the limits above are the proxies', not the load generator's.")
            w("")
        if "fixed" in tr:
            f = tr["fixed"]
            rate = tr["fixed_rate"]
            w(f"### 2. CPU per 1000 calls at {rate} calls/s")
            w("")
            w("| proxy | calls | failed | CPU s | CPU s / 1000 calls | per run | VmRSS / PSS after, MiB |")
            w("|---|---:|---:|---:|---:|---|---:|")
            for t in PROXIES:
                o = f[t]
                w(f"| {t} | {o['calls']} | {o['failed']} | {fmt(o['cpu_s'], 2)} | "
                  f"**{fmt(o['cpu_per_1000'], 3)}** | "
                  f"{', '.join(fmt(x, 3) for x in o['cpu_per_1000_runs'])} | "
                  f"{fmt(o['rss_kib'] / 1024)} / {fmt(o['pss_kib'] / 1024)} |")
            w("")
            w(f"lb-proxy / Kamailio: **{ratio(f['lb-proxy']['cpu_per_1000'], f['kamailio']['cpu_per_1000'])}** "
              "(below 1: lb-proxy uses less CPU per call)")
            w("")
            w(f"### 3. INVITE→200 latency at {rate} calls/s (ms)")
            w("")
            w("| path | calls measured | p50 | p90 | p99 | mean | p50 over floor | p99 over floor |")
            w("|---|---:|---:|---:|---:|---:|---:|---:|")
            fl = f["direct"]
            for t in ("direct", "lb-proxy", "kamailio"):
                o = f[t]
                label = "no proxy (floor)" if t == "direct" else t
                over50 = (o["p50"] - fl["p50"]) if (t != "direct" and o["p50"] is not None
                                                    and fl["p50"] is not None) else None
                over99 = (o["p99"] - fl["p99"]) if (t != "direct" and o["p99"] is not None
                                                    and fl["p99"] is not None) else None
                w(f"| {label} | {o['samples']} | {fmt(o['p50'], 3)} | {fmt(o['p90'], 3)} | "
                  f"**{fmt(o['p99'], 3)}** | {fmt(o['mean'], 3)} | {fmt(over50, 3)} | "
                  f"{fmt(over99, 3)} |")
            w("")
            lbp, kp = f["lb-proxy"], f["kamailio"]
            w(f"lb-proxy / Kamailio: p50 **{ratio(lbp['p50'], kp['p50'])}**, "
              f"p99 **{ratio(lbp['p99'], kp['p99'])}**")
            drops = sum(f[t]["pcap_dropped"] for t in f)
            miss = sum(f[t]["unanswered"] for t in f)
            if drops or miss:
                w("")
                w(f"(capture: {drops} packets dropped by the kernel, {miss} INVITEs without a "
                  f"captured 200; those calls are left out)")
            w("")
        if "memory" in tr:
            w("### 4. Resident memory with concurrent dialogs")
            w("")
            m = tr["memory"]
            rate = next(iter(m.values()))["rate"] if m else 0
            w(f"Dialogs opened at {rate} calls/s. Memory in MiB, per dialog in KiB.")
            w("")
            w("| proxy | dialogs | active (proxy's count) | VmRSS sum | PSS sum | "
              "VmRSS / dialog | PSS / dialog |")
            w("|---|---:|---:|---:|---:|---:|---:|")
            pts_of = {}
            for name in PROXIES:
                if name not in m:
                    continue
                pts = m[name]["points"]
                pts_of[name] = {p["dialogs"]: p for p in pts}
                base = pts[0]
                for p in pts:
                    rd = (p["rss_kib"] - base["rss_kib"]) / p["dialogs"] if p["dialogs"] else None
                    pd = (p["pss_kib"] - base["pss_kib"]) / p["dialogs"] if p["dialogs"] else None
                    w(f"| {name} | {p['dialogs']:,} | {p['active']:,} | "
                      f"{fmt(p['rss_kib'] / 1024)} | {fmt(p['pss_kib'] / 1024)} | "
                      f"{fmt(rd, 2)} | {fmt(pd, 2)} |")
            w("")
            if len(MEM_DIALOGS) >= 2:
                n1, n2 = MEM_DIALOGS[-2], MEM_DIALOGS[-1]
                marg = {}
                for name, pts in pts_of.items():
                    if n1 in pts and n2 in pts:
                        marg[name] = ((pts[n2]["rss_kib"] - pts[n1]["rss_kib"]) / (n2 - n1),
                                      (pts[n2]["pss_kib"] - pts[n1]["pss_kib"]) / (n2 - n1))
                if marg:
                    w(f"Marginal memory per dialog from {n1:,} to {n2:,} dialogs (KiB): " + "; ".join(
                        f"{k} VmRSS {fmt(v[0], 2)}, PSS {fmt(v[1], 2)}" for k, v in marg.items())
                      + (f"; lb-proxy / Kamailio (PSS): **{ratio(marg['lb-proxy'][1], marg['kamailio'][1])}**"
                         if len(marg) == 2 else "") + ".")
                    w("")
            rows = []
            for n in MEM_DIALOGS:
                a = pts_of.get("lb-proxy", {}).get(n)
                b = pts_of.get("kamailio", {}).get(n)
                if a and b:
                    rows.append(f"{n:,}: VmRSS **{ratio(a['rss_kib'], b['rss_kib'])}**, "
                                f"PSS **{ratio(a['pss_kib'], b['pss_kib'])}**")
            if rows:
                w("lb-proxy / Kamailio, total memory: " + "; ".join(rows))
                w("")
            shm = [p for p in m.get("kamailio", {}).get("points", []) if p.get("shm")]
            if shm:
                w("Kamailio's own count of shared memory in use (`core.shmmem` real_used): "
                  + ", ".join(f"{p['dialogs']:,} dialogs: {p['shm'] / 1048576:.1f} MiB"
                              for p in shm) + ".")
                w("")

    mi = res.get("micro")
    w("## 5. Routing microbenchmark")
    w("")
    if not mi:
        w("Not run.")
    elif mi.get("skipped"):
        w(f"Skipped: {mi['skipped']}.")
    else:
        w(f"`{mi['command']}`. Time of one `Destinations::choose()` call (group `choose`; "
          "the bench's groups `call` and `scan` add the index update of acquire and release, "
          "and the reference scan); `varied` = loads differ (one best destination), `idle` = "
          "every destination tied (random tie-break over all).")
        if mi.get("elsewhere"):
            w("")
            w("(Run in a copy of this workspace whose `lb-proxy/Cargo.toml` declares the bench: "
              "the criterion dev-dependency and `[[bench]] name = \"routing\", harness = false`.)")
        w("")
        w("| case | destinations | median | mean (95% CI) | per destination |")
        w("|---|---:|---:|---:|---:|")
        for r in mi["results"]:
            w(f"| {r['case']} | {r['destinations']} | {fmt_ns(r['median_ns'])} | "
              f"{fmt_ns(r['mean_ns'])} ({fmt_ns(r['mean_lo_ns'])}–{fmt_ns(r['mean_hi_ns'])}) | "
              f"{fmt_ns(r['median_ns'] / r['destinations'])} |")
    w("")
    al = (mi or {}).get("alloc")
    if al:
        w("## 6. Heap allocations per call")
        w("")
        w(f"`{al['command']}`: the core driven in-process (no sockets) through calls shaped like "
          "the UDP benchmark's (INVITE with an MRCP offer, 100, 200 with Record-Route, ACK and "
          "BYE through it, 200), counted by a counting global allocator around what the runtime "
          "does per datagram (the parse with its one copy of the datagram, `on_message`, the "
          "timers due, the outbound queue). Exact counts, not samples; the time is the fastest of "
          "three alternating rounds of each configuration, on one core, counting allocator "
          "included (the fixed list of `bench/lb-proxy.yaml`, and SDP routing as "
          "`bench/lb-proxy-sdp.yaml`):")
        w("")
        for l in al["lines"]:
            w(f"- {l}")
        w("")
    w("Measurements taken between full runs (one phase, one change against the build before "
      "it) are in `bench/HISTORY.md`.")
    w("")
    w("## Exact commands")
    w("")
    w("```sh")
    w("make bench            # = ./bench/run.sh: installs kamailio, sip-tester, tcpdump if "
      "missing; cargo build --release -p lb-proxy; python3 bench/bench.py")
    seen = set()
    for name, argv in procs.commands:
        kind = name.split()[0] if not name.startswith("sipp-client") else \
            "sipp-client " + name.split()[1].split("-")[0]
        if kind in seen:
            continue
        seen.add(kind)
        w(" ".join(shorten(a) for a in argv))
    if mi and not mi.get("skipped"):
        w(mi["command"])
    w("```")
    w("")
    w("`$WORK` is `target/bench-run`. Every command of the run, in order, is in "
      "`$WORK/commands.log`; sipp "
      "statistics and error logs, proxy logs and `results.json` are beside it. Rate and "
      "server files vary per step (`-r`, `-m`, `-d`, `-i`, `-p`, `-cp`, `-mp`).")
    if res["notes"]:
        w("")
        w("## Notes")
        w("")
        for n in res["notes"]:
            w(f"- {n}")
    w("")
    OUT.write_text("\n".join(L))


# The performance targets of issue 13 and where this run stands. "Before" is the run that
# opened the issue (BENCHMARKS.md of 2026-11-25, git 9b665de7c65c).
BEFORE = {"cpu_udp": 0.61, "cpu_tcp": 0.54, "p99_udp": 1.44, "mem_udp": 263.1, "rate_udp": 8000}


def targets(res, w):
    trs = res["transports"]

    def cpu(t):
        f = trs.get(t, {}).get("fixed")
        if not f or "kamailio" not in f or "lb-proxy" not in f:
            return None, None
        return ratio_num(f["lb-proxy"]["cpu_per_1000"], f["kamailio"]["cpu_per_1000"]), \
            trs[t]["fixed_rate"]

    def p99(t):
        f = trs.get(t, {}).get("fixed")
        if not f or "lb-proxy" not in f or "direct" not in f or f["lb-proxy"]["p99"] is None or f["direct"]["p99"] is None:
            return None
        return f["lb-proxy"]["p99"] - f["direct"]["p99"]

    def mem(t):
        m = trs.get(t, {}).get("memory", {}).get("lb-proxy")
        if not m:
            return None
        top = max(m["points"], key=lambda p: p["dialogs"])
        return top["rss_kib"] / 1024, top["dialogs"]

    def rate(t):
        r = trs.get(t, {}).get("rate")
        if not r:
            return None
        best = r["best"].get("lb-proxy")
        capped = "lb-proxy" in r.get("capped", [])
        return best, capped

    def routing():
        mi = res.get("micro") or {}
        by = {(r["case"], r["destinations"]): r["median_ns"] for r in mi.get("results", [])}
        out = []
        for case in ("varied", "idle"):
            if (case, 2) in by and (case, 1000) in by:
                out.append((case, by[(case, 1000)] / by[(case, 2)]))
        return out

    def mark(ok):
        return "met" if ok else "**not met**"

    rows = []
    for t, key in (("udp", "cpu_udp"), ("tcp", "cpu_tcp")):
        r, at = cpu(t)
        if r is not None:
            rows.append((f"CPU per call vs Kamailio, {t.upper()}, {at} calls/s",
                         f"{BEFORE[key]:.2f}×", f"{r:.2f}×", "≤ 0.33×", mark(r <= 0.33)))
    v = p99("udp")
    if v is not None:
        at = trs["udp"]["fixed_rate"]
        rows.append((f"p99 INVITE→200 over the no-proxy floor, UDP, {at} calls/s",
                     f"{BEFORE['p99_udp']:.2f} ms", f"{v:.2f} ms", "≤ 1.0 ms", mark(v <= 1.0)))
    m = mem("udp")
    if m is not None:
        rows.append((f"{m[1]:,} concurrent dialogs, RSS (UDP)", f"{BEFORE['mem_udp']:.0f} MiB",
                     f"{m[0]:.0f} MiB", "≤ 200 MiB", mark(m[0] <= 200)))
    mt = mem("tcp")
    if mt is not None:
        rows.append((f"{mt[1]:,} concurrent dialogs, RSS (TCP)", "198 MiB",
                     f"{mt[0]:.0f} MiB", "≤ 200 MiB", mark(mt[0] <= 200)))
    r = rate("udp")
    if r is not None and r[0]:
        gen = trs["udp"]["rate"]["best"].get("direct")
        ok = r[0] >= 1.5 * BEFORE["rate_udp"]
        verdict = mark(ok) if ok or not r[1] else \
            f"not shown: the steps end at {RATES[-1]}/s (BENCH_RATES)"
        rows.append(("highest sustained UDP rate", f"{BEFORE['rate_udp']}/s",
                     ("≥ " if r[1] else "") + f"{r[0]}/s", "≥ 12000/s or the generator's limit",
                     verdict))
    for case, q in routing():
        rows.append((f"routing choice at 1000 vs 2 destinations ({case})", "linear",
                     f"{q:.2f}×", "≤ 2×", mark(q <= 2)))
    if not rows:
        return
    w("## Targets (issue 13)")
    w("")
    w("| figure | before (2026-11-25) | this run | target | |")
    w("|---|---:|---:|---:|---|")
    for row in rows:
        w("| " + " | ".join(row) + " |")
    w("")
    w("lb-proxy handles SIP on one thread (`lb-core`: the core, its UDP sockets, the TCP and "
      "TLS connections; docs/architecture.md, \"Threads\"), so the highest rate is what one "
      "core of this machine does while the load generator (one sipp client, two sipp servers) "
      "runs on the same two CPUs. Past one core, run more replicas behind the SIP Service: "
      "they share load (README, replica model).")
    w("")


def ratio_num(a, b):
    return a / b if a is not None and b else None


def sub(a, b):
    return None if a is None or b is None else a - b


def fmt_ns(ns):
    if ns is None:
        return "–"
    if ns >= 1000:
        return f"{ns / 1000:.2f} µs"
    return f"{ns:.1f} ns"


def shorten(a):
    s = str(a)
    s = s.replace(str(WORK), "$WORK").replace(str(ROOT) + "/", "")
    return f"'{s}'" if any(c in s for c in ' "') else s


# ---------------------------------------------------------------------------------------------


def report_only():
    """Writes the report again from the last run's results.json and commands.log."""
    res = json.loads((WORK / "results.json").read_text())
    procs = Procs.__new__(Procs)
    procs.commands = []
    for line in (WORK / "commands.log").read_text().splitlines():
        name, _, cmd = line.partition(": ")
        procs.commands.append((name, cmd.split(" ")))
    report(res, procs)
    log(f"wrote {OUT} from {WORK / 'results.json'}")
    return 0


def main():
    if sys.argv[1:] == ["--report"]:
        return report_only()
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    bench = Bench()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    status = 0
    try:
        bench.run()
    except Broken as e:
        log(f"BROKEN: {e}")
        status = 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e})")
        status = 130
    finally:
        bench.procs.stop_all()
    (WORK / "results.json").write_text(json.dumps(bench.results, indent=1, default=str))
    if status == 0:
        report(bench.results, bench.procs)
        log(f"wrote {OUT} (logs and raw results in {WORK})")
    return status


if __name__ == "__main__":
    sys.exit(main())
