//! What can go wrong in the operator, one variant per kind.
//!
//! The kinds the operator survives (a failed push, status write, Event or Lease call: logged,
//! counted in `mrcp_lb_operator_errors_total{kind}` under [`Error::metric_label`], retried) and
//! the ones that stop [`crate::run::run`] before the loop starts (no HTTP client, the listen
//! address taken, the watches gone before their caches filled).

use std::net::SocketAddr;

use crate::push::PushError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A proxy did not take the destination set.
    #[error(transparent)]
    Push(#[from] PushError),
    /// Writing an MrcpServer's status failed.
    #[error("status update failed: {0}")]
    Status(#[source] kube::Error),
    /// Publishing an Event failed (on `object`: kind namespace/name).
    #[error("event for {object} failed: {source}")]
    Event {
        object: String,
        #[source]
        source: kube::Error,
    },
    /// A call on the leader Lease failed (this replica follows until the next try).
    #[error("lease {name}: {source}")]
    Lease {
        name: String,
        #[source]
        source: kube::Error,
    },
    /// The HTTP client for the pushes could not be built.
    #[error("HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    /// The TLS settings for the proxies' admin API do not work (`--proxy-ca-file`, ...).
    #[error("proxy TLS: {0}")]
    ProxyTls(String),
    /// The metrics/health address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The API server refused `--pod-selector`.
    #[error("--pod-selector {selector:?}: {message}")]
    PodSelector { selector: String, message: String },
    /// A watch ended before its cache was filled.
    #[error("watch ended before its cache synced: {0}")]
    CacheSync(#[source] kube::runtime::reflector::store::WriterDropped),
}

impl Error {
    /// The `kind` label of `mrcp_lb_operator_errors_total`: one fixed word per variant, never
    /// anything from the error's text (names, URLs), so the metric keeps a handful of series.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Push(_) => "push",
            Error::Status(_) => "status",
            Error::Event { .. } => "event",
            Error::Lease { .. } => "lease",
            Error::HttpClient(_) => "http_client",
            Error::ProxyTls(_) => "proxy_tls",
            Error::Listen { .. } => "listen",
            Error::CacheSync(_) => "cache_sync",
            Error::PodSelector { .. } => "pod_selector",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_are_fixed_words_whatever_the_message() {
        let a = Error::Push(PushError::Rejected(
            400,
            "destination sip:10.0.0.1 bad".into(),
        ));
        let b = Error::Push(PushError::Http("connection refused to 10.9.9.9".into()));
        assert_eq!(a.metric_label(), "push");
        assert_eq!(b.metric_label(), "push");
        // The message stays what the push error says (logs read as before).
        assert_eq!(
            a.to_string(),
            "rejected with 400: destination sip:10.0.0.1 bad"
        );
    }
}
