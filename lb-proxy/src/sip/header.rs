//! Reading header values: comma-separated lists, `name-addr` (From, To, Contact, Route),
//! parameters, the Via header, and the grammar checks the parser applies to a Request-URI and
//! to From/To (RFC 3261 20, 25; RFC 4475).

use std::fmt;

use super::uri::{split_host_port, write_host_port_params, SipUri};
use super::Text;

/// The scheme of an absolute URI (`ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) ":"`, RFC 3261
/// 25.1), or None.
pub(super) fn uri_scheme(uri: &str) -> Option<&str> {
    let (scheme, _) = uri.split_once(':')?;
    let mut b = scheme.bytes();
    let first = b.next()?;
    (first.is_ascii_alphabetic() && b.all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c)))
        .then_some(scheme)
}

/// A Request-URI: an absolute URI without characters that a URI never carries unescaped; a
/// `sip:` or `sips:` one must parse as such. Other schemes (`tel:`, and ones nobody knows,
/// RFC 4475 3.3.2) are well formed: the proxy routes INVITEs by load, not by this URI.
pub fn check_request_uri(uri: &str) -> Result<(), String> {
    let Some(scheme) = uri_scheme(uri) else {
        // `<sip:...>` (RFC 4475 3.1.2.7 ltgtruri) and anything else without a scheme.
        return Err(format!("{uri:?} is not an absolute URI"));
    };
    if let Some(c) = uri
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '<' | '>' | '"'))
    {
        return Err(format!("{c:?} in {uri:?}"));
    }
    if scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips") {
        SipUri::check(uri).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A From or To value: `name-addr` or `addr-spec`, then parameters (RFC 3261 20.20, 20.39).
/// Refused: an unterminated quoted string (RFC 4475 3.1.2.6 quotbal), a display name that is
/// neither quoted nor tokens (3.1.2.15 baddn), white space inside the URI (3.1.2.14 badaspec),
/// a URI without a scheme, and an empty parameter.
pub fn check_name_addr(value: &str) -> Result<(), &'static str> {
    let (uri, params) = match find_unquoted(value, '<') {
        Some(lt) => {
            let display = value[..lt].trim();
            let quoted =
                display.starts_with('"') && closing_quote(display) == Some(display.len() - 1);
            if !(display.is_empty() || quoted || display.split_whitespace().all(is_token)) {
                return Err("display name neither quoted nor tokens");
            }
            let rest = &value[lt + 1..];
            let gt = rest.find('>').ok_or("no closing '>'")?;
            // LAQUOT and RAQUOT allow no white space inside the brackets.
            (&rest[..gt], &rest[gt + 1..])
        }
        None => {
            if value.contains('"') {
                // An unterminated quoted string hides the '<' (quotbal).
                return Err("quoted string without an address in <...>");
            }
            let (uri, params) = value.split_at(value.find(';').unwrap_or(value.len()));
            (uri.trim(), params)
        }
    };
    if uri.is_empty() || uri.contains(char::is_whitespace) {
        return Err("white space in the address");
    }
    if uri_scheme(uri).is_none() {
        return Err("address without a scheme");
    }
    let params = params.trim();
    if !params.is_empty() {
        let Some(params) = params.strip_prefix(';') else {
            return Err("text after the address");
        };
        let mut quoted = false;
        let mut escaped = false;
        let mut empty = true;
        for c in params.chars() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ';' if !quoted && empty => return Err("empty parameter"),
                ';' if !quoted => empty = true,
                c if !c.is_whitespace() => empty = false,
                _ => {}
            }
        }
        if empty || quoted {
            return Err("empty parameter or unterminated quoted string");
        }
    }
    Ok(())
}

/// Where the quoted string that `s` starts with ends (the index of its closing quote).
pub(super) fn closing_quote(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// Splits a header value at commas that are outside quotes and angle brackets.
pub fn split_list(value: &str) -> Vec<&str> {
    list_entries(value).0
}

/// As [`split_list`], and whether an entry was empty (`a,,b`, a trailing comma, no value).
pub(super) fn list_entries(value: &str) -> (Vec<&str>, bool) {
    let mut empty = false;
    let mut out = Vec::new();
    let (mut quoted, mut angle, mut escaped) = (false, false, false);
    let mut start = 0;
    for (i, c) in value.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                let part = value[start..i].trim();
                if part.is_empty() {
                    empty = true;
                } else {
                    out.push(part);
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    let part = value[start..].trim();
    if part.is_empty() {
        empty = true;
    } else {
        out.push(part);
    }
    (out, empty)
}

/// The URI inside a name-addr (`"x" <sip:a@b>;tag=1`) or addr-spec (`sip:a@b;tag=1`).
pub fn name_addr_uri(value: &str) -> &str {
    if let Some(start) = find_unquoted(value, '<') {
        let rest = &value[start + 1..];
        if let Some(end) = rest.find('>') {
            return rest[..end].trim();
        }
    }
    // addr-spec form: parameters after ';' belong to the header, not the URI.
    value.split(';').next().unwrap_or(value).trim()
}

/// The first `needle` outside quoted strings (which may hold `\"`, RFC 3261 25.1).
pub(super) fn find_unquoted(value: &str, needle: char) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == needle && !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// A header parameter of a name-addr header (From/To tag), outside the URI.
pub fn header_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let params = match find_unquoted(value, '<') {
        Some(start) => {
            let end = value[start..].find('>')? + start;
            &value[end + 1..]
        }
        None => value.split_once(';').map(|(_, p)| p).unwrap_or(""),
    };
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One Via entry. Parsed from a received header ([`Via::parse_text`]), its parts are views of
/// the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// UDP, TCP, TLS, ... upper-cased.
    pub transport: Text,
    pub host: Text,
    pub port: Option<u16>,
    pub params: Vec<(Text, Option<Text>)>,
}

impl Via {
    /// Parses a Via value held as a `&str` (it is copied once).
    pub fn parse(value: &str) -> Option<Via> {
        Via::parse_text(&Text::from(value))
    }

    /// Parses a Via value; transport (when written in upper case), host and parameters are
    /// views of `value`.
    pub fn parse_text(value: &Text) -> Option<Via> {
        let mut params = Vec::with_capacity(4);
        let (transport, host, port) = Via::scan(value, |k, v| {
            params.push((value.slice_ref(k), v.map(|v| value.slice_ref(v))))
        })?;
        let transport = if transport.bytes().any(|b| b.is_ascii_lowercase()) {
            Text::from(transport.to_ascii_uppercase())
        } else {
            value.slice_ref(transport)
        };
        Some(Via {
            transport,
            host: value.slice_ref(host),
            port,
            params,
        })
    }

    /// The sent-by port of the Via `value` and whether it has `rport`, without building a
    /// Via; None when it does not parse.
    pub fn port_and_rport(value: &str) -> Option<(Option<u16>, bool)> {
        let mut rport = false;
        let (_, _, port) = Via::scan(value, |k, _| rport |= k.eq_ignore_ascii_case("rport"))?;
        Some((port, rport))
    }

    /// Whether `value` parses as a Via, without building one.
    pub fn is_valid(value: &str) -> bool {
        Via::scan(value, |_, _| {}).is_some()
    }

    /// The grammar: transport, host and port, each parameter handed to `param`; all parts of
    /// `value`.
    fn scan<'a>(
        value: &'a str,
        mut param: impl FnMut(&'a str, Option<&'a str>),
    ) -> Option<(&'a str, &'a str, Option<u16>)> {
        let mut parts = value.split(';');
        let proto_host = parts.next()?.trim();
        // sent-protocol: `SIP / 2.0 / UDP`, white space allowed around each slash (SLASH is
        // SWS "/" SWS, RFC 3261 25.1; RFC 4475 3.1.1.1 wsinv), then LWS and the sent-by.
        let mut p = proto_host.splitn(3, '/');
        let (name, version, rest) = (p.next()?, p.next()?, p.next()?);
        if !name.trim().eq_ignore_ascii_case("SIP") || version.trim() != "2.0" {
            return None;
        }
        let (transport, sent_by) = rest.trim_start().split_once(char::is_whitespace)?;
        if !is_token(transport) {
            return None;
        }
        let (host, port) = split_host_port(sent_by.trim())?;
        if host.is_empty() {
            return None;
        }
        // No empty parameter (`;;`, a trailing `;`: RFC 4475 3.1.2.1 badinv01).
        for p in parts {
            let p = p.trim();
            let (k, v) = match p.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (p, None),
            };
            if k.is_empty() {
                return None;
            }
            param(k, v);
        }
        Some((transport.trim(), host, port))
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        super::uri::find_param(&self.params, name)
    }

    pub fn branch(&self) -> Option<&str> {
        self.param("branch").flatten()
    }

    pub fn set_param(&mut self, name: &str, value: Option<String>) {
        match self
            .params
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some((_, v)) => *v = value.map(Text::from),
            None => self
                .params
                .push((Text::from(name.to_string()), value.map(Text::from))),
        }
    }

    /// `host:port` as written, the transaction-matching sent-by.
    pub fn sent_by(&self) -> String {
        let mut s = String::with_capacity(self.host.len() + 8);
        let _ = write_host_port_params::<&str, &str>(&mut s, &self.host, self.port, &[]);
        s
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} ", self.transport)?;
        write_host_port_params(f, &self.host, self.port, &self.params)
    }
}

pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}
