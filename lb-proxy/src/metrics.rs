//! Counters shared with the transport tasks (which run outside the core).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::sip::ParseError;

#[derive(Debug, Default)]
pub struct Counters {
    /// Messages that could not be parsed (answered 400 when possible, otherwise dropped).
    pub malformed: AtomicU64,
    /// TCP streams closed because they could not be framed.
    pub malformed_streams: AtomicU64,
}

impl Counters {
    pub fn malformed(&self, _e: &ParseError) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn malformed_stream(&self) {
        self.malformed_streams.fetch_add(1, Ordering::Relaxed);
    }
}
