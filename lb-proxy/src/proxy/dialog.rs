//! The dialog lifecycle in the core: confirmed by a 2xx, refreshed by session timers (RFC 4028),
//! ended by BYE, failure or expiry (then the proxy sends BYE to both sides itself).

use super::*;

/// The Reason of the BYEs sent when a dialog's lifetime or Session-Expires runs out.
const REASON_EXPIRED: &str = "SIP;cause=408;text=\"dialog expired\"";

impl Proxy {
    pub(in crate::proxy) fn confirm_dialog(
        &mut self,
        now: Instant,
        dkey: &DialogKey,
        msg: &Message,
    ) {
        let session_timer = self.cfg.dialogs.session_timer;
        // Record-Route entries above ours are the callee's side of the route set; towards the
        // callee the next hop is the entry just above ours (RFC 3261 12.1.2).
        let rrs: Vec<&str> = msg.get_all(&HeaderName::RecordRoute).collect();
        let ours = rrs
            .iter()
            .position(|r| SipUriRef::parse(name_addr_uri(r)).is_ok_and(|u| self.is_self_uri(&u)));
        let callee_routes: Option<Box<[Box<str>]>> =
            ours.map(|i| rrs[..i].iter().rev().map(|&s| s.into()).collect());
        let Some(d) = self.dialogs.get_mut(dkey) else {
            return;
        };
        if d.phase == Phase::Confirmed {
            return;
        }
        if d.phase == Phase::Early {
            self.stats.early = self.stats.early.saturating_sub(1);
        }
        d.phase = Phase::Confirmed;
        self.stats.active += 1;
        d.to_tag = msg.to_tag().map(Box::from);
        d.callee.contact = contact_target(msg).map(String::into_boxed_str);
        if let Some(routes) = callee_routes {
            d.callee.routes = routes;
        }
        if session_timer {
            if let Some(se) = session_expires(msg) {
                // Past what the clock can hold (a peer may write any number): no session
                // limit, the dialog lifetime still applies.
                d.session_deadline = now.checked_add(se);
            }
        }
        let (id, deadline) = (d.id, d.deadline());
        self.arm(deadline, Timer::Dialog(id));
    }

    /// A 2xx to a re-INVITE or UPDATE with Session-Expires pushes the dialog's deadline.
    pub(in crate::proxy) fn refresh_session(&mut self, now: Instant, msg: &Message) {
        if !self.cfg.dialogs.session_timer {
            return;
        }
        let Some(se) = session_expires(msg) else {
            return;
        };
        if let Some(k) = self.find_dialog(msg) {
            if let Some(d) = self.dialogs.get_mut(&k) {
                d.session_deadline = now.checked_add(se);
            }
        }
    }

    /// A 2xx from a branch the proxy had given up on: acknowledge it and hang it up, so the
    /// server does not hold a call nobody will use.
    pub(in crate::proxy) fn hang_up_late_answer(
        &mut self,
        now: Instant,
        key: &ClientKey,
        resp: &Message,
    ) {
        let Some(ctx) = self.client_txs.get(key) else {
            return;
        };
        let Some(sent) = ctx.sent.as_deref() else {
            return;
        };
        let ack = make_ack(&sent.request, resp);
        let out = sent.out.clone();
        let mut target_flow = Flow {
            transport: out.transport,
            listener: out.listener,
            remote: match out.target {
                Target::Addr(a) => a,
                Target::Host(..) => return,
            },
            conn: out.conn,
        };
        let mut ack = ack;
        if let Some(c) = contact_target(resp) {
            ack.set_request_uri(c);
        }
        let branch = self.new_branch();
        ack.remove_all(&HeaderName::Via);
        self.prepare_forward(&mut ack, out.listener, &branch);
        self.send(target_flow, ack.to_bytes(), None);
        let mut bye = ack.clone();
        bye.start = StartLine::Request {
            method: Method::Bye,
            uri: match &bye.start {
                StartLine::Request { uri, .. } => uri.clone(),
                StartLine::Response { .. } => Text::new(),
            },
        };
        let seq = resp.cseq().map_or(1, |c| c.0).saturating_add(1);
        bye.set(HeaderName::CSeq, format!("{seq} BYE"));
        let branch = self.new_branch();
        bye.remove_all(&HeaderName::Via);
        self.prepare_forward(&mut bye, out.listener, &branch);
        target_flow.conn = None;
        warn!(
            call_id = resp.call_id().unwrap_or_default(),
            "late 2xx on an abandoned branch: hanging up"
        );
        self.start_client(
            now,
            ClientKey {
                branch: branch.into(),
                method: Method::Bye,
            },
            bye,
            target_flow,
            None,
            Role::Plain,
            None,
        );
    }

    pub(in crate::proxy) fn end_dialog(&mut self, key: &DialogKey, how: End) {
        let Some(d) = self.dialogs.remove(key) else {
            return;
        };
        self.dialog_ids.remove(&d.id);
        if let Some(slot) = d.dest {
            self.dests.release(slot, &d.resources);
        }
        match d.phase {
            Phase::Confirmed => self.stats.active = self.stats.active.saturating_sub(1),
            Phase::Early => self.stats.early = self.stats.early.saturating_sub(1),
            Phase::Trying => {}
        }
        match how {
            End::Normal => {}
            End::Failed => self.metrics.dialogs_failed.inc(),
            End::Expired => self.metrics.dialogs_expired.inc(),
            End::Admin => self.metrics.dialogs_ended_admin.inc(),
        }
    }

    /// The lifetime or Session-Expires limit passed: BYE to both sides, load freed.
    pub(in crate::proxy) fn expire_dialog(&mut self, now: Instant, key: &DialogKey) {
        self.bye_both_sides(now, key, REASON_EXPIRED);
        info!(call_id = %key.call_id, "dialog expired: BYE sent to both sides");
        self.end_dialog(key, End::Expired);
    }

    /// Sends a BYE within the dialog to each side of a confirmed dialog, as the other side
    /// would: towards the server as the caller (caller's CSeq + 1, the server's route set),
    /// towards the caller as the server (server's CSeq + 1, the caller's route set). Returns
    /// whether each went out (caller, server): a side without a usable Contact or flow gets
    /// none. The dialog itself is left for the caller to end.
    pub(in crate::proxy) fn bye_both_sides(
        &mut self,
        now: Instant,
        key: &DialogKey,
        reason: &str,
    ) -> (bool, bool) {
        let Some(d) = self.dialogs.get(key).cloned() else {
            return (false, false);
        };
        if d.phase != Phase::Confirmed {
            return (false, false);
        }
        let (mut to_caller, mut to_server) = (false, false);
        let to_tagged = match &d.to_tag {
            Some(t) => format!("{};tag={t}", d.to_hdr),
            None => d.to_hdr.to_string(),
        };
        // Towards the callee: as the caller.
        if let (Some(contact), Some(flow)) = (&d.callee.contact, d.callee.flow) {
            let bye = self.make_bye(
                key,
                contact,
                &d.from_hdr,
                &to_tagged,
                d.caller.cseq.saturating_add(1),
                &d.callee.routes,
                reason,
            );
            to_server = self.send_own(now, bye, flow);
        }
        // Towards the caller: as the callee.
        if let (Some(contact), Some(flow)) = (&d.caller.contact, d.caller.flow) {
            let seq = d.callee.cseq.max(1).saturating_add(1);
            let bye = self.make_bye(
                key,
                contact,
                &to_tagged,
                &d.from_hdr,
                seq,
                &d.caller.routes,
                reason,
            );
            to_caller = self.send_own(now, bye, flow);
        }
        (to_caller, to_server)
    }

    #[allow(clippy::too_many_arguments)]
    pub(in crate::proxy) fn make_bye(
        &self,
        key: &DialogKey,
        ruri: &str,
        from: &str,
        to: &str,
        cseq: u32,
        routes: &[Box<str>],
        reason: &str,
    ) -> Message {
        let mut bye = Message::request(Method::Bye, ruri);
        for r in routes {
            bye.push(HeaderName::Route, r.to_string());
        }
        bye.push(HeaderName::From, from.to_string());
        bye.push(HeaderName::To, to.to_string());
        bye.push(HeaderName::CallId, key.call_id.to_string());
        bye.push(HeaderName::CSeq, format!("{cseq} BYE"));
        bye.push(HeaderName::Reason, reason.to_string());
        bye
    }

    /// Sends a request the proxy originates, in a client transaction of its own; false when
    /// no listener can reach the flow.
    pub(in crate::proxy) fn send_own(
        &mut self,
        now: Instant,
        mut req: Message,
        mut flow: Flow,
    ) -> bool {
        let Some(l) = self.out_listener(flow.transport, Some(flow.remote.is_ipv6())) else {
            return false;
        };
        flow.listener = l;
        let branch = self.new_branch();
        self.prepare_forward(&mut req, l, &branch);
        let Some(method) = req.method().cloned() else {
            return false;
        };
        self.start_client(
            now,
            ClientKey {
                branch: branch.into(),
                method,
            },
            req,
            flow,
            None,
            Role::Plain,
            None,
        );
        true
    }

    /// A dialog's deadline timer: re-armed when a refresh moved the deadline, else the dialog
    /// expires.
    pub(in crate::proxy) fn dialog_due(&mut self, now: Instant, id: u64) {
        let Some(key) = self.dialog_ids.get(&id).cloned() else {
            return;
        };
        let Some(d) = self.dialogs.get(&key) else {
            return;
        };
        let deadline = d.deadline();
        if deadline > now {
            // Refreshed since the timer was set.
            self.arm(deadline, Timer::Dialog(id));
            return;
        }
        self.expire_dialog(now, &key);
    }
}
