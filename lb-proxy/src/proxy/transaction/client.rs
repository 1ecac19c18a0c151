//! Client transactions (RFC 3261 17.1): a request sent on, its timeouts, and every response
//! received, matched by branch and CSeq method.

use crate::proxy::*;

impl Proxy {
    /// Creates a client transaction, sends its request and arms its timers.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::proxy) fn start_client(
        &mut self,
        now: Instant,
        key: ClientKey,
        request: Message,
        flow: Flow,
        server: Option<ServerKey>,
        role: Role,
        upstream: Option<Flow>,
    ) {
        let id = self.next_serial();
        let data = request.to_bytes();
        let out = self.outbound(flow, data, Some(id));
        self.out.push(out.clone());
        let transport = out.transport;
        let t = &self.cfg.timers;
        let (t1, invite_timeout, non_invite_timeout) =
            (t.t1, t.invite_timeout, t.non_invite_timeout);
        if flow.transport == Transport::Udp {
            self.arm(now + t1, Timer::ClientRetransmit(id));
        }
        let timeout = match role {
            Role::Probe(..) => self.cfg.probing.timeout,
            _ if key.method == Method::Invite => invite_timeout,
            _ => non_invite_timeout,
        };
        self.arm(now + timeout, Timer::ClientTimeout(id));
        self.client_ids.insert(id, key.clone());
        self.client_txs.insert(
            key,
            ClientTx {
                id,
                sent: Some(Box::new(SentRequest { request, out })),
                transport,
                state: ClientState::Calling,
                retransmit: t1,
                server,
                role,
                cancel_pending: false,
                abandoned: false,
                upstream,
            },
        );
    }

    pub(in crate::proxy) fn on_response(&mut self, now: Instant, mut msg: Message, _flow: Flow) {
        let Some(via) = msg.top_via() else { return };
        let Some(status) = msg.status() else {
            return;
        };
        let code = status.as_u16();
        let Some((_, method)) = msg.cseq() else {
            return;
        };
        let key = ClientKey {
            branch: via.branch().unwrap_or_default().into(),
            method: method.clone(),
        };
        let Some(ctx) = self.client_txs.get_mut(&key) else {
            // No transaction: forward 2xx to INVITE statelessly if the Via is ours
            // (retransmissions after the transaction ended).
            // Only a branch this process made: a forged response relays nothing.
            if status.is_success()
                && method == Method::Invite
                && self.is_self(&via.host, via.port)
                && key.branch.starts_with(&self.branch_prefix)
            {
                msg.remove_first(&HeaderName::Via);
                if let Some(next) = msg.top_via().and_then(|v| self.via_flow(&v)) {
                    self.send_response(next, code, msg.to_bytes());
                }
            }
            return;
        };
        if ctx.server.is_some() && msg.count(&HeaderName::Via) < 2 {
            // Nothing to relay it to: the server dropped the caller's Via.
            debug!(branch = %key.branch, "response without the caller's Via dropped");
            return;
        }
        let id = ctx.id;
        let reliable = ctx.transport.is_stream();
        let is_invite = method == Method::Invite;
        // Retransmitted final on a completed transaction.
        if matches!(ctx.state, ClientState::Completed | ClientState::Accepted) {
            if is_invite && status.is_success() {
                // A 2xx retransmission: relayed, unless the branch was given up on (then our
                // own ACK and BYE have already answered it).
                if let Some(up) = ctx.upstream.filter(|_| !ctx.abandoned) {
                    msg.remove_first(&HeaderName::Via);
                    self.send_response(up, code, msg.to_bytes());
                }
            } else if is_invite && ctx.state == ClientState::Completed {
                if let Some(ack) = ctx.ack_for(&msg) {
                    self.out.push(ack);
                }
            }
            return;
        }
        if status.is_provisional() {
            let was_calling = ctx.state == ClientState::Calling;
            ctx.state = ClientState::Proceeding;
            let cancel_pending = ctx.cancel_pending;
            let abandoned = ctx.abandoned;
            let server = ctx.server.clone();
            if is_invite && was_calling {
                self.arm(
                    now + self.cfg.timers.invite_final_timeout,
                    Timer::ClientFinalTimeout(id),
                );
            }
            if !is_invite && was_calling && !reliable {
                // Non-INVITE in Proceeding retransmits at T2.
                if let Some(c) = self.client_txs.get_mut(&key) {
                    c.retransmit = self.cfg.timers.t2;
                }
            }
            // Cancelled by the caller, or given up on after a timeout: stop it ringing.
            if cancel_pending || (abandoned && is_invite) {
                return self.cancel_branch(now, &key, None);
            }
            if abandoned || code == 100 {
                return;
            }
            if let Some(skey) = server {
                if is_invite {
                    self.note_provisional(&skey, &msg);
                }
                msg.remove_first(&HeaderName::Via);
                let data = msg.to_bytes();
                if let Some(stx) = self.server_txs.get_mut(&skey) {
                    if stx.state == ServerState::Proceeding {
                        stx.last_response = Some(data.clone());
                        let reply = stx.reply;
                        self.send_response(reply, code, data);
                    }
                }
            }
            return;
        }
        // Final response.
        ctx.state = if is_invite && status.is_success() {
            ClientState::Accepted
        } else {
            ClientState::Completed
        };
        if ctx.state == ClientState::Accepted && !ctx.abandoned {
            // Only the upstream flow is needed from now on (to relay 2xx retransmissions).
            ctx.sent = None;
        }
        let abandoned = ctx.abandoned;
        let server = ctx.server.clone();
        let role = ctx.role;
        let cleanup = if reliable {
            Duration::ZERO
        } else if is_invite {
            self.cfg.timers.t1 * 64
        } else {
            self.cfg.timers.t4
        };
        if is_invite && !status.is_success() {
            if let Some(ack) = ctx.ack_for(&msg) {
                self.out.push(ack);
            }
        }
        self.arm(now + cleanup, Timer::ClientCleanup(id));
        if abandoned {
            if status.is_success() && is_invite {
                self.hang_up_late_answer(now, &key, &msg);
            }
            return;
        }
        if let Role::Probe(dest, sent) = role {
            let alive = self.cfg.probing.is_alive(code);
            return self.probe_result(
                dest,
                code,
                alive.then(|| now.saturating_duration_since(sent)),
            );
        }
        let Some(skey) = server else {
            return; // Our own request (CANCEL, expiry BYE): nothing to relay.
        };
        let is_call = self
            .server_txs
            .get(&skey)
            .is_some_and(|t| t.call().is_some());
        if is_invite && is_call {
            let dest = match role {
                Role::Branch(d) => Some(d),
                _ => None,
            };
            self.branch_final(now, &skey, msg, dest);
        } else {
            if is_invite && status.is_success() {
                self.refresh_session(now, &msg);
                self.settle_reinvite(&skey, &msg);
            }
            msg.remove_first(&HeaderName::Via);
            self.final_upstream(now, &skey, msg);
        }
    }

    pub(in crate::proxy) fn client_timeout(
        &mut self,
        now: Instant,
        key: ClientKey,
        transport_error: bool,
    ) {
        let Some(ctx) = self.client_txs.get_mut(&key) else {
            return;
        };
        let is_invite = key.method == Method::Invite;
        let timed_out = match ctx.state {
            ClientState::Calling => true,
            ClientState::Proceeding => !is_invite || transport_error,
            ClientState::Completed | ClientState::Accepted => false,
        };
        if !timed_out || ctx.abandoned {
            return;
        }
        ctx.abandoned = true;
        let id = ctx.id;
        let server = ctx.server.clone();
        let role = ctx.role;
        let cancel_pending = ctx.cancel_pending;
        if is_invite {
            // Kept a while, so that a late answer is hung up rather than relayed.
            let linger = self.cfg.timers.t1 * 64;
            self.arm(now + linger, Timer::ClientCleanup(id));
        } else {
            ctx.state = ClientState::Completed;
            self.arm(now, Timer::ClientCleanup(id));
        }
        match role {
            Role::Branch(dest) if is_invite => {
                if let Some(d) = self.dests.live_mut(dest) {
                    warn!(destination = %d.spec.id, uri = %d.spec.uri, "no response to INVITE: marked down");
                    d.probe.consecutive_successes = 0;
                    d.set_health(Health::DownTimeout);
                }
            }
            Role::Probe(dest, _) => return self.probe_result(dest, 408, None),
            _ => {}
        }
        let Some(skey) = server else { return };
        let is_call = self
            .server_txs
            .get(&skey)
            .is_some_and(|t| t.call().is_some());
        if is_invite && is_call {
            if cancel_pending {
                let dkey = self
                    .server_txs
                    .get_mut(&skey)
                    .and_then(|t| t.call_mut())
                    .map(|c| {
                        c.branch = None;
                        c.dialog.clone()
                    });
                if let Some(dkey) = dkey {
                    self.release_branch(&dkey);
                }
                return self.final_local(now, &skey, 487, "Request Terminated");
            }
            self.branch_gave_up(now, &skey);
        } else {
            self.final_local(now, &skey, 408, "Request Timeout");
        }
    }

    /// Sends CANCEL on an INVITE branch once it has a provisional response (RFC 3261 9.1),
    /// or marks it to be cancelled when one arrives.
    pub(in crate::proxy) fn cancel_branch(
        &mut self,
        now: Instant,
        ckey: &ClientKey,
        reason: Option<&str>,
    ) {
        let Some(ctx) = self.client_txs.get_mut(ckey) else {
            return;
        };
        match ctx.state {
            ClientState::Calling => {
                ctx.cancel_pending = true;
                return;
            }
            ClientState::Completed | ClientState::Accepted => return,
            ClientState::Proceeding => {}
        }
        let Some(sent) = ctx.sent.as_deref() else {
            return;
        };
        let req = &sent.request;
        // RFC 3261 9.1: same Request-URI, top Via, From, To, Call-ID, CSeq number and Route.
        let to = req.get(&HeaderName::To).unwrap_or_default().to_string();
        let mut cancel = same_transaction(req, Method::Cancel, &to);
        if let Some(reason) = reason {
            cancel.push(HeaderName::Reason, reason.to_string());
        }
        let flow = Flow {
            transport: sent.out.transport,
            listener: sent.out.listener,
            remote: match sent.out.target {
                Target::Addr(a) => a,
                Target::Host(..) => return,
            },
            conn: sent.out.conn,
        };
        let key = ClientKey {
            branch: ckey.branch.clone(),
            method: Method::Cancel,
        };
        if !self.client_txs.contains_key(&key) {
            self.start_client(now, key, cancel, flow, None, Role::Plain, None);
        }
    }

    /// Timer A / E: retransmits the request while it waits, at the interval
    /// [`ClientTx::next_retransmit`] gives.
    pub(in crate::proxy) fn client_retransmit(&mut self, now: Instant, id: u64) {
        let Some(key) = self.client_ids.get(&id) else {
            return;
        };
        let t2 = self.cfg.timers.t2;
        let is_invite = key.method == Method::Invite;
        let Some(ctx) = self.client_txs.get_mut(key) else {
            return;
        };
        let Some(wait) = ctx.next_retransmit(is_invite, t2) else {
            return;
        };
        if let Some(sent) = ctx.sent.as_deref() {
            self.out.push(sent.out.clone());
        }
        self.arm(now + wait, Timer::ClientRetransmit(id));
    }

    /// Timer C: a provisional but no final in time: CANCEL the branch and try the next server
    /// (a relayed re-INVITE has no other server: the caller gets 408 now).
    pub(in crate::proxy) fn client_final_timeout(&mut self, now: Instant, id: u64) {
        let Some(key) = self.client_ids.get(&id).cloned() else {
            return;
        };
        let Some(ctx) = self.client_txs.get_mut(&key) else {
            return;
        };
        if ctx.state != ClientState::Proceeding || ctx.abandoned {
            return;
        }
        ctx.abandoned = true;
        let server = ctx.server.clone();
        // Kept 64*T1 for a late final (ACKed) or 2xx (hung up), then dropped even if
        // the server never answers the CANCEL (RFC 3261 9.1).
        let linger = self.cfg.timers.t1 * 64;
        self.arm(now + linger, Timer::ClientCleanup(id));
        self.cancel_branch(
            now,
            &key,
            Some("SIP;cause=408;text=\"final response timeout\""),
        );
        let Some(skey) = server else { return };
        if self
            .server_txs
            .get(&skey)
            .is_some_and(|t| t.call().is_some())
        {
            self.branch_gave_up(now, &skey);
        } else {
            // A relayed re-INVITE: no other server to try, so the caller gets the
            // final response now (the 487 the CANCEL brings is absorbed).
            self.final_local(now, &skey, 408, "Request Timeout");
        }
    }
}
