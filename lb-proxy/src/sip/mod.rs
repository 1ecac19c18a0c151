//! SIP message access: parse, read and rewrite only what a proxy needs.
//!
//! The proxy does not build a full typed model of every header (that is what made parsing the
//! largest cost in earlier SIP proxies): it splits the message into a start line, an ordered list
//! of raw headers and an untouched body, and parses the few headers it reads (Via, Route,
//! Record-Route, From/To tags, CSeq, Max-Forwards, Session-Expires) on demand.

mod header;
mod message;
mod uri;

pub use header::{
    check_name_addr, check_request_uri, header_param, name_addr_uri, split_list, Via,
};
pub use message::{
    bad_request, header_end, HeaderName, Message, Method, ParseError, StartLine, StatusCode,
};
pub use uri::{split_host_port, write_host, SipUri, SipUriRef, Transport, UriError};

/// A header value, a Request-URI or a reason phrase: UTF-8 checked once, when the message was
/// parsed, and then a view of the received bytes (a clone shares them). The values the proxy
/// writes itself are made from owned strings (`Text::from(String)`, no copy).
pub type Text = bytestring::ByteString;

/// The To tag of every response lb-proxy sends statelessly (the transport's `400` to a malformed
/// request, the core's `503` under overload) starts with this. No dialog ever has such a tag,
/// so an ACK that carries one answers such a response and is absorbed.
pub const STATELESS_TAG_PREFIX: &str = "lbx-";

/// Whether a To tag is one of a stateless response ([`STATELESS_TAG_PREFIX`]).
pub fn is_stateless_tag(tag: &str) -> bool {
    tag.starts_with(STATELESS_TAG_PREFIX)
}

/// The RFC 3261 magic cookie that starts every branch this proxy generates.
pub const BRANCH_COOKIE: &str = "z9hG4bK";
