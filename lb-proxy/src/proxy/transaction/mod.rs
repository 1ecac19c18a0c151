//! RFC 3261 transactions (17): their keys, states and records. The server side
//! ([`server`]) answers the request it received; the client side ([`client`]) sends a request on,
//! retransmits it over UDP and matches its responses.

use super::*;

mod client;
mod server;

/// Server transaction key (RFC 3261 17.2.3): branch, sent-by and method, with ACK matching
/// INVITE. Shared strings: a key is held by the transaction map, the map from timer id to
/// transaction and the client transactions relaying the request, and a clone costs no copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(in crate::proxy) struct ServerKey {
    pub(in crate::proxy) branch: Arc<str>,
    pub(in crate::proxy) sent_by: Arc<str>,
    pub(in crate::proxy) method: Method,
}

/// Client transaction key (RFC 3261 17.1.3): our branch and the CSeq method (shared branch,
/// as for [`ServerKey`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(in crate::proxy) struct ClientKey {
    pub(in crate::proxy) branch: Arc<str>,
    pub(in crate::proxy) method: Method,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::proxy) enum ServerState {
    /// Request received, no final response yet.
    Proceeding,
    /// Non-2xx final sent (INVITE: waiting for ACK; others: absorbing retransmissions).
    Completed,
    /// ACK received for a non-2xx final.
    Confirmed,
    /// 2xx forwarded (RFC 6026): absorbs retransmitted INVITEs.
    Accepted,
}

/// A server transaction. Once its final response is sent it keeps only what absorbing
/// retransmissions needs (the key, where responses go, the last response's bytes): at high
/// call rates the transactions held for 64×T1 after their final response (Timer I / J / L)
/// outnumber the live ones, and were most of the memory.
#[derive(Debug)]
pub(in crate::proxy) struct ServerTx {
    pub(in crate::proxy) id: u64,
    /// Where responses go.
    pub(in crate::proxy) reply: Flow,
    pub(in crate::proxy) state: ServerState,
    pub(in crate::proxy) last_response: Option<Bytes>,
    pub(in crate::proxy) retransmit: Duration,
    /// Until the final response is sent (`Proceeding`): the request and the call. Boxed, so
    /// that the transactions in the maps are small; dropped with the final response.
    pub(in crate::proxy) live: Option<Box<LiveServer>>,
}

/// What a server transaction needs until its final response.
#[derive(Debug)]
pub(in crate::proxy) struct LiveServer {
    pub(in crate::proxy) request: Message,
    /// To tag for responses the proxy itself generates.
    pub(in crate::proxy) local_tag: String,
    pub(in crate::proxy) call: Option<Call>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::proxy) enum ClientState {
    /// Sent, nothing received (INVITE: Calling; others: Trying).
    Calling,
    Proceeding,
    /// Final received (INVITE: a non-2xx, which was ACKed).
    Completed,
    /// 2xx received for an INVITE (RFC 6026): its retransmissions are relayed, any other
    /// response is absorbed (the request is no longer kept to ACK it).
    Accepted,
}

/// A client transaction. The request it sent is boxed and dropped once an INVITE is accepted
/// (2xx): from then on only the upstream flow is needed, to relay 2xx retransmissions.
#[derive(Debug)]
pub(in crate::proxy) struct ClientTx {
    pub(in crate::proxy) id: u64,
    /// The request as sent (for retransmission, ACK and CANCEL), while it may be needed.
    pub(in crate::proxy) sent: Option<Box<SentRequest>>,
    /// The transport it went over.
    pub(in crate::proxy) transport: Transport,
    pub(in crate::proxy) state: ClientState,
    pub(in crate::proxy) retransmit: Duration,
    /// Upstream transaction; None when the proxy itself sent the request.
    pub(in crate::proxy) server: Option<ServerKey>,
    /// What the transaction is for, beyond relaying.
    pub(in crate::proxy) role: Role,
    pub(in crate::proxy) cancel_pending: bool,
    /// Given up on by the proxy: late responses are absorbed.
    pub(in crate::proxy) abandoned: bool,
    /// Upstream flow for stateless forwarding of 2xx retransmissions.
    pub(in crate::proxy) upstream: Option<Flow>,
}

/// The request a client transaction sent: parsed (for ACK and CANCEL) and as sent.
#[derive(Debug)]
pub(in crate::proxy) struct SentRequest {
    pub(in crate::proxy) request: Message,
    pub(in crate::proxy) out: Outbound,
}

/// What a client transaction is for, beyond relaying a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::proxy) enum Role {
    /// A relayed in-dialog request, or one the proxy sends itself (CANCEL, BYE).
    Plain,
    /// A branch of an initial INVITE to the destination.
    Branch(DestRef),
    /// An OPTIONS health probe of the destination, sent at that time.
    Probe(DestRef, Instant),
}

impl ClientTx {
    /// The ACK of a non-2xx final response to this INVITE (RFC 3261 17.1.1.3), sent where the
    /// INVITE went (none once the request is no longer kept).
    pub(in crate::proxy) fn ack_for(&self, resp: &Message) -> Option<Outbound> {
        let sent = self.sent.as_deref()?;
        Some(Outbound {
            data: make_ack(&sent.request, resp).to_bytes(),
            on_error: None,
            ..sent.out.clone()
        })
    }

    /// Timer A / E (RFC 3261 17.1.1.2, 17.1.2.2): whether to retransmit now, and the wait
    /// until the next time. INVITE: while Calling, the interval doubles. Non-INVITE: while
    /// Trying it doubles up to T2; once Proceeding it is T2. Nothing once a final arrived, or
    /// when the proxy gave up on the transaction.
    pub(in crate::proxy) fn next_retransmit(
        &mut self,
        is_invite: bool,
        t2: Duration,
    ) -> Option<Duration> {
        let waiting = !self.abandoned
            && match self.state {
                ClientState::Calling => true,
                ClientState::Proceeding => !is_invite,
                ClientState::Completed | ClientState::Accepted => false,
            };
        if !waiting {
            return None;
        }
        self.retransmit = if is_invite {
            self.retransmit * 2
        } else if self.state == ClientState::Proceeding {
            t2
        } else {
            (self.retransmit * 2).min(t2)
        };
        Some(self.retransmit)
    }
}

impl ServerTx {
    /// The call of an initial INVITE, until its final response.
    pub(in crate::proxy) fn call(&self) -> Option<&Call> {
        self.live.as_ref().and_then(|l| l.call.as_ref())
    }

    pub(in crate::proxy) fn call_mut(&mut self) -> Option<&mut Call> {
        self.live.as_mut().and_then(|l| l.call.as_mut())
    }

    /// Timer G (RFC 3261 17.2.1): while the non-2xx final waits for its ACK (Completed), it
    /// is retransmitted at an interval that doubles up to T2.
    pub(in crate::proxy) fn next_retransmit(&mut self, t2: Duration) -> Option<Duration> {
        if self.state != ServerState::Completed {
            return None;
        }
        self.retransmit = (self.retransmit * 2).min(t2);
        Some(self.retransmit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: Duration = Duration::from_millis(500);
    const T2: Duration = Duration::from_secs(4);

    fn client(state: ClientState) -> ClientTx {
        ClientTx {
            id: 1,
            sent: Some(Box::new(SentRequest {
                request: Message::request(Method::Invite, "sip:x"),
                out: Outbound {
                    transport: Transport::Udp,
                    listener: 0,
                    target: Target::Addr(([127, 0, 0, 1], 5060).into()),
                    conn: None,
                    data: Bytes::new(),
                    on_error: None,
                    server_name: None,
                },
            })),
            transport: Transport::Udp,
            state,
            retransmit: T1,
            server: None,
            role: Role::Plain,
            cancel_pending: false,
            abandoned: false,
            upstream: None,
        }
    }

    fn waits(tx: &mut ClientTx, invite: bool, n: usize) -> Vec<u64> {
        (0..n)
            .map_while(|_| tx.next_retransmit(invite, T2))
            .map(|d| d.as_millis() as u64)
            .collect()
    }

    #[test]
    fn timer_a_doubles_while_an_invite_is_calling_and_stops_on_a_provisional() {
        let mut tx = client(ClientState::Calling);
        assert_eq!(waits(&mut tx, true, 4), [1000, 2000, 4000, 8000]);
        tx.state = ClientState::Proceeding;
        assert_eq!(tx.next_retransmit(true, T2), None);
    }

    #[test]
    fn timer_e_doubles_up_to_t2_then_is_t2_once_proceeding() {
        let mut tx = client(ClientState::Calling);
        assert_eq!(waits(&mut tx, false, 5), [1000, 2000, 4000, 4000, 4000]);
        let mut tx = client(ClientState::Calling);
        tx.next_retransmit(false, T2);
        tx.state = ClientState::Proceeding;
        assert_eq!(tx.next_retransmit(false, T2), Some(T2));
        tx.state = ClientState::Completed;
        assert_eq!(tx.next_retransmit(false, T2), None);
    }

    #[test]
    fn an_abandoned_transaction_is_not_retransmitted() {
        let mut tx = client(ClientState::Calling);
        tx.abandoned = true;
        assert_eq!(tx.next_retransmit(true, T2), None);
        assert_eq!(tx.next_retransmit(false, T2), None);
    }

    #[test]
    fn timer_g_doubles_up_to_t2_while_completed_only() {
        let mut tx = ServerTx {
            id: 1,
            reply: Flow {
                transport: Transport::Udp,
                listener: 0,
                remote: ([127, 0, 0, 1], 5070).into(),
                conn: None,
            },
            state: ServerState::Completed,
            last_response: None,
            retransmit: T1,
            live: None,
        };
        let got: Vec<u64> = (0..5)
            .filter_map(|_| tx.next_retransmit(T2))
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(got, [1000, 2000, 4000, 4000, 4000]);
        tx.state = ServerState::Confirmed;
        assert_eq!(tx.next_retransmit(T2), None);
    }
}
