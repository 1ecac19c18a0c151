//! Leader election on a `coordination.k8s.io/v1` Lease: one replica writes (status, events,
//! pushes to proxies); the others watch and compute, ready to take over when the lease
//! expires.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::settings::LeaseSettings;

/// Whether this replica may write (statuses, Events, pushes), and the election behind it.
pub struct Leadership {
    /// True while this replica leads.
    pub leading: watch::Receiver<bool>,
    elector: Option<JoinHandle<()>>,
    /// Without a Lease the replica always leads: the sender stays here so the channel stays
    /// open.
    _always: Option<watch::Sender<bool>>,
}

impl Leadership {
    /// Elects through the Lease of `lease` (15 s, renewed every 2 s); with None, this replica
    /// is the only writer and leads from the start.
    pub fn start(
        client: &Client,
        lease: Option<&LeaseSettings>,
        metrics: Arc<Metrics>,
        shutdown: &CancellationToken,
    ) -> Leadership {
        let (tx, leading) = watch::channel(lease.is_none());
        let Some(l) = lease else {
            return Leadership {
                leading,
                elector: None,
                _always: Some(tx),
            };
        };
        let elector = Elector {
            api: Api::<Lease>::namespaced(client.clone(), &l.namespace),
            name: l.name.clone(),
            identity: l.identity.clone(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(2),
            metrics,
        };
        Leadership {
            leading,
            elector: Some(tokio::spawn(elector.run(tx, shutdown.clone()))),
            _always: None,
        }
    }

    /// After the shutdown: waits (briefly) for the elector to release the lease, so that a
    /// standby takes over at once instead of when the lease expires.
    pub async fn finish(self) {
        if let Some(task) = self.elector {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                warn!("the lease was not released within 5 s");
            }
        }
    }
}

pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    /// How long a lease holds without renewal.
    pub duration: Duration,
    /// How often the leader renews and followers retry.
    pub renew: Duration,
    /// Failed Lease calls count in `mrcp_lb_operator_errors_total{kind="lease"}`.
    pub metrics: Arc<Metrics>,
}

enum Outcome {
    Leading,
    Following,
}

impl Elector {
    /// Runs the election until shutdown, publishing whether this replica leads. On shutdown a
    /// leader releases the lease so that another replica takes over at once.
    pub async fn run(self, leading: watch::Sender<bool>, shutdown: CancellationToken) {
        loop {
            let outcome = match self.try_acquire().await {
                Ok(o) => o,
                Err(e) => {
                    warn!("{}", self.failed(e));
                    Outcome::Following
                }
            };
            let lead = matches!(outcome, Outcome::Leading);
            if *leading.borrow() != lead {
                info!(identity = %self.identity, leading = lead, "leadership changed");
                let _ = leading.send(lead);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.renew) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        if *leading.borrow() {
            let _ = leading.send(false);
            if let Err(e) = self.release().await {
                warn!("releasing {}", self.failed(e));
            }
        }
    }

    /// Counts a failed Lease call; the caller logs it.
    fn failed(&self, source: kube::Error) -> Error {
        let e = Error::Lease {
            name: self.name.clone(),
            source,
        };
        self.metrics.error(&e);
        e
    }

    async fn try_acquire(&self) -> Result<Outcome, kube::Error> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let existing = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = existing else {
            let mut lease = Lease::default();
            lease.metadata.name = Some(self.name.clone());
            lease.spec = Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            });
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Outcome::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Following),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(MicroTime(t)), Some(d)) => {
                let until = t.checked_add(std::time::Duration::from_secs(
                    u64::try_from(d).unwrap_or(0),
                ));
                until.map(|u| u < now).unwrap_or(true)
            }
            _ => true,
        };
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        if !mine && !expired && !free {
            return Ok(Outcome::Following);
        }
        if !mine {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.acquire_time = Some(MicroTime(now));
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        // The resourceVersion in `lease` makes this a compare-and-swap: of two replicas
        // taking an expired lease at once, one gets a conflict.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Outcome::Leading),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Following),
            Err(e) => Err(e),
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        if let Some(spec) = lease.spec.as_mut() {
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.renew_time = None;
        }
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }
}
