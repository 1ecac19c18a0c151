//! What the operator is told on its command line (`main.rs` turns the flags into [`Settings`]).

use std::net::SocketAddr;
use std::time::Duration;

/// Everything the operator is told on its command line.
#[derive(Clone)]
pub struct Settings {
    /// Watch MrcpServers and pods in this namespace only; all namespaces when None.
    pub namespace: Option<String>,
    /// Label selector restricting the pod watch (`--pod-selector`): only pods it selects can
    /// be destinations; None watches every pod (of `namespace`).
    pub pod_selector: Option<String>,
    /// The MrcpServers this operator takes: those whose `spec.className` is this, or, when
    /// None, those without a className (`--class`).
    pub class: Option<String>,
    /// Label selector of the proxy pods (their admin API gets the set).
    pub proxy_selector: Option<String>,
    /// Namespace of the proxy pods.
    pub proxy_namespace: Option<String>,
    pub proxy_admin_port: u16,
    /// Proxies at fixed admin URLs (outside the cluster, or tests).
    pub proxy_urls: Vec<String>,
    /// UDP port of the proxies' cluster listener: the pushed set lists every proxy replica at
    /// `<IP>:<port>` as the replicas' `peers`. None: no peer list is pushed (the proxies keep
    /// the peers of their config files).
    pub proxy_cluster_port: Option<u16>,
    pub token: Option<String>,
    pub listen: SocketAddr,
    pub resync: Duration,
    /// Lease for leader election; None runs as the only writer.
    pub lease: Option<LeaseSettings>,
    /// How often the proxies' live load is read for the MrcpServer statuses; None: never
    /// (the statuses carry no load).
    pub load_interval: Option<Duration>,
    /// HTTPS to the discovered proxies' admin API (`--proxy-tls`); None: HTTP.
    pub proxy_tls: Option<crate::proxy_http::ProxyTls>,
}

/// Every field but the admin token, which shows only whether it is set: a `{:?}` of the
/// settings in a log must not leak it.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("namespace", &self.namespace)
            .field("pod_selector", &self.pod_selector)
            .field("class", &self.class)
            .field("proxy_selector", &self.proxy_selector)
            .field("proxy_namespace", &self.proxy_namespace)
            .field("proxy_admin_port", &self.proxy_admin_port)
            .field("proxy_urls", &self.proxy_urls)
            .field("proxy_cluster_port", &self.proxy_cluster_port)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("listen", &self.listen)
            .field("resync", &self.resync)
            .field("lease", &self.lease)
            .field("load_interval", &self.load_interval)
            .field("proxy_tls", &self.proxy_tls)
            .finish()
    }
}

impl Settings {
    /// Whether this operator takes `server`: the same class, an absent or empty className
    /// being the default class (no `--class`).
    pub fn claims(&self, server: &crate::crd::MrcpServer) -> bool {
        let class = server.spec.class_name.as_deref().filter(|c| !c.is_empty());
        class == self.class.as_deref()
    }
}

/// A class name as `spec.className` accepts it (a DNS label): 1 to 63 of `a-z`, `0-9`, `-`,
/// starting and ending with a letter or digit.
pub fn valid_class(c: &str) -> bool {
    let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(&f), Some(&l)) => {
            bytes.len() <= 63 && ok(f) && ok(l) && bytes.iter().all(|&b| ok(b) || b == b'-')
        }
        _ => false,
    }
}

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            namespace: None,
            pod_selector: None,
            class: None,
            proxy_selector: None,
            proxy_namespace: None,
            proxy_admin_port: 8081,
            proxy_urls: vec![],
            proxy_cluster_port: Some(7070),
            token: Some("s3cr3t-admin-token".into()),
            listen: "127.0.0.1:8080".parse().unwrap(),
            resync: Duration::from_secs(10),
            lease: None,
            load_interval: Some(Duration::from_secs(5)),
            proxy_tls: None,
        }
    }

    #[test]
    fn debug_output_hides_the_admin_token() {
        let s = settings();
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("token: Some(\"<redacted>\")"), "{shown}");
        assert!(shown.contains("proxy_admin_port: 8081"), "{shown}");
    }

    #[test]
    fn an_operator_claims_the_servers_of_its_class_only() {
        let server = |class: Option<&str>| -> crate::crd::MrcpServer {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "mrcp-lb.io/v1alpha1",
                "kind": "MrcpServer",
                "metadata": {"name": "s", "namespace": "speech"},
                "spec": {"selector": {}, "className": class},
            }))
            .unwrap()
        };
        let mut s = settings();
        assert!(s.claims(&server(None)));
        assert!(
            s.claims(&server(Some(""))),
            "an empty className is the default class"
        );
        assert!(!s.claims(&server(Some("tenant-b"))));
        s.class = Some("tenant-b".into());
        assert!(!s.claims(&server(None)));
        assert!(s.claims(&server(Some("tenant-b"))));
        assert!(!s.claims(&server(Some("tenant-c"))));
    }

    #[test]
    fn class_names_are_dns_labels() {
        for ok in ["a", "tenant-b", "r2", &"x".repeat(63)] {
            assert!(valid_class(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "Tenant", "a_b", "a.b", &"x".repeat(64)] {
            assert!(!valid_class(bad), "{bad}");
        }
    }
}
