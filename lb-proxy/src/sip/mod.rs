//! SIP message access: parse, read and rewrite only what a proxy needs.
//!
//! The proxy does not build a full typed model of every header (that is what made parsing the
//! largest cost in earlier SIP proxies): it splits the message into a start line, an ordered list
//! of raw headers and an untouched body, and parses the few headers it reads (Via, Route,
//! Record-Route, From/To tags, CSeq, Max-Forwards, Session-Expires) on demand.

mod message;
mod uri;

pub use message::{
    bad_request, header_end, header_param, name_addr_uri, split_list, HeaderName, Message, Method,
    ParseError, StartLine, Via,
};
pub use uri::{split_host_port, write_host, SipUri, Transport};

/// The RFC 3261 magic cookie that starts every branch this proxy generates.
pub const BRANCH_COOKIE: &str = "z9hG4bK";
