//! Server transactions (RFC 3261 17.2): created per request received, answered with a local
//! or relayed final response, ACK and CANCEL matched to them.

use crate::proxy::*;

impl Proxy {
    pub(in crate::proxy) fn new_server_tx(
        &mut self,
        msg: Message,
        flow: Flow,
        key: &ServerKey,
    ) -> u64 {
        let id = self.next_serial();
        let reply = self.response_flow(&msg, flow);
        let local_tag = self.new_tag();
        self.pending += 1;
        self.server_txs.insert(
            key.clone(),
            ServerTx {
                id,
                reply,
                state: ServerState::Proceeding,
                last_response: None,
                retransmit: self.cfg.timers.t1,
                live: Some(Box::new(LiveServer {
                    request: msg,
                    local_tag,
                    call: None,
                })),
            },
        );
        self.server_ids.insert(id, key.clone());
        id
    }

    pub(in crate::proxy) fn on_ack(
        &mut self,
        now: Instant,
        msg: Message,
        flow: Flow,
        key: ServerKey,
    ) {
        // ACK for a non-2xx final we sent: absorbed here (hop-by-hop).
        if let Some(tx) = self.server_txs.get_mut(&key) {
            if tx.state == ServerState::Completed {
                tx.state = ServerState::Confirmed;
                let id = tx.id;
                let wait = if tx.reply.transport.is_stream() {
                    Duration::ZERO
                } else {
                    self.cfg.timers.t4
                };
                self.arm(now + wait, Timer::ServerCleanup(id));
                return;
            }
            if tx.state == ServerState::Confirmed {
                return;
            }
        }
        // ACK for a response sent statelessly (our 503, the transport's 400): nothing to do.
        if msg.to_tag().is_some_and(crate::sip::is_stateless_tag) {
            return;
        }
        // ACK for a 2xx: end to end, routed like any in-dialog request.
        if msg.to_tag().is_some() {
            self.in_dialog(now, msg, flow, key);
        }
    }

    pub(in crate::proxy) fn on_cancel(
        &mut self,
        now: Instant,
        msg: Message,
        flow: Flow,
        key: ServerKey,
    ) {
        let invite_key = ServerKey {
            method: Method::Invite,
            ..key
        };
        let Some(tx) = self.server_txs.get_mut(&invite_key) else {
            return self.reply(&msg, flow, 481, "Call/Transaction Does Not Exist");
        };
        let proceeding = tx.state == ServerState::Proceeding;
        let branch = match tx.call_mut() {
            Some(call) if proceeding => {
                call.cancelled = true;
                call.branch.clone()
            }
            _ => None,
        };
        self.reply(&msg, flow, 200, "OK");
        if !proceeding {
            return;
        }
        match branch {
            Some(ckey) => self.cancel_branch(now, &ckey, None),
            // A re-INVITE being relayed, or no live branch: nothing to cancel downstream.
            None => self.final_local(now, &invite_key, 487, "Request Terminated"),
        }
    }

    /// Sends a final response the proxy generates for a server transaction.
    pub(in crate::proxy) fn final_local(
        &mut self,
        now: Instant,
        key: &ServerKey,
        code: u16,
        reason: &str,
    ) {
        // Only until the final response: no second final is made after it.
        let Some(live) = self.server_txs.get(key).and_then(|t| t.live.as_deref()) else {
            return;
        };
        let req = live.request.clone();
        let tag = live.local_tag.clone();
        let mut resp = self.make_response(&req, code, reason, Some(&tag));
        // The request's Via as received (with received/rport) is what the response carries.
        resp.remove_all(&HeaderName::Via);
        for v in req.get_all(&HeaderName::Via) {
            resp.push(HeaderName::Via, v.to_string());
        }
        self.final_upstream(now, key, resp);
    }

    /// Sends a final response upstream and moves the server transaction on.
    pub(in crate::proxy) fn final_upstream(
        &mut self,
        now: Instant,
        key: &ServerKey,
        resp: Message,
    ) {
        let Some(status) = resp.status() else {
            return;
        };
        let code = status.as_u16();
        let data = resp.to_bytes();
        let t = self.cfg.timers.clone();
        let Some(tx) = self.server_txs.get_mut(key) else {
            return;
        };
        if matches!(tx.state, ServerState::Completed | ServerState::Confirmed) {
            return;
        }
        let reply = tx.reply;
        let id = tx.id;
        let is_invite = key.method == Method::Invite;
        // The request and the call are no longer needed once the final response is sent.
        let call = tx.live.take().and_then(|l| l.call);
        let reliable = reply.transport.is_stream();
        if tx.state == ServerState::Proceeding {
            self.pending = self.pending.saturating_sub(1);
        }
        if status.is_success() {
            // RFC 6026: retransmitted INVITEs are absorbed silently (the UAS retransmits its
            // 2xx itself), so nothing of the request or the response needs keeping: at high
            // call rates these lingering transactions are most of the memory.
            tx.state = ServerState::Accepted;
            tx.last_response = None;
        } else {
            tx.last_response = Some(data.clone());
            tx.state = ServerState::Completed;
        }
        self.send_response(reply, code, data);
        if is_invite && !status.is_success() {
            if !reliable {
                self.arm(now + t.t1, Timer::ServerRetransmit(id));
            }
            self.arm(now + t.t1 * 64, Timer::ServerTimeout(id));
        } else if is_invite {
            self.arm(now + t.t1 * 64, Timer::ServerCleanup(id));
        } else {
            let wait = if reliable { Duration::ZERO } else { t.t1 * 64 };
            self.arm(now + wait, Timer::ServerCleanup(id));
        }
        if let Some(call) = call {
            let setup = now.saturating_duration_since(call.received);
            self.metrics.invite_setup.observe(setup.as_secs_f64());
            if !status.is_success() {
                self.end_dialog(&call.dialog, End::Failed);
            }
            let dest = self
                .dialogs
                .get(&call.dialog)
                .and_then(|d| d.dest)
                .and_then(|s| self.dests.get(s))
                .map(|d| d.spec.id.clone())
                .unwrap_or_else(|| "-".to_string());
            info!(
                call_id = %call.dialog.call_id,
                destination = %dest,
                status = code,
                attempts = call.attempts,
                setup_ms = setup.as_secs_f64() * 1000.0,
                "call"
            );
        }
    }

    /// Timer G: retransmits the non-2xx final response until the ACK comes.
    pub(in crate::proxy) fn server_retransmit(&mut self, now: Instant, id: u64) {
        let Some(key) = self.server_ids.get(&id) else {
            return;
        };
        let t2 = self.cfg.timers.t2;
        let Some(tx) = self.server_txs.get_mut(key) else {
            return;
        };
        let Some(wait) = tx.next_retransmit(t2) else {
            return;
        };
        if let Some(last) = tx.last_response.clone() {
            let reply = tx.reply;
            self.send(reply, last, None);
            self.arm(now + wait, Timer::ServerRetransmit(id));
        }
    }

    /// Timer H / I / J / L: the server transaction is forgotten.
    pub(in crate::proxy) fn server_cleanup(&mut self, id: u64) {
        if let Some(key) = self.server_ids.remove(&id) {
            if let Some(tx) = self.server_txs.remove(&key) {
                if tx.state == ServerState::Proceeding {
                    self.pending = self.pending.saturating_sub(1);
                }
            }
        }
    }
}
