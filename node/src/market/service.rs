//! The market service: takes the node's inbound market requests off the bounded queue and
//! hands each to the part of the node that answers it (worker, coordinator, validator,
//! blob store).

use libp2p::PeerId;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::debug;

use super::{blobs::BlobStore, coordinator::Coordinator, validator::Validator, worker::Worker};
use crate::net::{Inbound, NetError, NetHandle, codec::VerdictResponse};
use d402_protocol::messages::{BidResponse, ClaimAck, DeclineReason, LeaseAck};

/// What this node answers.
#[derive(Debug, Clone)]
pub struct Services {
    /// Sells work (answers bids and leases).
    pub worker: Option<Worker>,
    /// Buys work (answers claims).
    pub coordinator: Option<Coordinator>,
    /// Judges claims (answers verdict requests).
    pub validator: Option<Validator>,
    /// Serves blobs.
    pub blobs: BlobStore,
}

/// Registers the service with the network layer and starts answering; at most `queue`
/// requests wait, past that they are answered "busy" by the network layer.
pub async fn serve(
    net: &NetHandle,
    services: Services,
    queue: usize,
) -> Result<JoinHandle<()>, NetError> {
    let rx = net.serve_market(queue).await?;
    Ok(tokio::spawn(run(rx, services)))
}

fn not_offered(_: PeerId) -> BidResponse {
    BidResponse::Declined(DeclineReason::NotOffered)
}

async fn run(mut rx: mpsc::Receiver<Inbound>, s: Services) {
    while let Some(req) = rx.recv().await {
        match req {
            Inbound::Bid {
                peer,
                request,
                reply,
            } => {
                let r = match &s.worker {
                    Some(w) => w.on_bid_request(peer, request),
                    None => not_offered(peer),
                };
                let _ = reply.send(r);
            }
            Inbound::Lease {
                peer,
                request,
                reply,
            } => {
                match &s.worker {
                    // Answers at once (refusal) or from the run's task (its claim, or
                    // `Accepted` when the inline window closes first).
                    Some(w) => w.on_lease(peer, request, reply),
                    None => {
                        let _ = reply.send(LeaseAck::Refused {
                            reason: "not_a_worker".into(),
                        });
                    }
                }
            }
            Inbound::Claim {
                peer,
                request,
                reply,
            } => {
                match &s.coordinator {
                    // Recorded (committed) on the blocking pool, so that this loop and the
                    // async workers keep serving while the disk syncs.
                    Some(c) => {
                        let c = c.clone();
                        tokio::task::spawn_blocking(move || {
                            let _ = reply.send(c.on_claim(peer, request));
                        });
                    }
                    None => {
                        let _ = reply.send(ClaimAck::Refused {
                            reason: "unknown_task".into(),
                        });
                    }
                }
            }
            Inbound::Verdict {
                peer,
                request,
                reply,
            } => match &s.validator {
                // Answers at once (refusal, busy) or from a task of its own after the re-run.
                Some(v) => v.on_verdict_request(peer, request, reply),
                None => {
                    let _ = reply.send(VerdictResponse::Refused {
                        reason: "not_a_validator".into(),
                    });
                }
            },
            Inbound::Blob {
                peer,
                request,
                reply,
            } => {
                debug!(%peer, cid = %request.cid, "blob requested");
                let _ = reply.send(s.blobs.answer(&request));
            }
        }
    }
}
