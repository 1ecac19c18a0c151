//! Per-session control for the admin API (OpenSIPS `dlg_list`, `dlg_end_dlg`,
//! `profile_end_dlgs`): listing this replica's dialogs page by page, and ending one, or every
//! one on a destination, with a BYE to both sides.
//!
//! Every request is bounded: a page looks at no more than [`SCAN_BUDGET`] dialogs and copies
//! at most its `limit`, so that listing a million dialogs never holds the core (and the calls
//! behind it) for more than a moment. Pages follow the order dialogs were created in (their
//! serial), so a cursor stays valid while dialogs come and go: a dialog that lives through the
//! whole listing is listed exactly once, one created meanwhile shows on a later page, one that
//! ended is simply gone.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use lb_api::admin::{DialogEnded, DialogInfo, DialogList, DialogState};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::SystemTime;

use super::*;

/// The most dialogs one request looks at (matching or not).
pub const SCAN_BUDGET: usize = 10_000;
/// The most dialogs one bulk-end request ends; the admin API asks again for the rest.
pub const END_BATCH: usize = 200;
/// The longest dialog id accepted (a Call-ID and a tag, base64url): longer is no id of ours.
pub const MAX_ID_LEN: usize = 4096;
/// The Reason of the BYEs the admin API makes the proxy send.
const REASON_ADMIN: &str = "SIP;cause=200;text=\"ended by administrator\"";

/// Which dialogs a listing or a bulk end is about; every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DialogFilter {
    /// The destination id, exactly.
    pub destination: Option<String>,
    pub state: Option<DialogState>,
    /// At least this old.
    pub min_age: Option<Duration>,
    /// The Call-ID, exactly.
    pub call_id: Option<String>,
}

/// One page of `GET /v1/dialogs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialogQuery {
    pub filter: DialogFilter,
    /// Dialogs after this cursor (0: from the first).
    pub after: u64,
    pub limit: usize,
}

/// Why `DELETE /v1/dialogs/{id}` ended nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum EndError {
    NotFound,
    /// Still being set up: its INVITE transaction ends it.
    NotConfirmed(Box<DialogInfo>),
}

/// One batch of a bulk end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndBatch {
    /// The destination id is known here (in the set, or removed and still carrying calls).
    pub known: bool,
    pub ended: u64,
    pub byes_sent: u64,
    pub not_confirmed: u64,
    /// Where to go on; None when the last dialog was looked at.
    pub next: Option<u64>,
}

/// The id of the dialog `key`: base64url of `Call-ID \n caller's tag` (a Call-ID holds no
/// line break), so that the core finds it again without any index.
pub fn dialog_id(key: &DialogKey) -> String {
    let mut raw = String::with_capacity(key.call_id.len() + 1 + key.caller_tag.len());
    raw.push_str(&key.call_id);
    raw.push('\n');
    raw.push_str(&key.caller_tag);
    URL_SAFE_NO_PAD.encode(raw)
}

/// The key a dialog id stands for; the error says what is wrong with it.
pub fn parse_dialog_id(id: &str) -> Result<DialogKey, String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!(
            "a dialog id has 1 to {MAX_ID_LEN} characters, as GET /v1/dialogs gives it"
        ));
    }
    let raw = URL_SAFE_NO_PAD
        .decode(id)
        .map_err(|_| "not a dialog id (base64url, as GET /v1/dialogs gives it)".to_string())?;
    let text = String::from_utf8(raw).map_err(|_| "not a dialog id (not UTF-8)".to_string())?;
    match text.split_once('\n') {
        Some((call_id, tag)) if !call_id.is_empty() && !tag.is_empty() && !tag.contains('\n') => {
            Ok(DialogKey {
                call_id: call_id.into(),
                caller_tag: tag.into(),
            })
        }
        _ => Err("not a dialog id (no Call-ID and tag in it)".to_string()),
    }
}

fn state_of(phase: Phase) -> DialogState {
    match phase {
        Phase::Trying => DialogState::Trying,
        Phase::Early => DialogState::Early,
        Phase::Confirmed => DialogState::Confirmed,
    }
}

impl Proxy {
    /// When the dialog's INVITE arrived: its lifetime deadline less the lifetime.
    fn started(&self, d: &Dialog) -> Instant {
        d.lifetime_deadline
            .checked_sub(self.cfg.dialogs.lifetime)
            .unwrap_or(d.lifetime_deadline)
    }

    fn dest_id(&self, d: &Dialog) -> Option<&str> {
        d.dest
            .and_then(|slot| self.dests.get(slot))
            .map(|dest| dest.spec.id.as_str())
    }

    fn matches(&self, now: Instant, key: &DialogKey, d: &Dialog, f: &DialogFilter) -> bool {
        f.state.is_none_or(|s| s == state_of(d.phase))
            && f.call_id.as_deref().is_none_or(|c| *key.call_id == *c)
            && f.destination
                .as_deref()
                .is_none_or(|want| self.dest_id(d) == Some(want))
            && f.min_age
                .is_none_or(|min| now.saturating_duration_since(self.started(d)) >= min)
    }

    fn dialog_info(&self, now: Instant, key: &DialogKey, d: &Dialog) -> DialogInfo {
        let age = now.saturating_duration_since(self.started(d));
        let started_at = SystemTime::now()
            .checked_sub(age)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0.0, |t| t.as_secs_f64());
        let dest = d.dest.and_then(|slot| self.dests.get(slot));
        let mut resources = BTreeMap::new();
        for r in d.resources.iter() {
            *resources.entry(r.clone()).or_insert(0u32) += 1;
        }
        let flow = d.caller.flow;
        DialogInfo {
            id: dialog_id(key),
            call_id: key.call_id.to_string(),
            from_tag: key.caller_tag.to_string(),
            to_tag: d.to_tag.as_deref().map(str::to_string),
            state: state_of(d.phase),
            caller: flow.map(|f| f.remote.to_string()).unwrap_or_default(),
            transport: flow.map(|f| f.transport.lower()).unwrap_or_default().into(),
            listener: flow
                .and_then(|f| self.cfg.listeners.get(f.listener))
                .map(|l| format!("{}:{}", l.transport.lower(), l.bind))
                .unwrap_or_default(),
            destination: dest.map(|x| x.spec.id.clone()),
            destination_uri: dest.map(|x| x.spec.uri.clone()),
            started_at,
            age_seconds: age.as_secs_f64(),
            resources,
        }
    }

    /// `GET /v1/dialogs`: the dialogs after `q.after` that match, oldest first, at most
    /// `q.limit`, looking at no more than [`SCAN_BUDGET`] dialogs.
    pub fn list_dialogs(&self, now: Instant, q: &DialogQuery) -> DialogList {
        let mut dialogs = Vec::new();
        let mut next = None;
        let (mut looked, mut last) = (0usize, q.after);
        for (&serial, key) in self
            .dialog_ids
            .range((Bound::Excluded(q.after), Bound::Unbounded))
        {
            if dialogs.len() >= q.limit || looked >= SCAN_BUDGET {
                next = Some(last);
                break;
            }
            looked += 1;
            last = serial;
            let Some(d) = self.dialogs.get(key) else {
                continue;
            };
            if self.matches(now, key, d, &q.filter) {
                dialogs.push(self.dialog_info(now, key, d));
            }
        }
        DialogList {
            dialogs,
            next_cursor: next.map(|n| n.to_string()),
            total: self.dialogs.len() as u64,
        }
    }

    /// Ends a confirmed dialog by hand: BYE to both sides within the dialog, load released
    /// at once, counted in `mrcp_lb_dialogs_ended_total{reason="admin"}`. The 200s to the
    /// BYEs are absorbed; a late request of either side finds no dialog and goes by the relay
    /// rule, as after an expiry.
    pub fn end_dialog_by_key(
        &mut self,
        now: Instant,
        key: &DialogKey,
    ) -> Result<DialogEnded, EndError> {
        let Some(d) = self.dialogs.get(key) else {
            return Err(EndError::NotFound);
        };
        let dialog = self.dialog_info(now, key, d);
        if d.phase != Phase::Confirmed {
            return Err(EndError::NotConfirmed(Box::new(dialog)));
        }
        let (bye_to_caller, bye_to_server) = self.bye_both_sides(now, key, REASON_ADMIN);
        info!(
            call_id = %key.call_id,
            destination = dialog.destination.as_deref().unwrap_or(""),
            bye_to_caller,
            bye_to_server,
            "dialog ended by the admin API: BYE sent to both sides"
        );
        self.end_dialog(key, End::Admin);
        Ok(DialogEnded {
            dialog,
            bye_to_caller,
            bye_to_server,
        })
    }

    /// One batch of ending every confirmed dialog that matches `f` (the admin API gives a
    /// destination), after the cursor `after`: at most [`END_BATCH`] ended, at most
    /// [`SCAN_BUDGET`] looked at.
    pub fn end_dialogs(&mut self, now: Instant, f: &DialogFilter, after: u64) -> EndBatch {
        let mut batch = EndBatch {
            known: f
                .destination
                .as_deref()
                .is_none_or(|id| self.dests.find(id).is_some()),
            ..EndBatch::default()
        };
        let mut chosen = Vec::new();
        let (mut looked, mut last) = (0usize, after);
        for (&serial, key) in self
            .dialog_ids
            .range((Bound::Excluded(after), Bound::Unbounded))
        {
            if chosen.len() >= END_BATCH || looked >= SCAN_BUDGET {
                batch.next = Some(last);
                break;
            }
            looked += 1;
            last = serial;
            let Some(d) = self.dialogs.get(key) else {
                continue;
            };
            if !self.matches(now, key, d, f) {
                continue;
            }
            if d.phase == Phase::Confirmed {
                chosen.push(key.clone());
            } else {
                batch.not_confirmed += 1;
            }
        }
        for key in chosen {
            if let Ok(e) = self.end_dialog_by_key(now, &key) {
                batch.ended += 1;
                batch.byes_sent += u64::from(e.bye_to_caller) + u64::from(e.bye_to_server);
            }
        }
        batch
    }
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn dialog_ids_round_trip_and_reject_what_is_not_one() {
        let key = DialogKey {
            call_id: "a84b4c76e66710@pc33.atlanta.com".into(),
            caller_tag: "1928301774".into(),
        };
        let id = dialog_id(&key);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{id}"
        );
        assert_eq!(parse_dialog_id(&id), Ok(key));
        for bad in [
            "",
            "not base64!",
            "====",
            &URL_SAFE_NO_PAD.encode("no-separator"),
            &URL_SAFE_NO_PAD.encode("\ntag"),
            &URL_SAFE_NO_PAD.encode("call\n"),
            &URL_SAFE_NO_PAD.encode("call\ntag\nmore"),
            &URL_SAFE_NO_PAD.encode([0xff, 0xfe, b'\n', b'a']),
            &"A".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(parse_dialog_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
