//! SIP URIs (`sip:user@host:port;params?headers`) as far as routing needs them.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// A SIP transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Udp,
    Tcp,
    /// TCP with TLS (RFC 3261 26.2): the same framing as TCP, over an encrypted stream.
    Tls,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }
    pub fn lower(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
    pub fn parse(s: &str) -> Option<Transport> {
        if s.eq_ignore_ascii_case("udp") {
            Some(Transport::Udp)
        } else if s.eq_ignore_ascii_case("tcp") {
            Some(Transport::Tcp)
        } else if s.eq_ignore_ascii_case("tls") {
            Some(Transport::Tls)
        } else {
            None
        }
    }
    /// A connection-oriented stream (TCP or TLS): no retransmissions, responses go back on
    /// the connection the request came on.
    pub fn is_stream(self) -> bool {
        self != Transport::Udp
    }
    /// The default port: 5061 for TLS, 5060 otherwise (RFC 3261 19.1.2).
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Tls => 5061,
            _ => 5060,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.lower())
    }
}

/// A parsed `sip:` or `sips:` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri {
    pub secure: bool,
    pub user: Option<String>,
    /// Host without IPv6 brackets.
    pub host: String,
    pub port: Option<u16>,
    /// URI parameters in order, names as written.
    pub params: Vec<(String, Option<String>)>,
    /// Everything after `?`, kept verbatim.
    pub headers: Option<String>,
}

/// Why a string is no SIP URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("{0:?} is not a sip: or sips: URI")]
    Scheme(String),
    #[error("bad host in {0:?}")]
    Host(String),
    #[error("no host in {0:?}")]
    NoHost(String),
}

impl SipUri {
    pub fn parse(s: &str) -> Result<SipUri, UriError> {
        let p = SipUriRef::parse(s)?;
        Ok(SipUri {
            secure: p.secure,
            user: p.user.map(str::to_string),
            host: p.host.to_string(),
            port: p.port,
            params: p
                .params()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect(),
            headers: p.headers.map(str::to_string),
        })
    }

    /// Whether `s` parses as a SIP URI ([`SipUri::parse`]), without building one.
    pub fn check(s: &str) -> Result<(), UriError> {
        SipUriRef::parse(s).map(|_| ())
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        find_param(&self.params, name)
    }

    pub fn has_param(&self, name: &str) -> bool {
        self.param(name).is_some()
    }

    /// Transport named by the `transport` parameter, defaulting to UDP; a `sips:` URI is
    /// always reached over TLS (RFC 3261 26.2.2: `transport=tcp` there still means TLS).
    pub fn transport(&self) -> Transport {
        transport_of(self.secure, self.param("transport").flatten())
    }

    /// Port, or the default of the URI's transport (5061 for TLS, else 5060).
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or_else(|| self.transport().default_port())
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The socket address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.ip()
            .map(|ip| SocketAddr::new(ip, self.port_or_default()))
    }
}

/// A SIP URI read in place: the grammar of [`SipUri::parse`], each part a view of the text,
/// for the URIs the proxy only reads (Route entries, a Request-URI to match).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SipUriRef<'a> {
    pub secure: bool,
    pub user: Option<&'a str>,
    /// Host without IPv6 brackets.
    pub host: &'a str,
    pub port: Option<u16>,
    /// After the host and port: `;a=b;c`, not yet split.
    params: &'a str,
    pub headers: Option<&'a str>,
}

impl<'a> SipUriRef<'a> {
    pub fn parse(s: &'a str) -> Result<SipUriRef<'a>, UriError> {
        let s = s.trim();
        let (secure, rest) = if let Some(r) = strip_prefix_ci(s, "sip:") {
            (false, r)
        } else if let Some(r) = strip_prefix_ci(s, "sips:") {
            (true, r)
        } else {
            return Err(UriError::Scheme(s.to_string()));
        };
        // The user part may hold `?`, `/` and `;` (RFC 3261 25.1 user-unreserved; RFC 4475
        // 3.1.1.2, 3.1.1.9) but never an unescaped `@`: it ends at the last `@`, and the
        // headers (`?...`) can only follow the host.
        let (user, rest) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let (hostpart, headers) = match rest.split_once('?') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        let (hostport, params) = hostpart.split_at(hostpart.find(';').unwrap_or(hostpart.len()));
        let (host, port) =
            split_host_port(hostport).ok_or_else(|| UriError::Host(s.to_string()))?;
        if host.is_empty() {
            return Err(UriError::NoHost(s.to_string()));
        }
        Ok(SipUriRef {
            secure,
            user,
            host,
            port,
            params,
            headers,
        })
    }

    /// The parameters in order; empty ones skipped. Trimmed: white space at the end of the
    /// last one would not survive being written back (the whole URI is trimmed when read).
    pub fn params(&self) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
        self.params
            .split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (p, None),
            })
    }

    /// As [`SipUri::param`].
    pub fn param(&self, name: &str) -> Option<Option<&'a str>> {
        self.params()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// As [`SipUri::transport`].
    pub fn transport(&self) -> Transport {
        transport_of(self.secure, self.param("transport").flatten())
    }

    /// As [`SipUri::port_or_default`].
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or_else(|| self.transport().default_port())
    }

    /// As [`SipUri::socket_addr`].
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port_or_default()))
    }
}

impl SipUri {
    /// The user part of the SIP URI `s`, without building one: `Err` when `s` is no SIP URI.
    pub fn user_of(s: &str) -> Result<Option<&str>, UriError> {
        SipUriRef::parse(s).map(|p| p.user)
    }

    /// This URI written with `user` as its user part, into one String.
    pub fn to_string_with_user(&self, user: Option<&str>) -> String {
        let params: usize = self
            .params
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len) + 2)
            .sum();
        let mut s = String::with_capacity(
            16 + self.host.len()
                + user.map_or(0, str::len)
                + params
                + self.headers.as_ref().map_or(0, String::len),
        );
        let _ = self.write(&mut s, user);
        s
    }

    fn write(&self, f: &mut impl fmt::Write, user: Option<&str>) -> fmt::Result {
        f.write_str(if self.secure { "sips:" } else { "sip:" })?;
        if let Some(u) = user {
            write!(f, "{u}@")?;
        }
        write_host_port_params(f, &self.host, self.port, &self.params)?;
        if let Some(h) = &self.headers {
            write!(f, "?{h}")?;
        }
        Ok(())
    }
}

impl fmt::Display for SipUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, self.user.as_deref())
    }
}

/// A `;name=value` parameter by case-insensitive name: Some(None) for a flag like `lr`.
pub fn find_param<'a, K: AsRef<str>, V: AsRef<str>>(
    params: &'a [(K, Option<V>)],
    name: &str,
) -> Option<Option<&'a str>> {
    params
        .iter()
        .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref().map(AsRef::as_ref))
}

/// Writes `host[:port][;k[=v]]...`, as a SIP URI and a Via both end.
pub fn write_host_port_params<K: AsRef<str>, V: AsRef<str>>(
    f: &mut impl fmt::Write,
    host: &str,
    port: Option<u16>,
    params: &[(K, Option<V>)],
) -> fmt::Result {
    write_host(f, host)?;
    if let Some(p) = port {
        write!(f, ":{p}")?;
    }
    for (k, v) in params {
        f.write_char(';')?;
        f.write_str(k.as_ref())?;
        if let Some(v) = v {
            f.write_char('=')?;
            f.write_str(v.as_ref())?;
        }
    }
    Ok(())
}

/// Writes a host, bracketing IPv6 literals.
pub fn write_host(f: &mut impl fmt::Write, host: &str) -> fmt::Result {
    if host.contains(':') {
        write!(f, "[{host}]")
    } else {
        f.write_str(host)
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`. Returns None for a malformed port, and
/// for a host that [`write_host`] could not write back in a form that reads the same: brackets
/// must enclose an IPv6 address, a host with several colons must be one, and a bracket may
/// appear nowhere else.
pub fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    let s = s.trim();
    let is_v6 = |h: &str| h.parse::<Ipv6Addr>().is_ok();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':')?.parse().ok()?),
        };
        (&rest[..end], port)
    } else {
        match s.rsplit_once(':') {
            // A bare IPv6 address without brackets has several colons: take it as a host.
            Some((h, _)) if h.contains(':') => (s, None),
            Some((h, p)) => (h, Some(p.parse().ok()?)),
            None => (s, None),
        }
    };
    let must_be_v6 = s.starts_with('[') || host.contains(':');
    if host.contains(['[', ']']) || (must_be_v6 && !is_v6(host)) {
        return None;
    }
    Some((host, port))
}

/// The transport a URI names: TLS for `sips:` whatever its `transport` parameter (RFC 3261
/// 26.2.2), else the parameter's, else UDP.
fn transport_of(secure: bool, param: Option<&str>) -> Transport {
    if secure {
        return Transport::Tls;
    }
    param.and_then(Transport::parse).unwrap_or(Transport::Udp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        let u = SipUri::parse("sip:127.0.0.1:5080").unwrap();
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.port, Some(5080));
        assert_eq!(u.transport(), Transport::Udp);
        let u = SipUri::parse("sip:svc@[::1]:5090;transport=TCP;lr").unwrap();
        assert_eq!(u.user.as_deref(), Some("svc"));
        assert_eq!(u.host, "::1");
        assert_eq!(u.transport(), Transport::Tcp);
        assert!(u.has_param("lr"));
        assert_eq!(u.to_string(), "sip:svc@[::1]:5090;transport=TCP;lr");
        let u = SipUri::parse("SIP:mrcp-0.mrcp.default.svc").unwrap();
        assert_eq!(u.port_or_default(), 5060);
        assert!(u.ip().is_none());
    }

    #[test]
    fn tls_transport_and_default_port() {
        let u = SipUri::parse("sip:127.0.0.1;transport=TLS").unwrap();
        assert_eq!(u.transport(), Transport::Tls);
        assert_eq!(u.port_or_default(), 5061);
        let u = SipUri::parse("sips:mrcp.example").unwrap();
        assert_eq!(u.transport(), Transport::Tls);
        assert_eq!(u.port_or_default(), 5061);
        let u = SipUri::parse("sips:mrcp.example:5099;transport=tcp").unwrap();
        assert_eq!(
            u.transport(),
            Transport::Tls,
            "sips is TLS whatever the parameter"
        );
        let u = SipUri::parse("sip:127.0.0.1;transport=tcp").unwrap();
        assert_eq!(u.port_or_default(), 5060);
        assert!(Transport::Tls.is_stream() && Transport::Tcp.is_stream());
        assert!(!Transport::Udp.is_stream());
        assert_eq!(Transport::parse("tls"), Some(Transport::Tls));
    }

    #[test]
    fn user_part_may_hold_question_marks() {
        // RFC 4475 3.1.1.2 (intmeth): `?` and `/` in the user part are not headers.
        let u = SipUri::parse("sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com")
            .unwrap();
        assert_eq!(u.host, "example.com");
        assert_eq!(u.headers, None);
        assert_eq!(
            u.user.as_deref(),
            Some("1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*")
        );
        let u = SipUri::parse("sip:a@h;lr?subject=x").unwrap();
        assert_eq!(
            (u.host.as_str(), u.headers.as_deref()),
            ("h", Some("subject=x"))
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(SipUri::parse("http://x").is_err());
        assert!(SipUri::parse("sip:").is_err());
        assert!(SipUri::parse("sip:host:99999").is_err());
        assert!(SipUri::parse("sip:[::1").is_err());
    }

    #[test]
    fn hosts_read_back_as_they_are_written() {
        // Found by fuzzing: these were accepted, then written back as `[a]:1:2]`, `[:]:]` or
        // `sip:@ :5072` (from `[ ]`), which no longer parse: a Via the proxy rewrote with
        // received= became unreadable.
        for bad in [
            "a]:1:2",
            ":]:",
            "t2.ex[::1]ample.com",
            "[[::1]",
            "[a]b]:5",
            "[ ]:5072",
            "[]",
            "[example.com]",
            "a:b:c",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad}");
            assert!(SipUri::parse(&format!("sip:{bad}")).is_err(), "{bad}");
        }
        assert_eq!(split_host_port("[::1]:5060"), Some(("::1", Some(5060))));
        assert_eq!(split_host_port("::1"), Some(("::1", None)));
        assert_eq!(
            split_host_port("fe80::1:5060"),
            Some(("fe80::1:5060", None))
        );
        assert_eq!(split_host_port("a b:5"), Some(("a b", Some(5))));
        // Found by fuzzing too: `;transp 03 ;` was read as the parameter `transp 03 `, written
        // at the end of the URI, and read back without its trailing space.
        let u = SipUri::parse("sip:[::1]:5060;transp 03 ;").unwrap();
        assert_eq!(u.params, vec![("transp 03".to_string(), None)]);
        for ok in [
            "sip:[::1]:5060",
            "sip:u@[2001:db8::1];lr",
            "sip:h.example:5",
        ] {
            let u = SipUri::parse(ok).unwrap();
            assert_eq!(SipUri::parse(&u.to_string()).unwrap(), u, "{ok}");
        }
    }

    #[test]
    fn the_view_reads_as_the_owned_uri() {
        for s in [
            "sip:127.0.0.1:5080",
            "sips:a@b.example.com;transport=tcp;lr",
            " SIP:user;x=1@[::1]:5070;TRANSPORT=tls;lb-t=abc?h=1 ",
            "sip:a@b;;lr;",
            "sip:h:99999",
            "sip:[::1",
            "sip:@",
            "tel:+1234",
            "sip:mrcp@10.0.0.1;transport=udp",
        ] {
            let (owned, view) = (SipUri::parse(s), SipUriRef::parse(s));
            assert_eq!(owned.as_ref().err(), view.as_ref().err(), "{s}");
            let (Ok(o), Ok(v)) = (owned, view) else {
                continue;
            };
            assert_eq!(
                (
                    o.secure,
                    o.user.as_deref(),
                    o.host.as_str(),
                    o.port,
                    o.headers.as_deref()
                ),
                (v.secure, v.user, v.host, v.port, v.headers),
                "{s}"
            );
            let params: Vec<(String, Option<String>)> = v
                .params()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect();
            assert_eq!(o.params, params, "{s}");
            assert_eq!(o.transport(), v.transport(), "{s}");
            assert_eq!(o.socket_addr(), v.socket_addr(), "{s}");
            assert_eq!(o.param("lr"), v.param("LR"), "{s}");
            assert_eq!(SipUri::user_of(s), Ok(o.user.as_deref()), "{s}");
            for user in [None, Some("caller")] {
                let mut with = o.clone();
                with.user = user.map(str::to_string);
                assert_eq!(o.to_string_with_user(user), with.to_string(), "{s}");
            }
        }
    }
}
