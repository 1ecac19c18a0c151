//! The MRCPv2 channels of an SDP body (RFC 6787 section 4.2, RFC 4566): what a session asks
//! for in its offer, and what the server accepted in its answer.
//!
//! An MRCPv2 channel is an `m=application <port> TCP/MRCPv2 1` (or `TCP/TLS/MRCPv2`) line; the
//! client names the resource it wants with `a=resource:speechrecog` in that media section, and
//! the server accepts with a non-zero port and `a=channel:<session>@<resource>`, or rejects
//! with port 0. UniMRCP's client writes one such section per resource, each followed by the
//! `m=audio` section of its media:
//!
//! ```text
//! m=application 9 TCP/MRCPv2 1
//! a=setup:active
//! a=connection:new
//! a=resource:speechsynth
//! a=cmid:1
//! m=audio 4000 RTP/AVP 0 8 96 101
//! ```
//!
//! Only what routing needs is read: the media lines, their port and protocol, and the
//! `a=resource` and `a=channel` attributes inside MRCPv2 sections. Nothing is copied; the
//! channels borrow from the body. Everything a peer writes is checked: a body that is no SDP,
//! an `m=` line that does not parse, an MRCPv2 offer without `a=resource`, a resource name that
//! is no token or more channels than [`MAX_CHANNELS`] are errors that say what was wrong, and
//! the proxy answers them with 400 (see `proxy::failover`). Lines may end in CRLF or a bare
//! LF (RFC 4566 5 asks parsers to accept both).

use std::fmt;

/// The most MRCPv2 channels one offer may open: MRCPv2 defines six resource types, a session
/// rarely opens more than two. More is refused rather than counted.
pub const MAX_CHANNELS: usize = 16;

/// The longest resource name accepted (`speechrecog` is 11).
pub const MAX_RESOURCE_LEN: usize = 32;

/// One MRCPv2 media section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channel<'a> {
    /// Position among all the body's `m=` lines: an answer's sections match the offer's by
    /// position (RFC 3264 6).
    pub mline: usize,
    /// The media port: 0 in an offer removes the channel, in an answer rejects it.
    pub port: u16,
    /// `a=resource:`, when present (offers carry it; answers may not).
    pub resource: Option<&'a str>,
    /// `a=channel:` identifier, when present (an answer's sign of acceptance).
    pub channel: Option<&'a str>,
}

impl Channel<'_> {
    /// An answer's channel that the server took: a port and a channel identifier.
    pub fn accepted(&self) -> bool {
        self.port != 0 && self.channel.is_some()
    }
}

/// The MRCPv2 sections of one body, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Channels<'a> {
    pub list: Vec<Channel<'a>>,
}

impl<'a> Channels<'a> {
    /// The resources an offer asks for: one per channel with a non-zero port, in order.
    pub fn offered(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.list
            .iter()
            .filter(|c| c.port != 0)
            .filter_map(|c| c.resource)
    }

    /// The resources of `offer` that this answer accepted, matched by `m=` line position. A
    /// channel the answer leaves out, rejects with port 0 or accepts without `a=channel` is not
    /// accepted.
    pub fn accepted_of(&self, offer: &Channels<'a>) -> Vec<&'a str> {
        offer
            .list
            .iter()
            .filter(|o| o.port != 0)
            .filter_map(|o| {
                let r = o.resource?;
                self.list
                    .iter()
                    .find(|a| a.mline == o.mline)
                    .filter(|a| a.accepted())
                    .map(|_| r)
            })
            .collect()
    }
}

/// What is wrong with an SDP body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdpError {
    /// The first line is not `v=`.
    NotSdp,
    /// An `m=` line without port or protocol, or with a port that is no number.
    BadMedia(String),
    /// An MRCPv2 section of an offer without `a=resource`.
    NoResource {
        mline: usize,
    },
    /// An `a=resource` value that is no token or too long.
    BadResource(String),
    /// Two `a=resource` lines in one section.
    TwoResources {
        mline: usize,
    },
    TooManyChannels,
}

impl fmt::Display for SdpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SdpError::NotSdp => f.write_str("the body does not start with a v= line"),
            SdpError::BadMedia(l) => write!(f, "media line {l:?} does not parse"),
            SdpError::NoResource { mline } => {
                write!(f, "MRCPv2 media line {} has no a=resource", mline + 1)
            }
            SdpError::BadResource(r) => write!(f, "resource name {r:?} is not a token"),
            SdpError::TwoResources { mline } => {
                write!(f, "MRCPv2 media line {} has two a=resource", mline + 1)
            }
            SdpError::TooManyChannels => {
                write!(f, "more than {MAX_CHANNELS} MRCPv2 channels")
            }
        }
    }
}

impl std::error::Error for SdpError {}

/// Shows at most 40 characters of what a peer wrote, lossily.
fn quote(line: &[u8]) -> String {
    let end = line.len().min(40);
    String::from_utf8_lossy(line.get(..end).unwrap_or_default()).into_owned()
}

/// Whether a `Content-Type` value is `application/sdp` (parameters ignored).
pub fn is_sdp(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    media.eq_ignore_ascii_case("application/sdp")
}

fn is_mrcp_proto(proto: &[u8]) -> bool {
    proto.eq_ignore_ascii_case(b"TCP/MRCPv2") || proto.eq_ignore_ascii_case(b"TCP/TLS/MRCPv2")
}

/// Whether `v` is a resource name: 1 to [`MAX_RESOURCE_LEN`] letters, digits, `-`, `_` and
/// `.` (what the offer's `a=resource` and the configuration's lists may say).
pub fn is_resource_name(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_RESOURCE_LEN
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A resource name from an offer, or the error that quotes it.
fn resource_name(v: &[u8]) -> Result<&str, SdpError> {
    if !is_resource_name(v) {
        return Err(SdpError::BadResource(quote(v)));
    }
    std::str::from_utf8(v).map_err(|_| SdpError::BadResource(quote(v)))
}

/// `m=<media> <port>[/<count>] <proto> ...`: the port and the protocol.
fn media_line(rest: &[u8]) -> Result<(u16, &[u8]), SdpError> {
    let mut fields = rest.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let (_media, port, proto) = match (fields.next(), fields.next(), fields.next()) {
        (Some(m), Some(p), Some(proto)) => (m, p, proto),
        _ => return Err(SdpError::BadMedia(quote(rest))),
    };
    let port = port.split(|&b| b == b'/').next().unwrap_or_default();
    let port = std::str::from_utf8(port)
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| SdpError::BadMedia(quote(rest)))?;
    Ok((port, proto))
}

/// Closes the MRCPv2 section being read, if any.
fn finish<'a>(c: Option<Channel<'a>>, offer: bool, out: &mut Channels<'a>) -> Result<(), SdpError> {
    if let Some(c) = c {
        if offer && c.port != 0 && c.resource.is_none() {
            return Err(SdpError::NoResource { mline: c.mline });
        }
        out.list.push(c);
    }
    Ok(())
}

/// Reads the MRCPv2 sections of `body`. `offer`: each must name its resource.
pub fn read(body: &[u8], offer: bool) -> Result<Channels<'_>, SdpError> {
    let mut out = Channels::default();
    let mut lines = body
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty());
    match lines.next() {
        Some(first) if first.starts_with(b"v=") => {}
        _ => return Err(SdpError::NotSdp),
    }
    let mut mline: Option<usize> = None;
    // The section being read, when it is MRCPv2.
    let mut current: Option<Channel<'_>> = None;
    for line in lines {
        if let Some(rest) = line.strip_prefix(b"m=") {
            finish(current.take(), offer, &mut out)?;
            let n = mline.map_or(0, |n| n + 1);
            mline = Some(n);
            let (port, proto) = media_line(rest)?;
            if is_mrcp_proto(proto) {
                if out.list.len() >= MAX_CHANNELS {
                    return Err(SdpError::TooManyChannels);
                }
                current = Some(Channel {
                    mline: n,
                    port,
                    resource: None,
                    channel: None,
                });
            }
            continue;
        }
        let Some(c) = current.as_mut() else { continue };
        let Some(attr) = line.strip_prefix(b"a=") else {
            continue;
        };
        let (name, value) = match attr.iter().position(|&b| b == b':') {
            Some(i) => (&attr[..i], attr.get(i + 1..).unwrap_or_default()),
            None => (attr, &b""[..]),
        };
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case(b"resource") {
            if c.resource.is_some() {
                return Err(SdpError::TwoResources { mline: c.mline });
            }
            c.resource = Some(resource_name(value)?);
        } else if name.eq_ignore_ascii_case(b"channel") && !value.is_empty() {
            c.channel = std::str::from_utf8(value).ok();
        }
    }
    finish(current.take(), offer, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offer UniMRCP 1.8's client sends for a synthesizer session (umc, `run synth`).
    const SYNTH_OFFER: &str = "v=0\r\n\
        o=UniMRCPClient 0 0 IN IP4 127.0.0.1\r\n\
        s=-\r\n\
        c=IN IP4 127.0.0.1\r\n\
        t=0 0\r\n\
        m=application 9 TCP/MRCPv2 1\r\n\
        a=setup:active\r\n\
        a=connection:new\r\n\
        a=resource:speechsynth\r\n\
        a=cmid:1\r\n\
        m=audio 4000 RTP/AVP 0 8 96 101\r\n\
        a=rtpmap:0 PCMU/8000\r\n\
        a=rtpmap:8 PCMA/8000\r\n\
        a=rtpmap:96 L16/8000\r\n\
        a=rtpmap:101 telephone-event/8000\r\n\
        a=fmtp:101 0-15\r\n\
        a=recvonly\r\n\
        a=ptime:20\r\n\
        a=mid:1\r\n";

    /// Two resources in one session: a synthesizer and a recognizer (umc, `run bypass`-like).
    const TWO_OFFER: &str = "v=0\r\n\
        o=UniMRCPClient 0 0 IN IP4 127.0.0.1\r\n\
        s=-\r\n\
        c=IN IP4 127.0.0.1\r\n\
        t=0 0\r\n\
        m=application 9 TCP/MRCPv2 1\r\n\
        a=setup:active\r\n\
        a=connection:new\r\n\
        a=resource:speechsynth\r\n\
        a=cmid:1\r\n\
        m=application 9 TCP/MRCPv2 1\r\n\
        a=setup:active\r\n\
        a=connection:existing\r\n\
        a=resource:speechrecog\r\n\
        a=cmid:1\r\n\
        m=audio 4000 RTP/AVP 0 8 96 101\r\n\
        a=rtpmap:0 PCMU/8000\r\n\
        a=sendrecv\r\n\
        a=mid:1\r\n";

    /// UniMRCP server's answer to TWO_OFFER, the recognizer rejected (no engine).
    const TWO_ANSWER_RECOG_REJECTED: &str = "v=0\r\n\
        o=UniMRCPServer 0 0 IN IP4 127.0.0.1\r\n\
        s=-\r\n\
        c=IN IP4 127.0.0.1\r\n\
        t=0 0\r\n\
        m=application 1544 TCP/MRCPv2 1\r\n\
        a=setup:passive\r\n\
        a=connection:new\r\n\
        a=channel:4ff2d3a8b1c9460f@speechsynth\r\n\
        a=cmid:1\r\n\
        m=application 0 TCP/MRCPv2 1\r\n\
        a=cmid:1\r\n\
        m=audio 5000 RTP/AVP 0\r\n\
        a=sendrecv\r\n\
        a=mid:1\r\n";

    fn offered(body: &str) -> Vec<&str> {
        read(body.as_bytes(), true).unwrap().offered().collect()
    }

    #[test]
    fn unimrcp_synthesizer_offer() {
        assert_eq!(offered(SYNTH_OFFER), vec!["speechsynth"]);
    }

    #[test]
    fn two_channels_in_order() {
        assert_eq!(offered(TWO_OFFER), vec!["speechsynth", "speechrecog"]);
    }

    #[test]
    fn answer_settles_by_position() {
        let offer = read(TWO_OFFER.as_bytes(), true).unwrap();
        let answer = read(TWO_ANSWER_RECOG_REJECTED.as_bytes(), false).unwrap();
        assert_eq!(answer.accepted_of(&offer), vec!["speechsynth"]);
        // An answer that accepts without a=channel accepts nothing.
        let bare =
            TWO_ANSWER_RECOG_REJECTED.replace("a=channel:4ff2d3a8b1c9460f@speechsynth\r\n", "");
        let answer = read(bare.as_bytes(), false).unwrap();
        assert!(answer.accepted_of(&offer).is_empty());
        // No SDP sections at all (an answer with only audio): nothing accepted.
        let audio = read(b"v=0\r\nm=audio 5000 RTP/AVP 0\r\n", false).unwrap();
        assert!(audio.accepted_of(&offer).is_empty());
    }

    #[test]
    fn bare_lf_and_blank_lines_are_accepted() {
        let lf = SYNTH_OFFER.replace("\r\n", "\n");
        assert_eq!(offered(&lf), vec!["speechsynth"]);
        let blanks = SYNTH_OFFER.replace("a=cmid:1\r\n", "\r\n\r\na=cmid:1\r\n");
        assert_eq!(offered(&blanks), vec!["speechsynth"]);
    }

    #[test]
    fn folded_lines_are_not_joined() {
        // SDP has no line folding (RFC 4566 5): a continuation line is a line of its own,
        // which the reader skips; a resource folded onto the next line is an empty resource.
        let folded_other = SYNTH_OFFER.replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:0\r\n PCMU/8000");
        assert_eq!(offered(&folded_other), vec!["speechsynth"]);
        let folded_resource =
            SYNTH_OFFER.replace("a=resource:speechsynth", "a=resource:\r\n speechsynth");
        let e = read(folded_resource.as_bytes(), true).unwrap_err();
        assert_eq!(e, SdpError::BadResource(String::new()));
    }

    #[test]
    fn resource_before_or_after_setup() {
        let after = SYNTH_OFFER;
        let before = SYNTH_OFFER.replace(
            "a=setup:active\r\na=connection:new\r\na=resource:speechsynth\r\n",
            "a=resource:speechsynth\r\na=setup:active\r\na=connection:new\r\n",
        );
        assert_ne!(before, after);
        assert_eq!(offered(&before), offered(after));
    }

    #[test]
    fn tls_and_case_insensitive_protocol() {
        let tls = SYNTH_OFFER.replace("TCP/MRCPv2", "tcp/tls/mrcpv2");
        assert_eq!(offered(&tls), vec!["speechsynth"]);
    }

    #[test]
    fn ipv6_connection_lines_change_nothing() {
        let v6 = SYNTH_OFFER
            .replace("IN IP4 127.0.0.1", "IN IP6 ::1")
            .replace("m=audio 4000", "m=audio 4000/2");
        assert_eq!(offered(&v6), vec!["speechsynth"]);
    }

    #[test]
    fn removed_channel_is_not_offered() {
        let removed = TWO_OFFER.replacen("m=application 9", "m=application 0", 1);
        assert_eq!(offered(&removed), vec!["speechrecog"]);
        // A removed channel need not name its resource.
        let bare = removed.replacen("a=resource:speechsynth\r\n", "", 1);
        assert_eq!(offered(&bare), vec!["speechrecog"]);
    }

    #[test]
    fn no_mrcp_channel() {
        let audio_only = "v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 4000 RTP/AVP 0\r\na=resource:x\r\n";
        assert_eq!(offered(audio_only), Vec::<&str>::new());
        assert_eq!(offered("v=0\r\n"), Vec::<&str>::new());
    }

    #[test]
    fn garbage_is_an_error_that_says_what() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "v= line"),
            (b"hello", "v= line"),
            (b"\xff\xfe", "v= line"),
            (b"v=0\r\nm=application\r\n", "does not parse"),
            (b"v=0\r\nm=application x TCP/MRCPv2 1\r\n", "does not parse"),
            (
                b"v=0\r\nm=application 70000 TCP/MRCPv2 1\r\n",
                "does not parse",
            ),
            (b"v=0\r\nm=application 9 TCP/MRCPv2 1\r\n", "no a=resource"),
            (
                b"v=0\r\nm=application 9 TCP/MRCPv2 1\r\na=resource:speech synth\r\n",
                "not a token",
            ),
            (
                b"v=0\r\nm=application 9 TCP/MRCPv2 1\r\na=resource:\r\n",
                "not a token",
            ),
            (
                b"v=0\r\nm=application 9 TCP/MRCPv2 1\r\na=resource:\xc3\xa9\r\n",
                "not a token",
            ),
            (
                b"v=0\r\nm=application 9 TCP/MRCPv2 1\r\na=resource:a\r\na=resource:b\r\n",
                "two a=resource",
            ),
        ];
        for (body, says) in cases {
            let e = read(body, true).unwrap_err().to_string();
            assert!(e.contains(says), "{body:?}: {e}");
        }
        let long = format!(
            "v=0\r\nm=application 9 TCP/MRCPv2 1\r\na=resource:{}\r\n",
            "r".repeat(MAX_RESOURCE_LEN + 1)
        );
        assert!(read(long.as_bytes(), true).is_err());
    }

    #[test]
    fn too_many_channels() {
        let mut body = String::from("v=0\r\n");
        for _ in 0..MAX_CHANNELS {
            body.push_str("m=application 9 TCP/MRCPv2 1\r\na=resource:speechrecog\r\n");
        }
        assert_eq!(offered(&body).len(), MAX_CHANNELS);
        body.push_str("m=application 9 TCP/MRCPv2 1\r\na=resource:speechrecog\r\n");
        assert_eq!(read(body.as_bytes(), true), Err(SdpError::TooManyChannels));
    }

    #[test]
    fn content_type() {
        assert!(is_sdp("application/sdp"));
        assert!(is_sdp("Application/SDP ; charset=utf-8"));
        assert!(!is_sdp("multipart/mixed;boundary=x"));
        assert!(!is_sdp(""));
    }
}
