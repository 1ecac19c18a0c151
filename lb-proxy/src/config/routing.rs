//! What a new session is counted against (`routing.resources`, `routing.sdp`) and which group
//! of destinations it goes to (`routing.pools`).
//!
//! OpenSIPS' script decides both in one call, `lb_start(1, "pstn")`, usually behind `if`s on
//! the Request-URI: here the fixed list is the default, `resources: sdp` counts the MRCPv2
//! channels of each offer instead (docs/configuration.md, "SDP routing"), and the pools are
//! the `if`s.

use lb_api::FieldError;
use regex::Regex;
use serde::{Deserialize, Deserializer};

use crate::sip::{HeaderName, Message, SipUri};

/// What the sessions arriving on a listener are counted against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resources {
    /// The same resources for every session, one unit each (OpenSIPS `lb_start(1, "pstn")`).
    Fixed(Vec<String>),
    /// The MRCPv2 channels of the session's SDP offer, one unit each, plus
    /// `routing.sdp.perSession`.
    Sdp,
}

/// `routing.sdp`: SDP routing's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdpRouting {
    /// Taken by every session on top of its channels (e.g. `pstn` for the media leg).
    pub per_session: Vec<String>,
    /// Taken by a session whose INVITE has no MRCPv2 channel (or no SDP); empty: such an
    /// INVITE is answered 488.
    pub fallback: Vec<String>,
    /// A 406 from a destination fails the session over and keeps that destination from the
    /// session's resources for a probe interval.
    pub not_acceptable: bool,
}

impl Default for SdpRouting {
    fn default() -> Self {
        SdpRouting {
            per_session: Vec::new(),
            fallback: Vec::new(),
            not_acceptable: true,
        }
    }
}

/// `routing.pools[]`: new sessions that match go to `group`.
#[derive(Debug, Clone)]
pub struct Pool {
    /// On the Request-URI's user part (empty when it has none).
    pub user: Option<Regex>,
    /// On the value of a header (any of its instances).
    pub header: Option<(HeaderName, Regex)>,
    pub group: u32,
}

impl Pool {
    /// Every condition given holds for `msg`.
    pub fn matches(&self, msg: &Message) -> bool {
        if let Some(re) = &self.user {
            let user = msg
                .request_uri()
                .and_then(|u| SipUri::user_of(u).ok())
                .flatten()
                .unwrap_or_default();
            if !re.is_match(user) {
                return false;
            }
        }
        if let Some((name, re)) = &self.header {
            let found = msg
                .headers
                .iter()
                .filter(|(n, _)| n.as_str().eq_ignore_ascii_case(name.as_str()))
                .any(|(_, v)| re.is_match(v));
            if !found {
                return false;
            }
        }
        true
    }
}

/// The group of the first pool `msg` matches.
pub fn pool_group(pools: &[Pool], msg: &Message) -> Option<u32> {
    pools.iter().find(|p| p.matches(msg)).map(|p| p.group)
}

/// `resources:` as written: a list, or the word `sdp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RawResources {
    List(Vec<String>),
    Word(String),
}

impl<'de> Deserialize<'de> for RawResources {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawResources;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of resources such as [pstn], or \"sdp\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawResources, E> {
                Ok(RawResources::Word(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<RawResources, A::Error> {
                Vec::<String>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(RawResources::List)
            }
        }
        d.deserialize_any(V)
    }
}

impl RawResources {
    pub(super) fn build(&self, field: &str) -> Result<Resources, FieldError> {
        match self {
            RawResources::Word(w) if w == "sdp" => Ok(Resources::Sdp),
            RawResources::Word(w) => Err(FieldError::new(
                field,
                format!("{w:?} is neither a list of resources such as [pstn] nor \"sdp\""),
            )),
            RawResources::List(l) if l.is_empty() => {
                Err(FieldError::new(field, "must name at least one resource"))
            }
            RawResources::List(l) => {
                names(l, field)?;
                Ok(Resources::Fixed(l.clone()))
            }
        }
    }
}

/// Resource names are tokens, as the annotation and the SDP write them.
fn names(list: &[String], field: &str) -> Result<(), FieldError> {
    for (i, n) in list.iter().enumerate() {
        if !crate::sdp::is_resource_name(n.as_bytes()) {
            return Err(FieldError::new(
                format!("{field}[{i}]"),
                format!("{n:?} is not a resource name (letters, digits, - _ .)"),
            ));
        }
    }
    Ok(())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawSdp {
    per_session: Vec<String>,
    fallback: Vec<String>,
    not_acceptable: Option<bool>,
}

impl RawSdp {
    pub(super) fn build(&self) -> Result<SdpRouting, FieldError> {
        names(&self.per_session, "routing.sdp.perSession")?;
        names(&self.fallback, "routing.sdp.fallback")?;
        Ok(SdpRouting {
            per_session: self.per_session.clone(),
            fallback: self.fallback.clone(),
            not_acceptable: self.not_acceptable.unwrap_or(true),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawPool {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    value: Option<String>,
    group: u32,
}

/// The most a pool's pattern may compile to: a pattern is run on every new INVITE.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn pattern(p: &str, field: String) -> Result<Regex, FieldError> {
    regex::RegexBuilder::new(p)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            // The regex crate's message spans several lines; its last line says what is wrong.
            let why = e.to_string();
            let why = why.lines().last().unwrap_or_default().trim().to_string();
            FieldError::new(field, format!("{p:?} is not a regular expression: {why}"))
        })
}

impl RawPool {
    pub(super) fn build(&self, i: usize) -> Result<Pool, FieldError> {
        let field = format!("routing.pools[{i}]");
        let user = match &self.user {
            Some(p) => Some(pattern(p, format!("{field}.user"))?),
            None => None,
        };
        let header = match (&self.header, &self.value) {
            (Some(h), Some(v)) => {
                let ok = !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic() && b != b':');
                if !ok {
                    return Err(FieldError::new(
                        format!("{field}.header"),
                        format!("{h:?} is not a header name"),
                    ));
                }
                Some((HeaderName::parse(h), pattern(v, format!("{field}.value"))?))
            }
            (Some(_), None) => {
                return Err(FieldError::new(
                    format!("{field}.value"),
                    "a header rule needs the pattern its value must match",
                ))
            }
            (None, Some(_)) => {
                return Err(FieldError::new(
                    format!("{field}.header"),
                    "`value` needs the header it applies to",
                ))
            }
            (None, None) => None,
        };
        if user.is_none() && header.is_none() {
            return Err(FieldError::new(
                field,
                "needs `user` (a pattern on the Request-URI user part) or `header` and `value`",
            ));
        }
        Ok(Pool {
            user,
            header,
            group: self.group,
        })
    }
}
