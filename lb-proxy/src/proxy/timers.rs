//! The timer queue: one heap of (due time, serial, [`Timer`]); [`Proxy::fire`] runs a due timer.
//! The RFC 3261 timers each one stands for are named on its variant.

use super::*;

/// Everything that can be due. Transaction timers carry the transaction's id; their RFC 3261
/// letters are given per variant (INVITE / non-INVITE).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(in crate::proxy) enum Timer {
    /// Timer A / E: retransmit a request over UDP (T1 doubling; E capped at T2).
    ClientRetransmit(u64),
    /// Timer B / F: no final response in time (`inviteTimeout`, `nonInviteTimeout`, 64×T1).
    ClientTimeout(u64),
    /// Timer C (RFC 3261 16.6 step 11): a provisional but no final within
    /// `inviteFinalTimeout`: CANCEL the branch.
    ClientFinalTimeout(u64),
    /// Timer D / K: the completed client transaction is forgotten (absorbed retransmissions
    /// until then); also the 64×T1 linger of an abandoned INVITE branch and of an accepted one
    /// (RFC 6026 Timer M).
    ClientCleanup(u64),
    /// Timer G: retransmit a non-2xx final response over UDP until the ACK (T1 doubling,
    /// capped at T2).
    ServerRetransmit(u64),
    /// Timer H: no ACK for a non-2xx final within 64×T1.
    ServerTimeout(u64),
    /// Timer I / J / L: the completed, confirmed or accepted server transaction is forgotten.
    ServerCleanup(u64),
    /// A dialog's lifetime or Session-Expires deadline (RFC 4028).
    Dialog(u64),
    /// End of a Retry-After hold, or of a 406 refusal, on a destination slot.
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

    /// Runs a timer that is due. A timer whose transaction, dialog or destination is gone does
    /// nothing (timers are cancelled lazily).
    pub(in crate::proxy) fn fire(&mut self, now: Instant, timer: Timer) {
        let span = tracing::debug_span!("timer", timer = ?timer);
        let _in_span = span.enter();
        match timer {
            Timer::ClientRetransmit(id) => self.client_retransmit(now, id),
            Timer::ClientTimeout(id) => {
                if let Some(key) = self.client_ids.get(&id).cloned() {
                    self.client_timeout(now, key, false);
                }
            }
            Timer::ClientFinalTimeout(id) => self.client_final_timeout(now, id),
            Timer::ClientCleanup(id) => {
                if let Some(key) = self.client_ids.remove(&id) {
                    self.client_txs.remove(&key);
                }
            }
            Timer::ServerRetransmit(id) => self.server_retransmit(now, id),
            Timer::ServerTimeout(id) | Timer::ServerCleanup(id) => self.server_cleanup(id),
            Timer::Probe(d) => self.probe_due(now, d),
            Timer::Cluster => self.cluster_tick(now),
            Timer::Hold(slot) => {
                if let Some(d) = self.dests.get_mut(slot) {
                    if d.held_until.is_some_and(|h| h <= now) {
                        d.held_until = None;
                    }
                    d.end_refusals(now);
                }
            }
            Timer::Dialog(id) => self.dialog_due(now, id),
        }
    }
}
