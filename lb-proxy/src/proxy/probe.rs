//! OPTIONS health probing (OpenSIPS `load_balancer` probing, with hysteresis).
//!
//! Each destination has its own probe timer, started at a random offset within the interval
//! so that probes spread out. A probe is an ordinary non-INVITE client transaction sent over
//! the destination's transport from the proxy's advertised address; its reply (200, or a code
//! configured as alive) counts as a success, anything else or a timeout as a failure.
//! `failureThreshold` consecutive failures take an up destination down; `successThreshold`
//! consecutive successes bring a down one back.

use rand::Rng;
use std::time::{Duration, Instant};
use tracing::{info, warn};

use super::{ClientKey, Proxy, Role, Timer};
use crate::destinations::{DestRef, Health};
use crate::sip::{HeaderName, Message, Method};
use crate::transport::Flow;

/// Weight of the newest sample in the probe latency moving average.
const LATENCY_ALPHA: f64 = 0.3;

impl Proxy {
    /// Arms the first probe of a destination, at a random point within one interval.
    pub(super) fn schedule_first_probe(&mut self, now: Instant, slot: usize) {
        let Some(dest) = self.dests.dest_ref(slot) else {
            return;
        };
        let interval = self.cfg.probing.interval;
        let offset =
            Duration::from_millis(self.rng.gen_range(0..=interval.as_millis().max(1) as u64));
        self.arm(now + offset, Timer::Probe(dest));
    }

    /// A destination's probe timer fired: probe it if its mode says so, and re-arm.
    pub(super) fn probe_due(&mut self, now: Instant, dest: DestRef) {
        let interval = self.cfg.probing.interval;
        let Some(d) = self.dests.live_mut(dest) else {
            return;
        };
        if d.is_free() {
            return; // Gone for good: the timer chain ends here.
        }
        let wants = d.wants_probe();
        let target = d.addr.map(|a| (a, d.transport, d.uri.clone()));
        if wants {
            if let Some((addr, transport, uri)) = target {
                d.probe.sent += 1;
                self.send_probe(now, dest, addr, transport, uri);
            }
        }
        self.arm(now + interval, Timer::Probe(dest));
    }

    fn send_probe(
        &mut self,
        now: Instant,
        dest: DestRef,
        addr: std::net::SocketAddr,
        transport: crate::sip::Transport,
        uri: crate::sip::SipUri,
    ) {
        let Some(listener) = self.out_listener(transport, Some(addr.is_ipv6())) else {
            return;
        };
        let tag = self.new_tag();
        let call_id = format!("probe-{:016x}@mrcp-lb", self.rng.gen::<u64>());
        let mut req = Message::request(Method::Options, &uri.to_string());
        req.push(
            HeaderName::From,
            format!("<{}>;tag={tag}", self.cfg.probing.from_uri),
        );
        req.push(HeaderName::To, format!("<{uri}>"));
        req.push(HeaderName::CallId, call_id);
        req.push(HeaderName::CSeq, "1 OPTIONS".to_string());
        req.push(
            HeaderName::Other("Accept".into()),
            "application/sdp".to_string(),
        );
        let branch = self.new_branch();
        self.prepare_forward(&mut req, listener, &branch);
        let flow = Flow {
            transport,
            listener,
            remote: addr,
            conn: None,
        };
        let key = ClientKey {
            branch: branch.into(),
            method: Method::Options,
        };
        self.start_client(now, key, req, flow, None, Role::Probe(dest, now), None);
    }

    /// The outcome of one probe: `latency` is Some for an alive reply.
    pub(super) fn probe_result(&mut self, dest: DestRef, code: u16, latency: Option<Duration>) {
        let (fail_n, ok_n) = (
            self.cfg.probing.failure_threshold,
            self.cfg.probing.success_threshold,
        );
        let Some(d) = self.dests.live_mut(dest) else {
            return;
        };
        let p = &mut d.probe;
        p.last_code = Some(code);
        let id = d.spec.id.clone();
        let uri = d.spec.uri.clone();
        // The probe metrics are exported from these statistics at scrape time (so that a
        // removed destination's series go with it).
        match latency {
            Some(rtt) => {
                p.succeeded += 1;
                p.consecutive_successes += 1;
                p.consecutive_failures = 0;
                let rtt = rtt.as_secs_f64();
                let avg = match p.latency {
                    Some(avg) => avg + LATENCY_ALPHA * (rtt - avg),
                    None => rtt,
                };
                p.latency = Some(avg);
                if d.health != Health::Up && d.probe.consecutive_successes >= ok_n {
                    info!(destination = %id, %uri, "probes succeed again: destination up");
                    d.set_health(Health::Up);
                }
            }
            None => {
                p.failed += 1;
                if code == 408 {
                    p.timeouts += 1;
                }
                p.consecutive_failures += 1;
                p.consecutive_successes = 0;
                if d.health == Health::Up && d.probe.consecutive_failures >= fail_n {
                    warn!(destination = %id, %uri, code, "probes fail: destination down");
                    d.set_health(Health::DownProbes);
                }
            }
        }
    }
}
