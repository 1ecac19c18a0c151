#!/usr/bin/env python3
"""Writes the tcp_stream and proxy_core seeds from the sip_datagram ones (fuzz/corpus/README.md).

tcp_stream input: one byte for the size limit, two that seed where the stream is cut into
reads, then the stream. proxy_core input: a script of NUL-separated steps (see
`core` in fuzz-checks/src/lib.rs). Run from anywhere; it rewrites the two directories.
"""
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
SIP = os.path.join(CORPUS, "sip_datagram")


def sip(name):
    with open(os.path.join(SIP, name), "rb") as f:
        return f.read()


def write(target, name, data):
    with open(os.path.join(CORPUS, target, name), "wb") as f:
        f.write(data)


def reset(target):
    d = os.path.join(CORPUS, target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)


# ---- tcp_stream ------------------------------------------------------------------------------

reset("tcp_stream")
LIMIT_64K, LIMIT_1K = b"\xff", b"\x00"
CUTS = b"ab"
# Whole connections as captured (sipp client <-> proxy, proxy <-> sipp server over TCP).
for name in ["tcp-client-to-proxy", "tcp-proxy-to-client", "tcp-proxy-to-server",
             "tcp-server-to-proxy"]:
    with open(os.path.join(HERE, "captures", name), "rb") as f:
        write("tcp_stream", name, LIMIT_64K + CUTS + f.read())
# Keep-alives (RFC 5626 double-CRLF pings, single CRLF pongs) between messages.
write("tcp_stream", "keepalives",
      LIMIT_64K + b"\x13\x37" + b"\r\n\r\n" + sip("sipp-uac-invite-sdp.sip") + b"\r\n"
      + sip("sipp-uac-cancel.sip") + b"\r\n\r\n\r\n" + sip("sipp-uac-ack-route.sip"))
# Compact Content-Length, then a message cut short by the end of the stream.
write("tcp_stream", "compact-then-partial",
      LIMIT_64K + b"\x01\x02" + sip("compact-forms.sip") + sip("sipp-uac-bye-route.sip")[:97])
# RFC 4475 dblreq is two messages back to back; longreq is over the 1 KiB limit.
write("tcp_stream", "rfc4475-dblreq", LIMIT_64K + CUTS + sip("rfc4475-dblreq.sip"))
write("tcp_stream", "rfc4475-longreq-over-limit", LIMIT_1K + CUTS + sip("rfc4475-longreq.sip"))
# A negative Content-Length closes the stream.
write("tcp_stream", "rfc4475-ncl", LIMIT_64K + CUTS + sip("rfc4475-ncl.sip"))

# ---- proxy_core ------------------------------------------------------------------------------

reset("proxy_core")


def script(*steps):
    for s in steps:
        assert b"\0" not in s, "a step may not contain NUL"
    return b"\0".join(steps)


INVITE = sip("sipp-uac-invite-sdp.sip")
INVITE6 = sip("sipp-uac-invite-ipv6.sip")
# The TCP capture's second INVITE and its CANCEL (same branch).
with open(os.path.join(HERE, "captures", "tcp-client-to-proxy"), "rb") as f:
    stream = f.read()
second = stream.index(b"INVITE ", 1)
TCP_INVITE = stream[second: stream.index(b"CANCEL ", second)]
TCP_CANCEL = sip("sipp-uac-cancel.sip")
assert b"branch=z9hG4bK-19964-2-0" in TCP_INVITE and b"branch=z9hG4bK-19964-2-0" in TCP_CANCEL

# A whole UDP call: INVITE, 100, 200, ACK, BYE, 200.
write("proxy_core", "udp-call", script(
    b"M0" + INVITE, b"R0100", b"R0200", b"C0A", b"T1000", b"C0B", b"R0200", b"T40000"))
# Session timer: the 200 asks for 90 s; nobody refreshes; the proxy sends BYE both ways.
write("proxy_core", "session-expires", script(
    b"M0" + INVITE, b"R0200Session-Expires: 90;refresher=uac", b"C0A", b"T95000",
    b"R0200", b"R1200"))
# TCP client: ringing, then CANCEL; 487 from the server; ACK.
write("proxy_core", "tcp-cancel", script(
    b"M1" + TCP_INVITE, b"R0180", b"M1" + TCP_CANCEL, b"R0200", b"R1487", b"T500"))
# IPv6 client: 503 with Retry-After, failover to the next server, which answers.
write("proxy_core", "ipv6-503-failover", script(
    b"M2" + INVITE6, b"R0503Retry-After: 30", b"R0200", b"C0A", b"C0B", b"R0200"))
# No answer at all: timeout, failover; transport error on the second try.
write("proxy_core", "timeout-then-transport-error", script(
    b"M0" + INVITE, b"T3500", b"E0", b"T3500"))
# Probes: answered, then failing.
write("proxy_core", "probes", script(b"T6000", b"R0200", b"R1503", b"T12000"))
# Malformed messages in the middle of a call.
write("proxy_core", "torture-mid-call", script(
    b"M0" + INVITE, b"M0" + sip("rfc4475-badinv01.sip"), b"R0200",
    b"M1" + sip("rfc4475-wsinv.sip"), b"S0" + sip("rfc4475-scalarlg.sip"),
    b"M0" + sip("rfc4475-zeromf.sip"), b"C0A"))
# SDP routing (UDP listeners): two channels offered, the server's 202 rejects the second
# (bit 1 of 202 - 200), ACK; a re-INVITE offering two channels, 200; one removing them, 200;
# BYE.
TWO = sip("unimrcp-invite-two-channels.sip")
write("proxy_core", "sdp-reject-then-reinvites", script(
    b"M0" + TWO, b"R0202", b"C0A", b"T500", b"C0I", b"R0200", b"C0A", b"C0R", b"R0200",
    b"C0A", b"C0B", b"R0200", b"T40000"))
