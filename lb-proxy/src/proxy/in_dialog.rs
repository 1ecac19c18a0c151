//! Requests inside a dialog (with a To tag): the dialog they belong to, the next hop the relay
//! rule ([`super::relay`]) allows, and their relay as a new client transaction.

use super::*;

impl Proxy {
    /// Requests inside a dialog: routed by their Route headers (loose routing), or by the
    /// dialog's memory when the client sends them straight to the proxy without Route.
    pub(in crate::proxy) fn in_dialog(
        &mut self,
        now: Instant,
        mut msg: Message,
        flow: Flow,
        key: ServerKey,
    ) {
        let Some(method) = msg.method().cloned() else {
            return;
        };
        let is_ack = method == Method::Ack;
        if !self.may_forward(&msg, flow) {
            return;
        }
        // The relay rule (relay.rs): where it may go, if anywhere.
        let hop = match self.next_hop(now, &mut msg, flow) {
            Ok(hop) => hop,
            Err(why) => return self.refuse_relay(&msg, flow, why),
        };
        let mut target = hop.target;
        // Send from a listener of the target's transport and family.
        if let Some(l) = self.out_listener(target.transport, Some(target.remote.is_ipv6())) {
            target.listener = l;
        } else {
            if !is_ack {
                self.reply(&msg, flow, 503, "Service Unavailable");
            }
            return;
        }
        if !is_ack && !self.admit_transaction(&msg, flow) {
            return;
        }
        // Track the dialog: CSeq, and BYE ends it.
        if let Some((k, from_caller)) = &hop.dialog {
            let seq = msg.cseq().map(|c| c.0).unwrap_or(0);
            if let Some(d) = self.dialogs.get_mut(k) {
                let party = if *from_caller {
                    &mut d.caller
                } else {
                    &mut d.callee
                };
                party.cseq = party.cseq.max(seq);
                if !is_ack {
                    party.flow = Some(flow);
                }
            }
            if method == Method::Bye {
                self.end_dialog(k, End::Normal);
            }
        } else if method == Method::Bye {
            // Set up through another replica (or before a restart): its owner frees the load.
            self.announce_end(&msg);
        }
        if is_ack {
            // Stateless, but the branch must be unique and stable across retransmissions.
            let branch = format!("{}a{:x}", self.branch_prefix, fxhash(&key.branch));
            self.prepare_forward(&mut msg, target.listener, &branch);
            self.send(target, msg.to_bytes(), None);
            return;
        }
        let upstream = self.response_flow(&msg, flow);
        self.new_server_tx(msg.clone(), flow, &key);
        if method == Method::Invite {
            let trying = self.make_response(&msg, 100, "Trying", None).to_bytes();
            self.send_response(upstream, 100, trying.clone());
            if let Some(tx) = self.server_txs.get_mut(&key) {
                tx.last_response = Some(trying);
            }
        }
        let branch = self.new_branch();
        self.prepare_forward(&mut msg, target.listener, &branch);
        let ckey = ClientKey {
            branch: branch.into(),
            method,
        };
        self.start_client(
            now,
            ckey,
            msg,
            target,
            Some(key),
            Role::Plain,
            Some(upstream),
        );
    }

    pub(in crate::proxy) fn find_dialog(&self, msg: &Message) -> Option<DialogKey> {
        let call_id: Arc<str> = msg.call_id()?.into();
        for tag in [msg.from_tag(), msg.to_tag()].into_iter().flatten() {
            let k = DialogKey {
                call_id: call_id.clone(),
                caller_tag: tag.into(),
            };
            if self.dialogs.contains_key(&k) {
                return Some(k);
            }
        }
        None
    }

    /// Where a URI points: its transport and address, when the host is an IP literal or a
    /// known destination's host name.
    pub(in crate::proxy) fn uri_flow(&self, uri: &SipUriRef<'_>) -> Option<Flow> {
        let transport = uri.transport();
        let remote = uri.socket_addr().or_else(|| {
            self.dests
                .iter()
                .find(|d| d.uri.host.eq_ignore_ascii_case(uri.host) && d.uri.port == uri.port)
                .and_then(|d| d.addr)
        })?;
        Some(Flow {
            transport,
            listener: self.out_listener(transport, Some(remote.is_ipv6()))?,
            remote,
            conn: None,
        })
    }
}
