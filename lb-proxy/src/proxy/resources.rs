//! What a session is counted against, from its INVITE to its end.
//!
//! With a fixed list (`routing.resources: [pstn]`, OpenSIPS' `lb_start(1, "pstn")`) every
//! session takes one unit of each listed resource. With `routing.resources: sdp` a session
//! takes one unit per MRCPv2 channel of its offer (`a=resource:`), plus
//! `routing.sdp.perSession`:
//!
//! - the offer reserves its channels on the chosen destination (and on the next one at
//!   failover);
//! - the 2xx settles them: a channel the server rejected (port 0, no `a=channel`) is released
//!   at once;
//! - a re-INVITE's 2xx applies the difference on the same destination: a channel added takes a
//!   unit, one removed (port 0) gives it back; a refused re-INVITE changes nothing;
//! - a 406 to an initial INVITE means the destination has no engine for a resource of the
//!   session: it is kept from that resource for a probe interval and the session fails over.
//!
//! A session's list of resources is shared with every session that asks for the same ones
//! ([`ResourceSets`]): a dialog holds a pointer, not its own strings.

use super::*;
use crate::config::{Resources, SdpRouting};
use crate::sdp;

/// Distinct resource lists kept for sharing; past this many, a list is allocated per session.
const MAX_SETS: usize = 64;

/// The resource lists sessions hold, each kept once: sorted, lower case.
#[derive(Debug, Default)]
pub(in crate::proxy) struct ResourceSets {
    sets: Vec<Arc<Vec<String>>>,
}

impl ResourceSets {
    /// The shared list holding exactly `names` (in any order, any case).
    pub(in crate::proxy) fn get(&mut self, names: &mut [&str]) -> Arc<Vec<String>> {
        names.sort_unstable_by(|a, b| {
            a.bytes()
                .map(|c| c.to_ascii_lowercase())
                .cmp(b.bytes().map(|c| c.to_ascii_lowercase()))
        });
        let same = |s: &Arc<Vec<String>>| {
            s.len() == names.len()
                && s.iter()
                    .zip(names.iter())
                    .all(|(a, b)| a.eq_ignore_ascii_case(b))
        };
        if let Some(s) = self.sets.iter().find(|s| same(s)) {
            return s.clone();
        }
        let s = Arc::new(names.iter().map(|n| n.to_ascii_lowercase()).collect());
        if self.sets.len() < MAX_SETS {
            self.sets.push(Arc::clone(&s));
        }
        s
    }
}

/// Why a new INVITE cannot be counted: the response it gets.
pub(in crate::proxy) struct Refused {
    pub code: u16,
    pub reason: String,
}

/// `a` without one instance of each of `b` (multisets).
fn minus<'a>(a: &'a [String], b: &[String]) -> Vec<&'a str> {
    let mut left: Vec<Option<&str>> = b.iter().map(|s| Some(s.as_str())).collect();
    a.iter()
        .filter(
            |x| match left.iter_mut().find(|l| l.is_some_and(|l| l == x.as_str())) {
                Some(slot) => {
                    *slot = None;
                    false
                }
                None => true,
            },
        )
        .map(String::as_str)
        .collect()
}

/// The SDP body of `msg`, when it has one.
fn sdp_body(msg: &Message) -> Option<&[u8]> {
    let ct = msg.get(&HeaderName::ContentType)?;
    (sdp::is_sdp(ct) && !msg.body.is_empty()).then_some(&msg.body[..])
}

impl Proxy {
    fn sdp_routing(&self) -> &SdpRouting {
        &self.cfg.routing.sdp
    }

    /// What a new INVITE on `listener` is counted against, and whether it came from the SDP
    /// (then the answer settles it).
    pub(in crate::proxy) fn session_resources(
        &mut self,
        listener: usize,
        msg: &Message,
    ) -> Result<(Arc<Vec<String>>, bool), Refused> {
        let sdp_mode = match self.listener_resources.get(listener) {
            Some(Some(fixed)) => return Ok((fixed.clone(), false)),
            Some(None) => true,
            None => false,
        };
        if !sdp_mode {
            return Ok((Arc::default(), false));
        }
        let offer = match sdp_body(msg).map(|b| sdp::read(b, true)) {
            Some(Ok(channels)) => channels,
            Some(Err(e)) => {
                self.metrics.sdp.offers_bad.inc();
                debug!("bad SDP offer: {e}");
                return Err(Refused {
                    code: 400,
                    reason: format!("Bad SDP: {e}"),
                });
            }
            None => sdp::Channels::default(),
        };
        let cfg = Arc::clone(&self.cfg);
        let sdp_cfg = &cfg.routing.sdp;
        let mut names: Vec<&str> = offer.offered().collect();
        let from_sdp = !names.is_empty();
        if from_sdp {
            names.extend(sdp_cfg.per_session.iter().map(String::as_str));
            self.metrics.sdp.offers_channels.inc();
        } else if sdp_cfg.fallback.is_empty() {
            self.metrics.sdp.offers_refused.inc();
            return Err(Refused {
                code: 488,
                reason: "No MRCP channel in the offer".to_string(),
            });
        } else {
            names.extend(sdp_cfg.fallback.iter().map(String::as_str));
            self.metrics.sdp.offers_fallback.inc();
        }
        Ok((self.resource_sets.get(&mut names), from_sdp))
    }

    /// The answer in `answer` to the offer of the INVITE in server transaction `skey` (the
    /// initial INVITE or a re-INVITE of dialog `dkey`): the dialog now holds what the server
    /// accepted, on the destination it holds it on.
    pub(in crate::proxy) fn settle_channels(
        &mut self,
        skey: &ServerKey,
        dkey: &DialogKey,
        answer: &Message,
    ) {
        if !self.sdp_listeners {
            return;
        }
        let Some(d) = self.dialogs.get(dkey) else {
            return;
        };
        let (Some(slot), true) = (d.dest, d.sdp) else {
            return;
        };
        let Some(request) = self
            .server_txs
            .get(skey)
            .and_then(|t| t.live.as_ref())
            .map(|l| &l.request)
        else {
            return;
        };
        // A re-INVITE without an offer, or one with no MRCPv2 section (a session refresh):
        // nothing changes. So for an answer that is no SDP.
        let Some(Ok(offer)) = sdp_body(request).map(|b| sdp::read(b, true)) else {
            return;
        };
        if offer.list.is_empty() {
            return;
        }
        let answered = match sdp_body(answer).map(|b| sdp::read(b, false)) {
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                debug!("answer's SDP unreadable, reservation kept: {e}");
                return;
            }
            None => return,
        };
        let mut names = answered.accepted_of(&offer);
        let accepted = names.len();
        let rejected = offer.offered().count() - accepted;
        let m = &self.metrics.sdp;
        m.channels_accepted.inc_by(accepted as u64);
        if rejected > 0 {
            m.channels_rejected.inc_by(rejected as u64);
        }
        let cfg = Arc::clone(&self.cfg);
        names.extend(cfg.routing.sdp.per_session.iter().map(String::as_str));
        let now_holds = self.resource_sets.get(&mut names);
        // Proven: the accepted channels' resources (and the per-session ones, which a 406
        // never blames).
        self.dests.proven(slot, &names);
        let held = d.resources.clone();
        if Arc::ptr_eq(&held, &now_holds) {
            // Everything offered was accepted (the common answer): nothing moves.
            return;
        }
        let gone = minus(&held, &now_holds);
        let added = minus(&now_holds, &held);
        if !gone.is_empty() {
            self.dests.remove_units(slot, &gone);
        }
        if !added.is_empty() {
            self.dests.add_units(slot, &added);
        }
        if !gone.is_empty() || !added.is_empty() {
            debug!(
                call_id = %dkey.call_id,
                released = ?gone,
                taken = ?added,
                "MRCP channels settled"
            );
        }
        if let Some(d) = self.dialogs.get_mut(dkey) {
            d.resources = now_holds;
        }
    }

    /// The 2xx of a request inside a dialog (a re-INVITE): its channels settle.
    pub(in crate::proxy) fn settle_reinvite(&mut self, skey: &ServerKey, answer: &Message) {
        if !self.sdp_listeners {
            return;
        }
        if let Some(dkey) = self.find_dialog(answer) {
            self.settle_channels(skey, &dkey, answer);
        }
    }

    /// Whether a 406 on a branch of dialog `dkey` is "not offered here" (SDP routing with
    /// `routing.sdp.notAcceptable`): then `dest` is kept from the session's MRCP resources
    /// for a probe interval.
    pub(in crate::proxy) fn not_acceptable(
        &mut self,
        now: Instant,
        dest: Option<DestRef>,
        dkey: &DialogKey,
    ) -> bool {
        if !self.sdp_routing().not_acceptable {
            return false;
        }
        let Some(d) = self.dialogs.get(dkey).filter(|d| d.sdp) else {
            return false;
        };
        let channels: Vec<String> = minus(&d.resources, &self.cfg.routing.sdp.per_session)
            .into_iter()
            .map(str::to_string)
            .collect();
        let Some(dest) = dest else { return true };
        let until = now + self.cfg.probing.interval;
        if let Some(dst) = self.dests.live_mut(dest) {
            let refused = dst.refuse(&channels, until);
            info!(
                destination = %dst.spec.id,
                resources = ?refused,
                "406 Not Acceptable: destination kept from these resources for a probe interval"
            );
            self.metrics.not_acceptable.inc();
            self.arm(until, Timer::Hold(dest.slot));
        }
        true
    }
}

/// The per-listener rule as the core keeps it: a shared fixed list, or None for SDP.
pub(in crate::proxy) fn listener_rule(r: &Resources) -> Option<Arc<Vec<String>>> {
    match r {
        Resources::Fixed(l) => Some(Arc::new(l.clone())),
        Resources::Sdp => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn multiset_difference() {
        let a = v(&["pstn", "speechrecog", "speechrecog", "speechsynth"]);
        let b = v(&["speechrecog", "pstn", "recorder"]);
        assert_eq!(minus(&a, &b), vec!["speechrecog", "speechsynth"]);
        assert_eq!(minus(&b, &a), vec!["recorder"]);
        assert!(minus(&a, &a).is_empty());
    }

    #[test]
    fn resource_sets_are_shared_whatever_the_order_and_case() {
        let mut sets = ResourceSets::default();
        let one = sets.get(&mut ["speechsynth", "speechrecog"]);
        let two = sets.get(&mut ["SpeechRecog", "speechsynth"]);
        assert!(Arc::ptr_eq(&one, &two));
        assert_eq!(*one, v(&["speechrecog", "speechsynth"]));
        let three = sets.get(&mut ["speechrecog", "speechrecog"]);
        assert_eq!(*three, v(&["speechrecog", "speechrecog"]));
        assert!(!Arc::ptr_eq(&one, &three));
    }
}
