//! The timer queue: one heap of (due time, serial, [`Timer`]); [`Proxy::fire`] runs a due timer.
//! The RFC 3261 timers each one stands for are named on its variant.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(in crate::proxy) enum Timer {
    ClientRetransmit(u64),
    ClientTimeout(u64),
    ClientFinalTimeout(u64),
    ClientCleanup(u64),
    ServerRetransmit(u64),
    ServerTimeout(u64),
    ServerCleanup(u64),
    Dialog(u64),
    /// End of a Retry-After hold on a destination slot.
    Hold(usize),
    /// Time to probe the destination.
    Probe(DestRef),
    /// Load sharing: expire silent peers, resend what is unacknowledged.
    Cluster,
}

impl Proxy {
    pub(in crate::proxy) fn arm(&mut self, at: Instant, t: Timer) {
        let seq = self.next_serial();
        self.timers.push(Reverse((at, seq, t)));
        // Timers are cancelled lazily (a fired timer whose object is gone does nothing), so
        // entries of ended dialogs could pile up for their whole lifetime limit: drop them
        // when they outnumber the live objects.
        let live = self.client_ids.len() + self.server_ids.len() + self.dialog_ids.len();
        if self.timers.len() > 1024 + 4 * live {
            self.compact_timers();
        }
    }

    pub(in crate::proxy) fn compact_timers(&mut self) {
        let timers = std::mem::take(&mut self.timers);
        self.timers = timers
            .into_iter()
            .filter(|Reverse((_, _, t))| match t {
                Timer::ClientRetransmit(id)
                | Timer::ClientTimeout(id)
                | Timer::ClientFinalTimeout(id)
                | Timer::ClientCleanup(id) => self.client_ids.contains_key(id),
                Timer::ServerRetransmit(id)
                | Timer::ServerTimeout(id)
                | Timer::ServerCleanup(id) => self.server_ids.contains_key(id),
                Timer::Dialog(id) => self.dialog_ids.contains_key(id),
                Timer::Hold(_) | Timer::Probe(..) | Timer::Cluster => true,
            })
            .collect();
    }

    pub(in crate::proxy) fn fire(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::ClientRetransmit(id) => {
                let Some(key) = self.client_ids.get(&id).cloned() else {
                    return;
                };
                let t2 = self.cfg.timers.t2;
                let Some(ctx) = self.client_txs.get_mut(&key) else {
                    return;
                };
                let is_invite = key.method == Method::Invite;
                let active = !ctx.abandoned
                    && match ctx.state {
                        ClientState::Calling => true,
                        ClientState::Proceeding => !is_invite,
                        ClientState::Completed | ClientState::Accepted => false,
                    };
                if !active {
                    return;
                }
                self.out.push(ctx.out.clone());
                ctx.retransmit = if is_invite {
                    ctx.retransmit * 2
                } else if ctx.state == ClientState::Proceeding {
                    t2
                } else {
                    (ctx.retransmit * 2).min(t2)
                };
                let next = now + ctx.retransmit;
                self.arm(next, Timer::ClientRetransmit(id));
            }
            Timer::ClientTimeout(id) => {
                let Some(key) = self.client_ids.get(&id).cloned() else {
                    return;
                };
                self.client_timeout(now, key, false);
            }
            Timer::ClientFinalTimeout(id) => {
                let Some(key) = self.client_ids.get(&id).cloned() else {
                    return;
                };
                let Some(ctx) = self.client_txs.get_mut(&key) else {
                    return;
                };
                if ctx.state != ClientState::Proceeding || ctx.abandoned {
                    return;
                }
                // Provisional but no final in time: CANCEL and try the next server.
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
                if self.server_txs.get(&skey).is_some_and(|t| t.call.is_some()) {
                    self.branch_gave_up(now, &skey);
                } else {
                    // A relayed re-INVITE: no other server to try, so the caller gets the
                    // final response now (the 487 the CANCEL brings is absorbed).
                    self.final_local(now, &skey, 408, "Request Timeout");
                }
            }
            Timer::ClientCleanup(id) => {
                if let Some(key) = self.client_ids.remove(&id) {
                    self.client_txs.remove(&key);
                }
            }
            Timer::ServerRetransmit(id) => {
                let Some(key) = self.server_ids.get(&id).cloned() else {
                    return;
                };
                let t2 = self.cfg.timers.t2;
                let Some(tx) = self.server_txs.get_mut(&key) else {
                    return;
                };
                if tx.state != ServerState::Completed {
                    return;
                }
                if let Some(last) = tx.last_response.clone() {
                    let reply = tx.reply;
                    tx.retransmit = (tx.retransmit * 2).min(t2);
                    let next = now + tx.retransmit;
                    self.send(reply, last, None);
                    self.arm(next, Timer::ServerRetransmit(id));
                }
            }
            Timer::ServerTimeout(id) | Timer::ServerCleanup(id) => {
                if let Some(key) = self.server_ids.remove(&id) {
                    if let Some(tx) = self.server_txs.remove(&key) {
                        if tx.state == ServerState::Proceeding {
                            self.pending = self.pending.saturating_sub(1);
                        }
                    }
                }
            }
            Timer::Probe(d) => self.probe_due(now, d),
            Timer::Cluster => self.cluster_tick(now),
            Timer::Hold(slot) => {
                if let Some(d) = self.dests.get_mut(slot) {
                    if d.held_until.is_some_and(|h| h <= now) {
                        d.held_until = None;
                    }
                }
            }
            Timer::Dialog(id) => {
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
    }
}
