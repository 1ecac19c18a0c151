//! The operator's client for the proxies' admin API over TLS (`--proxy-tls`), against a real
//! lb-proxy with `admin.tls`: the certificate must chain to `--proxy-ca-file` and carry
//! `--proxy-tls-server-name` (the operator connects to pod IPs, which a certificate issued
//! before the pod cannot name); a certificate from another CA, or without the name, is
//! refused. Pushes and load reads use this one client.
//!
//! Needs `openssl`. Address: 127.0.14.4. Run: `cargo test -p lb-operator --test proxy_tls`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod k8s_harness;

use k8s_harness::lb_proxy_bin;
use lb_operator::proxy_http::{client, ProxyTls};
use lb_operator::settings::Settings;
use mrcp_lb_test_support::{clean_env, pki, ChildGuard};
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IP: &str = "127.0.14.4";
const NAME: &str = "mrcp-lb-proxy-admin.mrcp-system.svc";

fn settings(tls: Option<ProxyTls>) -> Settings {
    Settings {
        namespace: None,
        pod_selector: None,
        class: None,
        proxy_selector: None,
        proxy_namespace: None,
        proxy_admin_port: 8081,
        proxy_urls: vec![],
        proxy_cluster_port: None,
        token: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        resync: Duration::from_secs(10),
        lease: None,
        load_interval: None,
        proxy_tls: tls,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_reaches_a_tls_admin_api_by_pod_ip_checking_the_service_name() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("proxy-tls");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    pki::self_signed_ca(&dir, "ca");
    pki::self_signed_ca(&dir, "other-ca");
    // The admin certificate names the Service, not the pod IP (as cert-manager would issue).
    pki::issue(&dir, "admin", &format!("subjectAltName=DNS:{NAME}"), "ca");
    let config = format!(
        "listeners: [udp:{IP}:5060]\nadmin:\n  listen: {IP}:8081\n  tls:\n    certFile: {d}/admin.crt\n    \
         keyFile: {d}/admin.key\n",
        d = dir.display()
    );
    fs::write(dir.join("config.yaml"), config).unwrap();
    let child = clean_env(&mut Command::new(lb_proxy_bin()))
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("proxy.log")).unwrap())
        .spawn()
        .expect("spawn lb-proxy");
    let _guard = ChildGuard::new("lb-proxy", child);
    let url = format!("https://{IP}:8081/v1/destinations");
    let get = async |tls: ProxyTls| -> Result<u16, String> {
        let c = client(&settings(Some(tls))).map_err(|e| e.to_string())?;
        let r = c.get(&url).send().await.map_err(|e| format!("{e:?}"))?;
        Ok(r.status().as_u16())
    };
    let good = ProxyTls {
        ca_file: Some(dir.join("ca.crt")),
        server_name: Some(NAME.into()),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match get(good.clone()).await {
            Ok(200) => break,
            other if Instant::now() > deadline => panic!("never answered: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // The pod IP is not in the certificate: without the server name, refused.
    let by_ip = get(ProxyTls {
        server_name: None,
        ..good.clone()
    })
    .await;
    assert!(by_ip.is_err(), "{by_ip:?}");
    // Another CA: refused.
    let other = get(ProxyTls {
        ca_file: Some(dir.join("other-ca.crt")),
        ..good.clone()
    })
    .await;
    assert!(other.is_err(), "{other:?}");
    // A name the certificate does not carry: refused.
    let wrong = get(ProxyTls {
        server_name: Some("elsewhere.example".into()),
        ..good
    })
    .await;
    assert!(wrong.is_err(), "{wrong:?}");
    // A CA file that is not one: the client is not built, and says which flag.
    fs::write(dir.join("bad.crt"), "nothing").unwrap();
    let e = client(&settings(Some(ProxyTls {
        ca_file: Some(dir.join("bad.crt")),
        server_name: None,
    })))
    .unwrap_err()
    .to_string();
    assert!(e.contains("--proxy-ca-file"), "{e}");
}
