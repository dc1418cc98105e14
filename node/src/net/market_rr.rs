//! The event loop's side of the market protocols: outbound requests waiting for their
//! response, and inbound requests handed to the market service through one bounded queue.
//!
//! Inbound: each request goes to the service as an [`Inbound`] with a reply channel. When
//! no service is registered, or its queue is full, the request is answered at once with the
//! protocol's "busy" answer ([`RrProtocol::busy`]): memory never grows with the load. The
//! service's reply comes back through [`MarketRr::replies`], which the event loop polls.

use std::collections::HashMap;

use futures::{FutureExt, future::BoxFuture, stream::FuturesUnordered};
use libp2p::{
    Multiaddr, PeerId, Swarm,
    request_response::{self, OutboundRequestId},
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{
    behaviour::Behaviour,
    codec::{BidProto, BlobProto, ClaimProto, D402Codec, LeaseProto, RrProtocol, VerdictProto},
};

/// Why an outbound request got no response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RrError {
    /// The peer could not be dialled.
    #[error("cannot dial the peer: {0}")]
    Dial(String),
    /// No response within the protocol's timeout.
    #[error("timed out")]
    Timeout,
    /// The peer does not speak the protocol.
    #[error("the peer does not support the protocol")]
    Unsupported,
    /// The stream failed (closed, malformed or oversized response …).
    #[error("stream failed: {0}")]
    Stream(String),
    /// The connection closed before the response.
    #[error("connection closed")]
    ConnectionClosed,
    /// The network layer stopped.
    #[error("the network layer stopped")]
    Stopped,
}

impl From<request_response::OutboundFailure> for RrError {
    fn from(f: request_response::OutboundFailure) -> Self {
        use request_response::OutboundFailure as F;
        match f {
            F::DialFailure => RrError::Dial("dial failure".into()),
            F::Timeout => RrError::Timeout,
            F::ConnectionClosed => RrError::ConnectionClosed,
            F::UnsupportedProtocols => RrError::Unsupported,
            F::Io(e) => RrError::Stream(e.to_string()),
        }
    }
}

/// What an outbound failure means for the caller, given whether the peer advertises the
/// protocol in its identify list (`None`: not known). Streams negotiate lazily (`V1Lazy`:
/// the request goes out with the protocol's name), so a peer without the protocol refuses
/// it only afterwards, which arrives here as an I/O error on the stream rather than as
/// `UnsupportedProtocols`; when the peer's own list lacks the protocol, that is what it was.
fn failure(error: request_response::OutboundFailure, advertised: Option<bool>) -> RrError {
    match (error, advertised) {
        (request_response::OutboundFailure::Io(_), Some(false)) => RrError::Unsupported,
        (error, _) => error.into(),
    }
}

/// An inbound market request, checked by the codec (size, canonical form, signatures), for
/// the market service. The service must answer on `reply`; dropping it answers "busy".
// Short-lived (moved once through the queue); boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Inbound {
    /// A bid request.
    Bid {
        /// Who sent it (the transport-authenticated PeerId).
        peer: PeerId,
        /// The request.
        request: <BidProto as RrProtocol>::Request,
        /// Where the answer goes.
        reply: oneshot::Sender<<BidProto as RrProtocol>::Response>,
    },
    /// A lease.
    Lease {
        /// Who sent it.
        peer: PeerId,
        /// The request.
        request: <LeaseProto as RrProtocol>::Request,
        /// Where the answer goes.
        reply: oneshot::Sender<<LeaseProto as RrProtocol>::Response>,
    },
    /// A claim.
    Claim {
        /// Who sent it.
        peer: PeerId,
        /// The request.
        request: <ClaimProto as RrProtocol>::Request,
        /// Where the answer goes.
        reply: oneshot::Sender<<ClaimProto as RrProtocol>::Response>,
    },
    /// A verdict request.
    Verdict {
        /// Who sent it.
        peer: PeerId,
        /// The request.
        request: <VerdictProto as RrProtocol>::Request,
        /// Where the answer goes.
        reply: oneshot::Sender<<VerdictProto as RrProtocol>::Response>,
    },
    /// A blob request.
    Blob {
        /// Who sent it.
        peer: PeerId,
        /// The request.
        request: <BlobProto as RrProtocol>::Request,
        /// Where the answer goes.
        reply: oneshot::Sender<<BlobProto as RrProtocol>::Response>,
    },
}

type Pending<P> =
    HashMap<OutboundRequestId, oneshot::Sender<Result<<P as RrProtocol>::Response, RrError>>>;

/// A deferred action on the behaviour (sending a response once the service answered).
pub(crate) type Reply = Box<dyn FnOnce(&mut Behaviour) + Send>;

/// An operation the handle asks the event loop to run.
pub(crate) type MarketOp = Box<dyn FnOnce(&mut Swarm<Behaviour>, &mut MarketRr) + Send>;

/// The market protocols' state in the event loop.
#[derive(Default)]
pub(crate) struct MarketRr {
    inbound: Option<mpsc::Sender<Inbound>>,
    bid: Pending<BidProto>,
    lease: Pending<LeaseProto>,
    claim: Pending<ClaimProto>,
    verdict: Pending<VerdictProto>,
    blob: Pending<BlobProto>,
    /// Responses the service has produced (or dropped), to send on the swarm.
    pub(crate) replies: FuturesUnordered<BoxFuture<'static, Reply>>,
}

/// A protocol wired into [`Behaviour`] and [`MarketRr`].
pub(crate) trait Wired: RrProtocol + Sized {
    fn behaviour(b: &mut Behaviour) -> &mut request_response::Behaviour<D402Codec<Self>>;
    fn pending(rr: &mut MarketRr) -> &mut Pending<Self>;
    fn inbound(
        peer: PeerId,
        request: Self::Request,
        reply: oneshot::Sender<Self::Response>,
    ) -> Inbound;
}

macro_rules! wired {
    ($proto:ty, $field:ident, $variant:ident) => {
        impl Wired for $proto {
            fn behaviour(b: &mut Behaviour) -> &mut request_response::Behaviour<D402Codec<Self>> {
                &mut b.$field
            }
            fn pending(rr: &mut MarketRr) -> &mut Pending<Self> {
                &mut rr.$field
            }
            fn inbound(
                peer: PeerId,
                request: Self::Request,
                reply: oneshot::Sender<Self::Response>,
            ) -> Inbound {
                Inbound::$variant {
                    peer,
                    request,
                    reply,
                }
            }
        }
    };
}
wired!(BidProto, bid, Bid);
wired!(LeaseProto, lease, Lease);
wired!(ClaimProto, claim, Claim);
wired!(VerdictProto, verdict, Verdict);
wired!(BlobProto, blob, Blob);

impl MarketRr {
    /// Registers the market service's queue (replacing any earlier one).
    pub(crate) fn serve(&mut self, tx: mpsc::Sender<Inbound>) {
        self.inbound = Some(tx);
    }

    /// Sends a request; the response (or failure) goes to `reply`.
    pub(crate) fn send<P: Wired>(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: P::Request,
        reply: oneshot::Sender<Result<P::Response, RrError>>,
    ) {
        for a in addrs {
            swarm.add_peer_address(peer, a);
        }
        let id = P::behaviour(swarm.behaviour_mut()).send_request(&peer, request);
        P::pending(self).insert(id, reply);
    }

    /// Handles one event of protocol `P`. `advertises(peer, protocol)`: whether the peer's
    /// identify list names the protocol (`None` when the peer is not known).
    pub(crate) fn on_event<P: Wired>(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        event: request_response::Event<P::Request, P::Response>,
        advertises: impl Fn(&PeerId, &str) -> Option<bool>,
    ) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let (tx, rx) = oneshot::channel();
                let queued = match &self.inbound {
                    Some(q) => q.try_send(P::inbound(peer, request, tx)),
                    None => {
                        let _ =
                            P::behaviour(swarm.behaviour_mut()).send_response(channel, P::busy());
                        return;
                    }
                };
                if let Err(e) = queued {
                    debug!(%peer, protocol = P::NAME, full = matches!(e, mpsc::error::TrySendError::Full(_)), "market queue unavailable; answering busy");
                    let _ = P::behaviour(swarm.behaviour_mut()).send_response(channel, P::busy());
                    return;
                }
                self.replies.push(
                    async move {
                        let response = rx.await.unwrap_or_else(|_| P::busy());
                        let send: Reply = Box::new(move |b: &mut Behaviour| {
                            if P::behaviour(b).send_response(channel, response).is_err() {
                                debug!(protocol = P::NAME, "requester gone before the response");
                            }
                        });
                        send
                    }
                    .boxed(),
                );
            }
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(tx) = P::pending(self).remove(&request_id) {
                    let _ = tx.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(%peer, protocol = P::NAME, %error, "outbound request failed");
                if let Some(tx) = P::pending(self).remove(&request_id) {
                    let _ = tx.send(Err(failure(error, advertises(&peer, P::NAME))));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                // Malformed, oversized or badly signed requests end here: that stream is
                // closed, nothing else happens.
                warn!(%peer, protocol = P::NAME, %error, "inbound request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use libp2p::request_response::OutboundFailure;

    use super::*;

    #[test]
    fn a_stream_error_is_an_unsupported_protocol_only_when_the_peer_does_not_list_it() {
        let io = || OutboundFailure::Io(std::io::Error::other("protocol refused"));
        assert!(matches!(failure(io(), Some(false)), RrError::Unsupported));
        assert!(matches!(failure(io(), Some(true)), RrError::Stream(_)));
        assert!(matches!(failure(io(), None), RrError::Stream(_)));
        // Other failures keep their own meaning whatever the peer lists.
        assert!(matches!(
            failure(OutboundFailure::Timeout, Some(false)),
            RrError::Timeout
        ));
        assert!(matches!(
            failure(OutboundFailure::UnsupportedProtocols, None),
            RrError::Unsupported
        ));
    }
}
