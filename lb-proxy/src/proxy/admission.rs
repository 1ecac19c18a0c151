//! Admission: what the proxy refuses before any routing work. Max-Forwards (483) and loops
//! (482), the pending-transaction limit and the per-source rate (503, statelessly).

use super::*;

impl Proxy {
    /// Answers `503` with Retry-After statelessly: no transaction, no dialog. The To tag is
    /// [`Proxy::reject_tag`] ([`crate::sip::STATELESS_TAG_PREFIX`]), by which the caller's ACK is
    /// recognised and absorbed.
    pub(in crate::proxy) fn reject(&mut self, req: &Message, flow: Flow) {
        let tag = (req.to_tag().is_none()).then(|| self.reject_tag.clone());
        let resp = self.make_response(req, 503, "Service Unavailable", tag.as_deref());
        let target = self.response_flow(req, flow);
        self.send_response(target, 503, resp.to_bytes());
    }

    /// Whether a new server transaction may start; answers 503 and counts it when not.
    pub(in crate::proxy) fn admit_transaction(&mut self, req: &Message, flow: Flow) -> bool {
        if self.pending < self.cfg.limits.max_pending_transactions {
            return true;
        }
        self.metrics.limited_transactions.inc();
        debug!(
            call_id = req.call_id().unwrap_or_default(),
            pending = self.pending,
            "limits.maxPendingTransactions reached: 503"
        );
        if req.method() == Some(&Method::Invite) && req.to_tag().is_none() {
            self.metrics.dialogs_processed.inc();
            self.metrics.dialogs_failed.inc();
        }
        self.reject(req, flow);
        false
    }

    /// The per-source rate limit (Kamailio `pike`), for a request outside a dialog; answers
    /// or drops it and returns false when its source is over the rate.
    pub(in crate::proxy) fn within_rate(
        &mut self,
        now: Instant,
        req: &Message,
        method: &Method,
        flow: Flow,
    ) -> bool {
        let Some(limiter) = self.limiter.as_mut() else {
            return true;
        };
        let Some(p) = self.cfg.limits.per_source.as_ref() else {
            return true;
        };
        if p.scope == RateScope::Invite && *method != Method::Invite {
            return true;
        }
        match limiter.check(flow.remote.ip(), now) {
            Verdict::Allow => true,
            Verdict::Untracked => {
                self.metrics.rate_limit_untracked.inc();
                true
            }
            Verdict::Limit => {
                self.metrics.limited_source_rate.inc();
                if p.action == RateAction::Reject {
                    if *method == Method::Invite {
                        self.metrics.dialogs_processed.inc();
                        self.metrics.dialogs_failed.inc();
                    }
                    self.reject(req, flow);
                }
                false
            }
        }
    }

    /// Checks Max-Forwards and loops before a request is forwarded; answers and returns false
    /// when it must not be.
    pub(in crate::proxy) fn may_forward(&mut self, msg: &Message, flow: Flow) -> bool {
        if msg.max_forwards() == Some(0) {
            self.reply(msg, flow, 483, "Too Many Hops");
            return false;
        }
        // Only a Via carrying our branch prefix can be ours: parse just those.
        let looped = msg
            .get_all(&HeaderName::Via)
            .filter(|v| v.contains(self.branch_prefix.as_str()))
            .filter_map(Via::parse)
            .any(|v| {
                self.is_self(&v.host, v.port)
                    && v.branch()
                        .is_some_and(|b| b.starts_with(&self.branch_prefix))
            });
        if looped {
            self.reply(msg, flow, 482, "Loop Detected");
            return false;
        }
        true
    }
}
