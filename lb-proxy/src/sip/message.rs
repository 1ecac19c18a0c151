//! The SIP message: start line, ordered raw headers, untouched body.

use bytes::{BufMut, Bytes, BytesMut};
use std::borrow::Cow;
use std::fmt::{self, Write as _};

use std::hash::{Hash, Hasher};

use super::header::{
    check_name_addr, check_request_uri, header_param, is_token, list_entries, Via,
};
use super::{Text, STATELESS_TAG_PREFIX};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Options,
    Update,
    Info,
    Prack,
    Register,
    Subscribe,
    Notify,
    Refer,
    Message,
    Publish,
    Other(String),
}

impl Method {
    pub fn parse(s: &str) -> Method {
        match s {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "OPTIONS" => Method::Options,
            "UPDATE" => Method::Update,
            "INFO" => Method::Info,
            "PRACK" => Method::Prack,
            "REGISTER" => Method::Register,
            "SUBSCRIBE" => Method::Subscribe,
            "NOTIFY" => Method::Notify,
            "REFER" => Method::Refer,
            "MESSAGE" => Method::Message,
            "PUBLISH" => Method::Publish,
            other => Method::Other(other.to_string()),
        }
    }
    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Options => "OPTIONS",
            Method::Update => "UPDATE",
            Method::Info => "INFO",
            Method::Prack => "PRACK",
            Method::Register => "REGISTER",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Message => "MESSAGE",
            Method::Publish => "PUBLISH",
            Method::Other(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request { method: Method, uri: Text },
    Response { code: u16, reason: Text },
}

/// Header names the proxy reads or writes; everything else is carried as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    MaxForwards,
    Route,
    RecordRoute,
    Contact,
    ContentLength,
    ContentType,
    SessionExpires,
    MinSe,
    Supported,
    Require,
    Allow,
    RetryAfter,
    Server,
    UserAgent,
    Reason,
    Other(Text),
}

impl HeaderName {
    pub fn parse(s: &str) -> HeaderName {
        HeaderName::known(s).unwrap_or_else(|| HeaderName::Other(Text::from(s.to_string())))
    }

    /// The name when the proxy knows it, None for any other.
    fn known(s: &str) -> Option<HeaderName> {
        // Lower-case into a small buffer and match: this runs for every header of every
        // message. Compact forms (RFC 3261 7.3.3, RFC 4028) are expanded.
        let mut buf = [0u8; 16];
        let lower = buf.get_mut(..s.len())?;
        for (d, c) in lower.iter_mut().zip(s.bytes()) {
            *d = c.to_ascii_lowercase();
        }
        match &*lower {
            b"via" | b"v" => Some(HeaderName::Via),
            b"from" | b"f" => Some(HeaderName::From),
            b"to" | b"t" => Some(HeaderName::To),
            b"call-id" | b"i" => Some(HeaderName::CallId),
            b"cseq" => Some(HeaderName::CSeq),
            b"max-forwards" => Some(HeaderName::MaxForwards),
            b"route" => Some(HeaderName::Route),
            b"record-route" => Some(HeaderName::RecordRoute),
            b"contact" | b"m" => Some(HeaderName::Contact),
            b"content-length" | b"l" => Some(HeaderName::ContentLength),
            b"content-type" | b"c" => Some(HeaderName::ContentType),
            b"session-expires" | b"x" => Some(HeaderName::SessionExpires),
            b"min-se" => Some(HeaderName::MinSe),
            b"supported" | b"k" => Some(HeaderName::Supported),
            b"require" => Some(HeaderName::Require),
            b"allow" => Some(HeaderName::Allow),
            b"retry-after" => Some(HeaderName::RetryAfter),
            b"server" => Some(HeaderName::Server),
            b"user-agent" => Some(HeaderName::UserAgent),
            b"reason" => Some(HeaderName::Reason),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            HeaderName::Via => "Via",
            HeaderName::From => "From",
            HeaderName::To => "To",
            HeaderName::CallId => "Call-ID",
            HeaderName::CSeq => "CSeq",
            HeaderName::MaxForwards => "Max-Forwards",
            HeaderName::Route => "Route",
            HeaderName::RecordRoute => "Record-Route",
            HeaderName::Contact => "Contact",
            HeaderName::ContentLength => "Content-Length",
            HeaderName::ContentType => "Content-Type",
            HeaderName::SessionExpires => "Session-Expires",
            HeaderName::MinSe => "Min-SE",
            HeaderName::Supported => "Supported",
            HeaderName::Require => "Require",
            HeaderName::Allow => "Allow",
            HeaderName::RetryAfter => "Retry-After",
            HeaderName::Server => "Server",
            HeaderName::UserAgent => "User-Agent",
            HeaderName::Reason => "Reason",
            HeaderName::Other(s) => s,
        }
    }

    /// Headers whose comma-separated values are split into one entry each, so that the proxy
    /// can add and remove single entries (RFC 3261 7.3.1).
    fn is_list(&self) -> bool {
        matches!(
            self,
            HeaderName::Via | HeaderName::Route | HeaderName::RecordRoute
        )
    }
}

/// Why a message could not be used.
#[derive(Debug, Clone)]
pub struct ParseError {
    pub reason: String,
    /// What could be read of the message, when its framing was sound: enough to address a
    /// `400 Bad Request` to its sender.
    pub partial: Option<Box<Message>>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for ParseError {}

/// Header fields that may appear only once and that the proxy, or the framing, reads.
const SINGLE: [HeaderName; 6] = [
    HeaderName::From,
    HeaderName::To,
    HeaderName::CallId,
    HeaderName::CSeq,
    HeaderName::MaxForwards,
    HeaderName::ContentLength,
];

fn perr(reason: impl Into<String>) -> ParseError {
    ParseError {
        reason: reason.into(),
        partial: None,
    }
}

/// A response's status code (RFC 3261 7.2, 21): its class decides what a proxy does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StatusCode(pub u16);

impl StatusCode {
    pub fn as_u16(self) -> u16 {
        self.0
    }

    /// 1xx: the request is being worked on; no final answer yet.
    pub fn is_provisional(self) -> bool {
        self.0 < 200
    }

    /// 2xx: success (for an INVITE: the dialog is confirmed, the ACK goes end to end).
    pub fn is_success(self) -> bool {
        (200..300).contains(&self.0)
    }

    /// 200 to 699: the transaction's answer.
    pub fn is_final(self) -> bool {
        self.0 >= 200
    }
}

impl PartialEq<u16> for StatusCode {
    fn eq(&self, other: &u16) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub start: StartLine,
    /// Values as received are views of the received bytes; the proxy's own are owned.
    pub headers: Vec<(HeaderName, Text)>,
    pub body: Bytes,
}

/// Finds the end of the header section: the index just past the first empty line, CRLF CRLF
/// or (from a lenient peer) LF LF. The first of the two, whatever follows: TCP framing must not
/// depend on how much of the stream has arrived.
pub fn header_end(data: &[u8]) -> Option<usize> {
    let crlf = memchr::memmem::find(data, b"\r\n\r\n").map(|i| i + 4);
    // Only an LF LF before the CRLF CRLF can come first.
    let before = crlf.map_or(data, |end| &data[..end]);
    match memchr::memmem::find(before, b"\n\n") {
        Some(i) => Some(i + 2),
        None => crlf,
    }
}

impl Message {
    /// Parses one whole message (a UDP datagram or a framed TCP message) from a slice: the
    /// bytes are copied once, then as [`Message::parse_bytes`].
    pub fn parse(data: &[u8]) -> Result<Message, ParseError> {
        Message::parse_limited(Bytes::copy_from_slice(data), usize::MAX)
    }

    /// Parses one whole message held in `data`: the start line's URI or reason, the header
    /// values and the body are views of `data`, nothing is copied.
    pub fn parse_bytes(data: Bytes) -> Result<Message, ParseError> {
        Message::parse_limited(data, usize::MAX)
    }

    /// As [`Message::parse`], refusing a message with more than `max_headers` header fields
    /// (each entry of a comma-separated Via, Route or Record-Route counts). Such a message is
    /// malformed; its partial keeps only the Via, From, To, Call-ID and CSeq found within the
    /// limit, enough to address a 400 and no more.
    pub fn parse_limited(data: Bytes, max_headers: usize) -> Result<Message, ParseError> {
        let skip = data.len() - trim_leading_crlf(&data).len();
        let data = data.slice(skip..);
        if data.is_empty() {
            return Err(perr("empty message"));
        }
        let hend = header_end(&data).ok_or_else(|| perr("no end of headers"))?;
        // Validated once: every value below is a view of it.
        let head_text =
            Text::try_from(data.slice(..hend)).map_err(|_| perr("header section is not UTF-8"))?;
        let head: &str = &head_text;
        // A view of the head when `s` lies in it, else (a folded line, joined) a copy.
        let view = |line: &Cow<'_, str>, s: &str| match line {
            Cow::Borrowed(_) => head_text.slice_ref(s),
            Cow::Owned(_) => Text::from(s.to_string()),
        };
        // The start line and at most `max_headers` header lines are looked at.
        let (mut lines, mut overflow) = unfold(head, max_headers.saturating_add(1));
        if lines.is_empty() {
            return Err(perr("no start line"));
        }
        let first = lines.remove(0);
        // A request line that does not parse still names its method: the headers are read so
        // that a 400 can be addressed (RFC 4475 3.1.2.7-10: extra or missing spaces, `<...>`).
        let (start, bad_start) = match parse_start_line(&first, |s| view(&first, s)) {
            Ok(start) => (start, None),
            Err(BadStart { reason, method }) => match method {
                Some(method) => (
                    StartLine::Request {
                        method,
                        uri: Text::new(),
                    },
                    Some(reason),
                ),
                None => return Err(perr(reason)),
            },
        };
        // Room for what a relay adds (Via, Record-Route twice) without growing.
        let mut headers = Vec::with_capacity(lines.len() + 4);
        for line in &lines {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| perr(format!("header line without colon: {line:?}")))?;
            let name = name.trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(perr(format!("bad header name {name:?}")));
            }
            let name =
                HeaderName::known(name).unwrap_or_else(|| HeaderName::Other(view(line, name)));
            let value = value.trim();
            if name.is_list() {
                // One entry, the usual case: no list to build.
                let (entries, empty) = if value.contains(',') {
                    list_entries(value)
                } else {
                    (Vec::new(), value.is_empty())
                };
                if empty {
                    // `Via: a,,b` or an empty value (RFC 3261 7.3.1: no empty elements;
                    // RFC 4475 3.1.2.1).
                    let msg = Message {
                        start,
                        headers,
                        body: Bytes::new(),
                    };
                    let reason = format!("empty entry in {} {value:?}", name.as_str());
                    return Err(msg.invalid(reason));
                }
                if entries.is_empty() {
                    headers.push((name.clone(), view(line, value)));
                }
                for v in entries {
                    headers.push((name.clone(), view(line, v)));
                }
            } else {
                headers.push((name, view(line, value)));
            }
            if headers.len() > max_headers {
                overflow = true;
                break;
            }
        }
        if overflow {
            headers.truncate(max_headers);
            headers.retain(|(n, _)| {
                matches!(
                    n,
                    HeaderName::Via
                        | HeaderName::From
                        | HeaderName::To
                        | HeaderName::CallId
                        | HeaderName::CSeq
                )
            });
            let msg = Message {
                start,
                headers,
                body: Bytes::new(),
            };
            return Err(msg.invalid(format!("more than {max_headers} header fields")));
        }
        drop(lines);
        let mut body = data.slice(hend..);
        let mut msg = Message {
            start,
            headers,
            body: Bytes::new(),
        };
        if let Some(reason) = bad_start {
            return Err(msg.invalid(reason));
        }
        // Fields that may appear once (RFC 3261 7.3.1, 20): with two, the proxy and the next
        // hop could each read another one (RFC 4475 3.3.8 multi01, 3.3.9 mcl01).
        for h in &SINGLE {
            if msg.count(h) > 1 {
                let reason = format!("more than one {} header", h.as_str());
                return Err(msg.invalid(reason));
            }
        }
        if let Some(cl) = msg.get(&HeaderName::ContentLength) {
            let cl: usize = match cl.trim().parse() {
                Ok(n) => n,
                Err(_) => {
                    let reason = format!("bad Content-Length {cl:?}");
                    return Err(msg.invalid(reason));
                }
            };
            if cl > body.len() {
                return Err(msg.invalid(format!(
                    "Content-Length {cl} but only {} body bytes",
                    body.len()
                )));
            }
            body.truncate(cl);
        }
        msg.body = body;
        msg.check_essentials()
    }

    fn invalid(self, reason: String) -> ParseError {
        ParseError {
            reason,
            partial: Some(Box::new(self)),
        }
    }

    /// The headers every request and response must have, readable (RFC 3261 8.1.1).
    fn check_essentials(self) -> Result<Message, ParseError> {
        for h in [
            HeaderName::Via,
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
            HeaderName::CSeq,
        ] {
            if self.get(&h).is_none() {
                let reason = format!("missing {} header", h.as_str());
                return Err(self.invalid(reason));
            }
        }
        let Some((_, cseq_method)) = self.cseq() else {
            let value = self.get(&HeaderName::CSeq).unwrap_or_default();
            let reason = format!("bad CSeq {value:?}");
            return Err(self.invalid(reason));
        };
        if let StartLine::Request { method, .. } = &self.start {
            if *method != cseq_method {
                let reason = format!("CSeq method {cseq_method} differs from {method}");
                return Err(self.invalid(reason));
            }
        }
        if !self.get(&HeaderName::Via).is_some_and(Via::is_valid) {
            let value = self.get(&HeaderName::Via).unwrap_or_default();
            let reason = format!("bad Via {value:?}");
            return Err(self.invalid(reason));
        }
        if let Some(mf) = self.get(&HeaderName::MaxForwards) {
            if mf.trim().parse::<u32>().is_err() {
                let reason = format!("bad Max-Forwards {mf:?}");
                return Err(self.invalid(reason));
            }
        }
        if let StartLine::Request { uri, .. } = &self.start {
            if let Err(e) = check_request_uri(uri) {
                return Err(self.invalid(format!("bad Request-URI: {e}")));
            }
        }
        for h in [HeaderName::From, HeaderName::To] {
            let value = self.get(&h).unwrap_or_default();
            if let Err(e) = check_name_addr(value) {
                let reason = format!("bad {} {value:?}: {e}", h.as_str());
                return Err(self.invalid(reason));
            }
        }
        Ok(self)
    }

    /// A new request with no headers and no body.
    pub fn request(method: Method, uri: &str) -> Message {
        Message {
            start: StartLine::Request {
                method,
                uri: Text::from(uri.to_string()),
            },
            headers: Vec::with_capacity(10),
            body: Bytes::new(),
        }
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    pub fn method(&self) -> Option<&Method> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    /// The status of a response, as a [`StatusCode`] whose class says what it means.
    pub fn status(&self) -> Option<StatusCode> {
        self.code().map(StatusCode)
    }

    pub fn code(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    pub fn request_uri(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    pub fn set_request_uri(&mut self, new: impl Into<Text>) {
        if let StartLine::Request { uri, .. } = &mut self.start {
            *uri = new.into();
        }
    }

    pub fn get(&self, name: &HeaderName) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| &**v)
    }

    /// The first header of that name as held: a clone shares the bytes.
    pub fn get_text(&self, name: &HeaderName) -> Option<&Text> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn get_all<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| &**v)
    }

    pub fn count(&self, name: &HeaderName) -> usize {
        self.headers.iter().filter(|(n, _)| n == name).count()
    }

    /// Removes and returns the first header of that name.
    pub fn remove_first(&mut self, name: &HeaderName) -> Option<Text> {
        let i = self.headers.iter().position(|(n, _)| n == name)?;
        Some(self.headers.remove(i).1)
    }

    pub fn remove_all(&mut self, name: &HeaderName) {
        self.headers.retain(|(n, _)| n != name);
    }

    /// Inserts a header above the first of its name (at the top when there is none).
    pub fn push_front(&mut self, name: HeaderName, value: impl Into<Text>) {
        let i = self
            .headers
            .iter()
            .position(|(n, _)| *n == name)
            .unwrap_or(0);
        self.headers.insert(i, (name, value.into()));
    }

    /// Appends a header at the end.
    pub fn push(&mut self, name: HeaderName, value: impl Into<Text>) {
        self.headers.push((name, value.into()));
    }

    /// Replaces the first header of that name, or appends one.
    pub fn set(&mut self, name: HeaderName, value: impl Into<Text>) {
        let value = value.into();
        match self.headers.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => *v = value,
            None => self.headers.push((name, value)),
        }
    }

    pub fn call_id(&self) -> Option<&str> {
        self.get(&HeaderName::CallId)
    }

    pub fn cseq(&self) -> Option<(u32, Method)> {
        let v = self.get(&HeaderName::CSeq)?;
        let mut it = v.split_whitespace();
        let n = it.next()?.parse().ok()?;
        let m = Method::parse(it.next()?);
        if it.next().is_some() {
            return None;
        }
        Some((n, m))
    }

    pub fn from_tag(&self) -> Option<&str> {
        header_param(self.get(&HeaderName::From)?, "tag")
    }

    pub fn to_tag(&self) -> Option<&str> {
        header_param(self.get(&HeaderName::To)?, "tag")
    }

    pub fn top_via(&self) -> Option<Via> {
        Via::parse_text(self.get_text(&HeaderName::Via)?)
    }

    pub fn max_forwards(&self) -> Option<u32> {
        self.get(&HeaderName::MaxForwards)?.trim().parse().ok()
    }

    /// Serialises with a Content-Length that matches the body.
    /// One buffer of the exact size (up to the digits of the Content-Length), each part
    /// written into it once.
    pub fn to_bytes(&self) -> Bytes {
        // "SIP/2.0 " + code + " " + CRLF, or method + " " + " SIP/2.0" + CRLF; the
        // Content-Length line with up to 20 digits, the empty line, the body.
        let mut cap = 16 + 20 + 20 + self.body.len();
        cap += match &self.start {
            StartLine::Request { method, uri } => method.as_str().len() + uri.len(),
            StartLine::Response { reason, .. } => reason.len(),
        };
        for (n, v) in &self.headers {
            cap += n.as_str().len() + v.len() + 4;
        }
        let mut out = BytesMut::with_capacity(cap);
        match &self.start {
            StartLine::Request { method, uri } => {
                out.put_slice(method.as_str().as_bytes());
                out.put_u8(b' ');
                out.put_slice(uri.as_bytes());
                out.put_slice(b" SIP/2.0\r\n");
            }
            StartLine::Response { code, reason } => {
                out.put_slice(b"SIP/2.0 ");
                let _ = write!(out, "{code}");
                out.put_u8(b' ');
                out.put_slice(reason.as_bytes());
                out.put_slice(b"\r\n");
            }
        }
        for (n, v) in &self.headers {
            if *n == HeaderName::ContentLength {
                continue;
            }
            out.put_slice(n.as_str().as_bytes());
            out.put_slice(b": ");
            out.put_slice(v.as_bytes());
            out.put_slice(b"\r\n");
        }
        out.put_slice(b"Content-Length: ");
        let _ = write!(out, "{}", self.body.len());
        out.put_slice(b"\r\n\r\n");
        out.put_slice(&self.body);
        out.freeze()
    }

    /// A response to this request, copying Via, From, To, Call-ID and CSeq (RFC 3261 8.2.6);
    /// of From, To, Call-ID and CSeq only the first (a 400 may answer a request that had two).
    pub fn response(&self, code: u16, reason: &str) -> Message {
        let mut headers: Vec<(HeaderName, Text)> = Vec::with_capacity(8);
        for (n, v) in &self.headers {
            match n {
                HeaderName::Via => headers.push((n.clone(), v.clone())),
                HeaderName::From | HeaderName::To | HeaderName::CallId | HeaderName::CSeq
                    if !headers.iter().any(|(h, _)| h == n) =>
                {
                    headers.push((n.clone(), v.clone()))
                }
                _ => {}
            }
        }
        Message {
            start: StartLine::Response {
                code,
                reason: Text::from(reason.to_string()),
            },
            headers,
            body: Bytes::new(),
        }
    }
}

fn trim_leading_crlf(mut data: &[u8]) -> &[u8] {
    while let [b'\r' | b'\n', rest @ ..] = data {
        data = rest;
    }
    data
}

/// Splits the header section into logical lines, joining folded continuation lines. Collects
/// at most `max` lines; the flag tells whether more followed.
fn unfold(head: &str, max: usize) -> (Vec<Cow<'_, str>>, bool) {
    let mut lines: Vec<Cow<'_, str>> = Vec::with_capacity(16);
    for raw in head.split('\n') {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = lines.last_mut() {
                let joined = last.to_mut();
                joined.push(' ');
                joined.push_str(line.trim());
                continue;
            }
        }
        if lines.len() >= max {
            return (lines, true);
        }
        lines.push(Cow::Borrowed(line));
    }
    (lines, false)
}

/// A start line that does not parse, and the method when it is a request line whose first
/// word is one (then a 400 can still be addressed).
struct BadStart {
    reason: String,
    method: Option<Method>,
}

/// `view` makes the URI or reason, a part of `line`, into a [`Text`].
fn parse_start_line(line: &str, view: impl Fn(&str) -> Text) -> Result<StartLine, BadStart> {
    if let Some(rest) = line.strip_prefix("SIP/2.0 ") {
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        let code: u16 = code
            .parse()
            .ok()
            .filter(|c| (100..700).contains(c))
            .ok_or_else(|| BadStart {
                reason: format!("bad status code in {line:?}"),
                method: None,
            })?;
        return Ok(StartLine::Response {
            code,
            reason: view(reason),
        });
    }
    let first = line.split(' ').next().unwrap_or_default();
    let bad = |reason: String| BadStart {
        reason,
        method: (is_token(first) && first.len() < line.len() && !line.starts_with("SIP/"))
            .then(|| Method::parse(first)),
    };
    // Exactly one SP between the three elements, none around them (RFC 3261 25.1; RFC 4475
    // 3.1.2.8 lwsruri, 3.1.2.9 lwsstart, 3.1.2.10 trws).
    let mut it = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(bad(format!("bad request line {line:?}")));
    };
    if version != "SIP/2.0" {
        return Err(bad(format!("unsupported version {version:?}")));
    }
    if !is_token(method) {
        return Err(bad(format!("bad method {method:?}")));
    }
    if uri.is_empty() {
        return Err(bad("empty Request-URI".to_string()));
    }
    Ok(StartLine::Request {
        method: Method::parse(method),
        uri: view(uri),
    })
}

/// A `400 Bad Request` for a malformed request whose framing was sound and whose Via,
/// From, To, Call-ID and CSeq can still be copied; None when no response can be addressed
/// (a response, an ACK, or too little readable).
pub fn bad_request(e: &ParseError) -> Option<Bytes> {
    let msg = e.partial.as_deref()?;
    match msg.method() {
        None | Some(Method::Ack) => return None,
        Some(_) => {}
    }
    for h in [
        HeaderName::From,
        HeaderName::To,
        HeaderName::CallId,
        HeaderName::CSeq,
    ] {
        msg.get(&h)?;
    }
    let via = msg.top_via()?;
    let mut resp = msg.response(400, "Bad Request");
    // A To tag, so that the ACK of a 400 to an INVITE can be matched (RFC 3261 17.1.1.3) and
    // absorbed by the core (`STATELESS_TAG_PREFIX`). The same for every retransmission.
    if msg.to_tag().is_none() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (msg.call_id(), msg.from_tag(), via.branch()).hash(&mut h);
        let tag = format!("{STATELESS_TAG_PREFIX}{:016x}", h.finish());
        if let Some(to) = resp.headers.iter_mut().find(|(n, _)| *n == HeaderName::To) {
            to.1 = Text::from(format!("{};tag={tag}", to.1));
        }
    }
    let reason: String = e
        .reason
        .chars()
        .filter(|c| *c != '"' && !c.is_control())
        .take(200)
        .collect();
    resp.push(
        HeaderName::Other("Warning".into()),
        format!("399 mrcp-lb \"{reason}\""),
    );
    Some(resp.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{name_addr_uri, split_list};

    const INVITE: &str = "INVITE sip:127.0.0.1:5060 SIP/2.0\r\n\
v: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK-1;rport, SIP/2.0/TCP 10.0.0.2;branch=z9hG4bK-0\r\n\
Max-Forwards: 70\r\n\
f: \"Alice, A.\" <sip:alice@10.0.0.1:5070>;tag=abc\r\n\
To: <sip:127.0.0.1:5060>\r\n\
Call-ID: 1-2@10.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Subject: folded\r\n line\r\n\
Contact: <sip:alice@10.0.0.1:5070;transport=udp>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\nTRAILING";

    #[test]
    fn parses_an_invite() {
        let m = Message::parse(INVITE.as_bytes()).unwrap();
        assert_eq!(m.method(), Some(&Method::Invite));
        assert_eq!(m.count(&HeaderName::Via), 2, "comma-separated Via is split");
        let via = m.top_via().unwrap();
        assert_eq!(via.transport, "UDP");
        assert_eq!(via.host, "10.0.0.1");
        assert_eq!(via.port, Some(5070));
        assert_eq!(via.branch(), Some("z9hG4bK-1"));
        assert_eq!(via.param("rport"), Some(None));
        assert_eq!(m.from_tag(), Some("abc"));
        assert_eq!(m.to_tag(), None);
        assert_eq!(m.cseq(), Some((1, Method::Invite)));
        assert_eq!(
            m.get(&HeaderName::Other("Subject".into())),
            Some("folded line")
        );
        assert_eq!(&m.body[..], b"v=0\n", "body cut at Content-Length");
    }

    #[test]
    fn serialises_with_fresh_content_length() {
        let mut m = Message::parse(INVITE.as_bytes()).unwrap();
        m.body = Bytes::from_static(b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n");
        let out = m.to_bytes();
        let again = Message::parse(&out).unwrap();
        assert_eq!(again.body, m.body);
        assert_eq!(again.get(&HeaderName::ContentLength), Some("29"));
        assert_eq!(again.count(&HeaderName::Via), 2);
    }

    #[test]
    fn output_is_valid_sip_for_an_independent_parser() {
        let m = Message::parse(INVITE.as_bytes()).unwrap();
        let out = m.to_bytes();
        let parsed = rsip::SipMessage::try_from(out.as_ref()).expect("rsip parses our output");
        assert!(parsed.is_request());
    }

    #[test]
    fn rejects_malformed_with_reason_and_partial() {
        let e =
            Message::parse(b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\n")
                .unwrap_err();
        assert!(e.reason.contains("From"), "{}", e.reason);
        assert!(e.partial.is_some());
        let e = Message::parse(b"garbage\r\n\r\n").unwrap_err();
        assert!(e.partial.is_none());
        let short = INVITE.replace("Content-Length: 4", "Content-Length: 400");
        assert!(Message::parse(short.as_bytes()).is_err());
        let bad_cseq = INVITE.replace("CSeq: 1 INVITE", "CSeq: one INVITE");
        let e = Message::parse(bad_cseq.as_bytes()).unwrap_err();
        assert_eq!(
            e.reason, "bad CSeq \"one INVITE\"",
            "names the field and its value"
        );
        let wrong = INVITE.replace("CSeq: 1 INVITE", "CSeq: 1 BYE");
        assert!(Message::parse(wrong.as_bytes()).is_err());
        assert!(Message::parse(b"").is_err());
        assert!(Message::parse(&[0xff, 0xfe, b'\r', b'\n', b'\r', b'\n']).is_err());
    }

    #[test]
    fn bad_request_is_addressed_when_possible() {
        let no_cseq_number = INVITE.replace("CSeq: 1 INVITE", "CSeq: x INVITE");
        let e = Message::parse(no_cseq_number.as_bytes()).unwrap_err();
        let resp = bad_request(&e).expect("a 400 can be addressed");
        let resp = String::from_utf8(resp.to_vec()).unwrap();
        assert!(resp.starts_with("SIP/2.0 400 Bad Request\r\n"), "{resp}");
        assert!(resp.contains("Call-ID: 1-2@10.0.0.1"));
        assert!(resp.contains("Warning: 399 mrcp-lb"));
        let e =
            Message::parse(b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\n")
                .unwrap_err();
        assert!(
            bad_request(&e).is_none(),
            "no From/To/Call-ID: cannot answer"
        );
    }

    /// An INVITE with `pad` extra header lines after its essential headers, and `vias`
    /// comma-separated entries in its one Via line.
    fn padded(pad: usize, vias: usize) -> String {
        let mut via = String::from("SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK-1");
        for i in 1..vias {
            via.push_str(&format!(", SIP/2.0/UDP 10.0.0.{i};branch=z9hG4bK-x{i}"));
        }
        let mut m = format!(
            "INVITE sip:127.0.0.1 SIP/2.0\r\nVia: {via}\r\nFrom: <sip:a@b>;tag=1\r\n\
             To: <sip:c@d>\r\nCall-ID: many@x\r\nCSeq: 1 INVITE\r\n"
        );
        for i in 0..pad {
            m.push_str(&format!("X-Pad-{i}: {i}\r\n"));
        }
        m.push_str("Content-Length: 0\r\n\r\n");
        m
    }

    #[test]
    fn header_limit() {
        // 5 essentials + Content-Length + 10 pads = 16 fields.
        let m = padded(10, 1);
        assert!(Message::parse_limited(Bytes::from(m.clone()), 16).is_ok());
        let e = Message::parse_limited(Bytes::from(m.clone()), 15).unwrap_err();
        assert!(
            e.reason.contains("more than 15 header fields"),
            "{}",
            e.reason
        );
        let partial = e.partial.as_deref().expect("a partial to answer with");
        assert_eq!(partial.headers.len(), 5, "only the essentials are kept");
        let resp = bad_request(&e).expect("a 400 can be addressed");
        let resp = String::from_utf8(resp.to_vec()).unwrap();
        assert!(resp.starts_with("SIP/2.0 400 "), "{resp}");
        assert!(resp.contains("Call-ID: many@x"), "{resp}");
        assert!(!resp.contains("X-Pad"), "{resp}");

        // Entries of a comma-separated Via count one by one.
        let m = padded(0, 20);
        assert!(Message::parse(m.as_bytes()).is_ok());
        let e = Message::parse_limited(Bytes::from(m.clone()), 12).unwrap_err();
        let partial = e.partial.as_deref().unwrap();
        assert_eq!(partial.count(&HeaderName::Via), 12);
        assert!(
            bad_request(&e).is_none(),
            "From beyond the limit: cannot answer"
        );

        // A huge header section: the essentials past the limit are not looked for.
        let mut m = String::from("INVITE sip:x SIP/2.0\r\n");
        for i in 0..5000 {
            m.push_str(&format!("X-{i}: y\r\n"));
        }
        m.push_str("Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\n");
        let e = Message::parse_limited(Bytes::from(m.clone()), 128).unwrap_err();
        assert!(e.reason.contains("more than 128"), "{}", e.reason);
        assert!(bad_request(&e).is_none());
    }

    #[test]
    fn header_end_is_the_first_empty_line() {
        // Found by fuzzing the TCP framing: an LF LF was only looked for when no CRLF CRLF was
        // in the buffer, so the same bytes were framed at the LF LF when the rest had not
        // arrived yet, and at a later CRLF CRLF (of the body, or of the next message) when it
        // had.
        assert_eq!(header_end(b"\0\n\n\r\n\r\n"), Some(3));
        assert_eq!(header_end(b"A\r\nB: c\n\nbody\r\n\r\n"), Some(9));
        assert_eq!(header_end(b"A\r\nB: c\r\n\r\nbody\n\n"), Some(11));
        assert_eq!(header_end(b"A\r\nB: c\r\n"), None);
        // A message with LF line ends and a CRLF body: headers end at the LF LF.
        let lf =
            "OPTIONS sip:x SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\nFrom: <sip:a@b>;tag=1\n\
                  To: <sip:x>\nCall-ID: c\nCSeq: 1 OPTIONS\nContent-Length: 8\n\nv=0\r\n\r\n\r\n";
        let m = Message::parse(lf.as_bytes()).unwrap();
        assert_eq!(&m.body[..], b"v=0\r\n\r\n\r");
    }

    #[test]
    fn rfc4475_shapes() {
        // wsinv: white space around the slashes of the Via's protocol.
        let v = Via::parse("SIP  /   2.0 /UDP 192.0.2.2;branch=390skdjuw").unwrap();
        assert_eq!((&*v.transport, &*v.host), ("UDP", "192.0.2.2"));
        assert_eq!(v.to_string(), "SIP/2.0/UDP 192.0.2.2;branch=390skdjuw");
        // badinv01: empty parameters.
        assert!(Via::parse("SIP/2.0/UDP 192.0.2.15;;").is_none());
        // wsinv: an escaped quote and an escaped backslash in a display name.
        let from = r#""J Rosenberg \"" <sip:jdrosen@example.com> ; tag = 98asjd8"#;
        assert_eq!(name_addr_uri(from), "sip:jdrosen@example.com");
        assert_eq!(header_param(from, "tag"), Some("98asjd8"));
        assert!(check_name_addr(from).is_ok());
        for bad in [
            r#""Mr. J. User <sip:j.user@example.com>"#,
            "Bell, Alexander <sip:a.g.bell@example.com>;tag=43",
            r#""Watson, Thomas" < sip:t.watson@example.org >"#,
            "<sip:a@b>;;tag=1",
            "<a@b>",
        ] {
            assert!(check_name_addr(bad).is_err(), "{bad}");
        }
        for good in [
            "caller<sip:caller@example.com>;tag=323",
            "isbn:2983792873",
            "<http://www.example.com>;tag=3234233",
            "sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n",
            r#"A <sip:a@b>;x=";;";tag=1"#,
        ] {
            assert!(check_name_addr(good).is_ok(), "{good}");
        }
        // An empty entry in a list.
        let two_vias = INVITE.replace("branch=z9hG4bK-0", "branch=z9hG4bK-0,");
        let e = Message::parse(two_vias.as_bytes()).unwrap_err();
        assert!(e.reason.starts_with("empty entry in Via"), "{}", e.reason);
        // Two From: the 400 copies the first only, and parses.
        let two = INVITE.replace("To: ", "From: <sip:b@x>;tag=2\r\nTo: ");
        let e = Message::parse(two.as_bytes()).unwrap_err();
        assert_eq!(e.reason, "more than one From header");
        let resp = Message::parse(&bad_request(&e).unwrap()).unwrap();
        assert_eq!(resp.from_tag(), Some("abc"));
    }

    #[test]
    fn list_split_respects_quotes_and_brackets() {
        assert_eq!(
            split_list("<sip:a;x=1,2>, \"b,c\" <sip:b>,sip:c"),
            vec!["<sip:a;x=1,2>", "\"b,c\" <sip:b>", "sip:c"]
        );
    }

    #[test]
    fn name_addr_helpers() {
        assert_eq!(name_addr_uri("\"A <x>\" <sip:a@b>;tag=1"), "sip:a@b");
        assert_eq!(name_addr_uri("sip:a@b;tag=1"), "sip:a@b");
        assert_eq!(header_param("<sip:a@b;tag=no>;tag=yes", "tag"), Some("yes"));
        assert_eq!(header_param("sip:a@b;tag=1", "tag"), Some("1"));
        assert_eq!(header_param("<sip:a@b>", "tag"), None);
    }

    #[test]
    fn via_round_trip_ipv6() {
        let v = Via::parse("SIP/2.0/tcp [::1]:5060;branch=z9hG4bKx;received=::1").unwrap();
        assert_eq!(v.host, "::1");
        assert_eq!(
            v.to_string(),
            "SIP/2.0/TCP [::1]:5060;branch=z9hG4bKx;received=::1"
        );
        assert!(Via::parse("SIP/2.0/UDP").is_none());
        assert!(Via::parse("HTTP/1.1/UDP h").is_none());
    }
}
