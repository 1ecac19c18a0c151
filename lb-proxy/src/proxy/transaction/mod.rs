//! RFC 3261 transactions (17): their keys, states and records. The server side
//! ([`server`]) answers the request it received; the client side ([`client`]) sends a request on,
//! retransmits it over UDP and matches its responses.

use super::*;

mod client;
mod server;

/// Server transaction key (RFC 3261 17.2.3): branch, sent-by and method, with ACK matching
/// INVITE.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(in crate::proxy) struct ServerKey {
    pub(in crate::proxy) branch: String,
    pub(in crate::proxy) sent_by: String,
    pub(in crate::proxy) method: Method,
}

/// Client transaction key (RFC 3261 17.1.3): our branch and the CSeq method.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(in crate::proxy) struct ClientKey {
    pub(in crate::proxy) branch: String,
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

#[derive(Debug)]
pub(in crate::proxy) struct ServerTx {
    pub(in crate::proxy) id: u64,
    pub(in crate::proxy) request: Message,
    /// Where responses go.
    pub(in crate::proxy) reply: Flow,
    pub(in crate::proxy) state: ServerState,
    pub(in crate::proxy) last_response: Option<Bytes>,
    pub(in crate::proxy) retransmit: Duration,
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

#[derive(Debug)]
pub(in crate::proxy) struct ClientTx {
    pub(in crate::proxy) id: u64,
    /// The request as sent (for retransmission, ACK and CANCEL).
    pub(in crate::proxy) request: Message,
    pub(in crate::proxy) out: Outbound,
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
    /// INVITE went.
    pub(in crate::proxy) fn ack_for(&self, resp: &Message) -> Outbound {
        Outbound {
            data: make_ack(&self.request, resp).to_bytes(),
            on_error: None,
            ..self.out.clone()
        }
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
            request: Message::request(Method::Invite, "sip:x"),
            reply: Flow {
                transport: Transport::Udp,
                listener: 0,
                remote: ([127, 0, 0, 1], 5070).into(),
                conn: None,
            },
            state: ServerState::Completed,
            last_response: None,
            retransmit: T1,
            local_tag: String::new(),
            call: None,
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
