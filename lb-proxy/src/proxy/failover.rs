//! Failover: an initial INVITE, its candidates, the branch to the chosen destination, the next
//! destination when a branch fails (OpenSIPS `lb_start` / `lb_next`), and the hold a 503 with
//! Retry-After puts on a destination.

use super::*;

/// Forwarding context of an initial INVITE: the serial failover over destinations.
#[derive(Debug)]
pub(in crate::proxy) struct Call {
    pub(in crate::proxy) dialog: DialogKey,
    pub(in crate::proxy) want_group: u32,
    pub(in crate::proxy) tried: Vec<usize>,
    pub(in crate::proxy) attempts: u32,
    /// The live branch, if any.
    pub(in crate::proxy) branch: Option<ClientKey>,
    /// Best final response received from a server so far.
    pub(in crate::proxy) best: Option<Message>,
    pub(in crate::proxy) cancelled: bool,
    pub(in crate::proxy) received: Instant,
}

/// Preference among final responses when all branches failed (RFC 3261 16.7, simplified):
/// 6xx, then 4xx, 3xx, then 5xx; 503 last.
pub(in crate::proxy) fn rank(code: u16) -> u16 {
    match code {
        503 => 1000,
        600..=699 => code - 600,
        400..=499 => 100 + code - 400,
        300..=399 => 200 + code - 300,
        _ => 300 + code,
    }
}

impl Proxy {
    pub(in crate::proxy) fn initial_invite(
        &mut self,
        now: Instant,
        msg: Message,
        flow: Flow,
        key: ServerKey,
    ) {
        if !self.may_forward(&msg, flow) {
            return;
        }
        let (Some(call_id), Some(from_tag)) = (msg.call_id(), msg.from_tag()) else {
            return self.reply(&msg, flow, 400, "Missing From tag");
        };
        let dkey = DialogKey {
            call_id: call_id.into(),
            caller_tag: from_tag.into(),
        };
        if self.dialogs.contains_key(&dkey) {
            // Same Call-ID and From tag with a new branch: a merged request (RFC 3261 8.2.2.2).
            return self.reply(&msg, flow, 482, "Loop Detected");
        }
        // The group: the first pool the request matches, else the listener's.
        let want_group = crate::config::pool_group(&self.cfg.routing.pools, &msg)
            .unwrap_or_else(|| self.listener(flow.listener).group);
        let (resources, sdp) = match self.session_resources(flow.listener, &msg) {
            Ok(r) => r,
            Err(refused) => return self.reply(&msg, flow, refused.code, &refused.reason),
        };
        // Calls that cannot be taken are refused before any state is kept: under overload
        // each costs one response and nothing more.
        if self.draining {
            self.metrics.dialogs_processed.inc();
            self.metrics.dialogs_failed.inc();
            return self.reject(&msg, flow);
        }
        if self.dialogs.len() >= self.cfg.dialogs.max {
            debug!(call_id = %dkey.call_id, "dialogs.max reached: 503");
            self.metrics.limited_dialogs.inc();
            self.metrics.dialogs_processed.inc();
            self.metrics.dialogs_failed.inc();
            return self.reject(&msg, flow);
        }
        let want = Want {
            group: want_group,
            resources: &resources,
        };
        let first = self
            .dests
            .choose(want, &[], self.cfg.routing.policy, &mut self.rng);
        let Some(first) = first else {
            self.metrics.rejected_no_capacity.inc();
            self.metrics.dialogs_processed.inc();
            self.metrics.dialogs_failed.inc();
            self.metrics.invite_setup.observe(0.0);
            info!(call_id = %dkey.call_id, status = 503, "call: no destination with capacity");
            return self.reject(&msg, flow);
        };
        if !self.admit_transaction(&msg, flow) {
            return;
        }
        let trying = self.make_response(&msg, 100, "Trying", None).to_bytes();
        self.new_server_tx(msg.clone(), flow, &key);
        let reply = self.server_txs.get(&key).map(|t| t.reply);
        if let Some(reply) = reply {
            self.send_response(reply, 100, trying.clone());
        }
        if let Some(tx) = self.server_txs.get_mut(&key) {
            tx.last_response = Some(trying);
        }
        let callee_contact = None;
        let id = self.next_serial();
        let dialog = Dialog {
            id,
            phase: Phase::Trying,
            dest: None,
            resources,
            sdp,
            lifetime_deadline: now + self.cfg.dialogs.lifetime,
            session_deadline: None,
            to_tag: None,
            from_hdr: msg.get(&HeaderName::From).unwrap_or_default().into(),
            to_hdr: msg.get(&HeaderName::To).unwrap_or_default().into(),
            caller: Party {
                contact: contact_target(&msg).map(String::into_boxed_str),
                flow: Some(flow),
                routes: msg
                    .get_all(&HeaderName::RecordRoute)
                    .map(Box::from)
                    .collect(),
                cseq: msg.cseq().map(|c| c.0).unwrap_or(0),
            },
            callee: Party {
                contact: callee_contact,
                flow: None,
                routes: Box::default(),
                cseq: 0,
            },
        };
        self.metrics.dialogs_processed.inc();
        self.dialogs.insert(dkey.clone(), Box::new(dialog));
        self.dialog_ids.insert(id, dkey.clone());
        if let Some(live) = self.server_txs.get_mut(&key).and_then(|t| t.live.as_mut()) {
            live.call = Some(Call {
                dialog: dkey,
                want_group,
                tried: Vec::new(),
                attempts: 0,
                branch: None,
                best: None,
                cancelled: false,
                received: now,
            });
        }
        self.branch_to(now, &key, first);
    }

    /// Sends the INVITE of `key` to the best destination not tried yet, or ends the call.
    pub(in crate::proxy) fn try_next(&mut self, now: Instant, key: &ServerKey) {
        let Some(tx) = self.server_txs.get(key) else {
            return;
        };
        let Some(call) = tx.call() else { return };
        let Some(dialog) = self.dialogs.get(&call.dialog) else {
            // A BYE ended the early dialog (RFC 3261 15): no other branch, and the INVITE
            // still needs its final response.
            return self.final_local(now, key, 487, "Request Terminated");
        };
        let resources = dialog.resources.clone();
        let choice = if call.attempts >= self.cfg.routing.max_attempts {
            None
        } else {
            let want = Want {
                group: call.want_group,
                resources: &resources,
            };
            self.dests
                .choose(want, &call.tried, self.cfg.routing.policy, &mut self.rng)
        };
        let Some(slot) = choice else {
            return self.call_failed(now, key);
        };
        self.branch_to(now, key, slot);
    }

    /// Sends the INVITE of `key` to the destination in `slot`.
    pub(in crate::proxy) fn branch_to(&mut self, now: Instant, key: &ServerKey, slot: usize) {
        let Some(resources) = self
            .server_txs
            .get(key)
            .and_then(|tx| tx.call())
            .and_then(|call| self.dialogs.get(&call.dialog))
            .map(|d| d.resources.clone())
        else {
            return;
        };
        let Some(dest) = self.dests.get(slot) else {
            return;
        };
        let Some(addr) = dest.addr else { return };
        let dest_transport = dest.transport;
        let dest_uri = dest.uri.clone();
        let dest_id = dest.spec.id.clone();
        let dest_uid = dest.uid;
        let Some(out_l) = self.out_listener(dest_transport, Some(addr.is_ipv6())) else {
            warn!(destination = %dest_id, "no listener for transport {dest_transport}");
            return self.call_failed(now, key);
        };
        let tx = match self.server_txs.get_mut(key) {
            Some(tx) => tx,
            None => return,
        };
        let in_flow = tx.reply;
        let Some(mut fwd) = tx.live.as_ref().map(|l| l.request.clone()) else {
            return;
        };
        let Some(call) = tx.call_mut() else { return };
        call.tried.push(slot);
        call.attempts += 1;
        if call.attempts > 1 {
            self.metrics.failovers.inc();
        }
        let dkey = call.dialog.clone();
        self.dests.acquire(slot, &resources);
        if let Some(d) = self.dialogs.get_mut(&dkey) {
            d.dest = Some(slot);
            d.callee.flow = Some(Flow {
                transport: dest_transport,
                listener: out_l,
                remote: addr,
                conn: None,
            });
        }
        // Request-URI: the server's own address, keeping the caller's user part.
        let user = match fwd.request_uri().map(SipUri::user_of) {
            Some(Ok(user)) => user,
            _ => dest_uri.user.as_deref(),
        };
        let ruri = dest_uri.to_string_with_user(user);
        fwd.set_request_uri(ruri);
        // Record-Route: one entry, or two when the two sides differ (transport or family),
        // signed for this call and destination (the relay rule, relay.rs).
        let token = self
            .route_keys
            .sign(&dkey.call_id, &dkey.caller_tag, &dest_id, addr);
        let token = token.as_deref();
        let in_l = in_flow.listener;
        if in_l == out_l {
            let rr = self.record_route_uri(in_l, false, token);
            fwd.push_front(HeaderName::RecordRoute, rr);
        } else {
            let (rr_in, rr_out) = (
                self.record_route_uri(in_l, true, token),
                self.record_route_uri(out_l, true, token),
            );
            fwd.push_front(HeaderName::RecordRoute, rr_in);
            fwd.push_front(HeaderName::RecordRoute, rr_out);
        }
        let branch = self.new_branch();
        self.prepare_forward(&mut fwd, out_l, &branch);
        let flow = Flow {
            transport: dest_transport,
            listener: out_l,
            remote: addr,
            conn: None,
        };
        let ckey = ClientKey {
            branch: branch.into(),
            method: Method::Invite,
        };
        if let Some(call) = self.server_txs.get_mut(key).and_then(|t| t.call_mut()) {
            call.branch = Some(ckey.clone());
        }
        self.metrics.routed.inc();
        debug!(call_id = %dkey.call_id, destination = %dest_id, "INVITE forwarded");
        self.start_client(
            now,
            ckey,
            fwd,
            flow,
            Some(key.clone()),
            Role::Branch(DestRef {
                slot,
                uid: dest_uid,
            }),
            Some(in_flow),
        );
    }

    /// No destination (left): the best response a server gave, or 503 with Retry-After.
    pub(in crate::proxy) fn call_failed(&mut self, now: Instant, key: &ServerKey) {
        let Some(tx) = self.server_txs.get_mut(key) else {
            return;
        };
        let Some(call) = tx.call_mut() else { return };
        let best = call.best.take();
        let tried = call.tried.len();
        match best {
            Some(resp) if resp.code() != Some(503) => self.final_upstream(now, key, resp),
            _ => {
                if tried == 0 {
                    self.metrics.rejected_no_capacity.inc();
                }
                self.final_local(now, key, 503, "Service Unavailable")
            }
        }
    }

    /// A provisional with a To tag makes the dialog early.
    pub(in crate::proxy) fn note_provisional(&mut self, skey: &ServerKey, msg: &Message) {
        let Some(dkey) = self
            .server_txs
            .get(skey)
            .and_then(|t| t.call())
            .map(|c| c.dialog.clone())
        else {
            return;
        };
        if msg.to_tag().is_none() {
            return;
        }
        if let Some(d) = self.dialogs.get_mut(&dkey) {
            if d.phase == Phase::Trying {
                d.phase = Phase::Early;
                self.stats.early += 1;
            }
        }
    }

    /// A final response on the live branch of an initial INVITE.
    pub(in crate::proxy) fn branch_final(
        &mut self,
        now: Instant,
        skey: &ServerKey,
        mut msg: Message,
        dest: Option<DestRef>,
    ) {
        let Some(status) = msg.status() else {
            return;
        };
        let code = status.as_u16();
        if code == 503 {
            if let (Some(d), Some(secs)) = (dest, retry_after(&msg)) {
                self.hold(now, d, secs);
            }
        }
        let Some(call) = self.server_txs.get_mut(skey).and_then(|t| t.call_mut()) else {
            return;
        };
        call.branch = None;
        let dkey = call.dialog.clone();
        let cancelled = call.cancelled;
        msg.remove_first(&HeaderName::Via);
        if status.is_success() {
            self.settle_channels(skey, &dkey, &msg);
            self.confirm_dialog(now, &dkey, &msg);
            return self.final_upstream(now, skey, msg);
        }
        // Before the branch's load goes: the 406 rule reads what the session asked for.
        let not_offered = code == 406 && !cancelled && self.not_acceptable(now, dest, &dkey);
        self.release_branch(&dkey);
        let failover = not_offered
            || self
                .cfg
                .routing
                .failover_codes
                .iter()
                .any(|c| c.matches(code));
        if cancelled || !failover {
            return self.final_upstream(now, skey, msg);
        }
        if let Some(call) = self.server_txs.get_mut(skey).and_then(|t| t.call_mut()) {
            let better = match &call.best {
                None => true,
                Some(b) => rank(code) < rank(b.code().unwrap_or(500)),
            };
            if better {
                call.best = Some(msg);
            }
        }
        self.try_next(now, skey);
    }

    /// A server that answered 503 with Retry-After takes no new calls for that long
    /// (RFC 3261 21.5.4), capped at [`MAX_HOLD`].
    pub(in crate::proxy) fn hold(&mut self, now: Instant, dest: DestRef, secs: u64) {
        let until = now + Duration::from_secs(secs).min(MAX_HOLD);
        if let Some(d) = self.dests.live_mut(dest) {
            if d.held_until.is_none_or(|h| h < until) {
                debug!(destination = %d.spec.id, secs, "503 with Retry-After: destination held");
                d.held_until = Some(until);
                self.arm(until, Timer::Hold(dest.slot));
            }
        }
    }

    /// The branch's destination stops carrying the call's load.
    pub(in crate::proxy) fn release_branch(&mut self, dkey: &DialogKey) {
        if let Some(d) = self.dialogs.get_mut(dkey) {
            if let Some(slot) = d.dest.take() {
                self.dests.release(slot, &d.resources);
            }
            if d.phase == Phase::Early {
                d.phase = Phase::Trying;
                self.stats.early = self.stats.early.saturating_sub(1);
            }
        }
    }

    /// The live branch of a call timed out: release its load and try the next destination.
    pub(in crate::proxy) fn branch_gave_up(&mut self, now: Instant, skey: &ServerKey) {
        let Some(call) = self.server_txs.get_mut(skey).and_then(|t| t.call_mut()) else {
            return;
        };
        call.branch = None;
        let dkey = call.dialog.clone();
        let cancelled = call.cancelled;
        self.release_branch(&dkey);
        if cancelled {
            return self.final_local(now, skey, 487, "Request Terminated");
        }
        self.try_next(now, skey);
    }
}
