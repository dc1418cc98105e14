//! Lease pipes: many leases on one long-lived stream from a gateway to a worker.
//!
//! A lease on `/d402/lease/1` (request-response) opens a stream for each lease: yamux's
//! SYN, ACK and FIN frames, multistream-select's header and protocol, the lease and its
//! answer, each its own write and wake-up on both sides (8 `sendto` per lease on loopback,
//! session 13's profile). A pipe, `/d402/lease-pipe/1`, is opened once per worker and
//! carries every later lease as one frame and its answer as another:
//!
//! ```text
//! frame = u32 length (big-endian, of what follows) ‖ u64 id ‖ body
//! ```
//!
//! The gateway numbers its leases; the worker answers each with the same id, in any order
//! (an answer can be the lease's inline claim, ready when the run is). The bodies are those
//! of `/d402/lease/1`, with the same caps and checks ([`LeaseProto`]): a frame over the cap,
//! a body the canonical decoder refuses or an answer to no lease closes the pipe. Queued
//! frames are written together and flushed once.
//!
//! A worker answers at most [`IN_FLIGHT`] leases of a pipe at a time ("busy" past that),
//! through the market service's bounded queue like any lease. A gateway falls back to
//! request-response for a lease its pipe never wrote (the pipe could not open, or ended
//! first), and for a while for a worker whose pipe failed before any answer (it may not
//! speak the protocol); a pipe idle for [`IDLE`] is closed.

use std::{
    collections::{HashMap, HashSet},
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use d402_protocol::{messages::LeaseAck, protocol_ids};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol, core::upgrade::NegotiationError};
use libp2p_stream::{Control, OpenStreamError};
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{Instrument, debug, debug_span, warn};

use super::{
    codec::{LeaseProto, RrProtocol},
    market_rr::{Inbound, RrError},
};

/// The pipe protocol.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new(protocol_ids::LEASE_PIPE);

/// A pipe with no lease in flight for this long is closed.
pub const IDLE: Duration = Duration::from_secs(60);

/// Most pipes a worker keeps from one peer; more are dropped.
pub const PIPES_PER_PEER: usize = 2;

/// Most leases a worker answers at once on one pipe; past this it answers "busy" at once.
/// With [`PIPES_PER_PEER`], a peer has as many in flight as on request-response streams.
pub const IN_FLIGHT: usize = super::behaviour::MARKET_STREAMS / PIPES_PER_PEER;

/// How long leases to a worker that does not speak the pipe protocol go by request-response.
pub const FALLBACK_FOR: Duration = Duration::from_secs(30);

/// How long leases to a worker whose pipe could not be opened go by request-response.
pub const RETRY_OPEN_AFTER: Duration = Duration::from_secs(5);

/// A frame's rest must follow its first byte within this long; a write must finish within
/// it too.
pub const FRAME_TIMEOUT: Duration = LeaseProto::TIMEOUT;

/// How long opening a pipe may take before its leases go by request-response.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// Frames queued on one pipe (gateway) before a sender waits.
const QUEUE: usize = 64;

/// The bytes before a frame's body: length and id.
const HEAD: usize = 12;

/// A lease's answer, or why there is none.
type Answer = Result<<LeaseProto as RrProtocol>::Response, RrError>;

/// A lease for a pipe: its canonical bytes and where its answer goes. Dropping the reply
/// unanswered means the lease was never written (the caller falls back).
struct Job {
    body: Vec<u8>,
    reply: oneshot::Sender<Answer>,
}

/// Counts of the leases a node sent, by how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// Sent on a pipe (answered, refused, failed or timed out there).
    pub on_pipes: u64,
    /// Left to request-response (pipes off, peer not connected, no pipe to it).
    pub by_request_response: u64,
}

/// The node's pipes: the gateway's to each worker, and the worker's acceptor.
pub struct Pipes {
    control: Control,
    enabled: bool,
    open: Mutex<HashMap<PeerId, mpsc::Sender<Job>>>,
    /// Peers with a connection (kept by the event loop): a pipe is opened only on one, so
    /// that a lease to a peer not connected goes by request-response, which dials it at
    /// the addresses given.
    connected: Mutex<HashSet<PeerId>>,
    /// Peers sent leases by request-response until the time given (no pipe to them).
    fallback: Arc<Mutex<HashMap<PeerId, Instant>>>,
    /// Leases answered (or timed out) on a pipe, and leases left to request-response.
    on_pipes: AtomicU64,
    not_on_pipes: AtomicU64,
    /// Where inbound leases go (the market service's queue), once it is registered.
    queue: Arc<Mutex<Option<mpsc::Sender<Inbound>>>>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Pipes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipes")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl Drop for Pipes {
    fn drop(&mut self) {
        if let Some(h) = lock(&self.acceptor).take() {
            h.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pipes {
    /// Pipes over `control` (the swarm's stream behaviour); when not `enabled` the node
    /// neither opens nor accepts any (every lease goes by request-response).
    pub fn new(control: Control, enabled: bool) -> Pipes {
        Pipes {
            control,
            enabled,
            open: Mutex::default(),
            connected: Mutex::default(),
            on_pipes: AtomicU64::new(0),
            not_on_pipes: AtomicU64::new(0),
            fallback: Arc::default(),
            queue: Arc::default(),
            acceptor: Mutex::default(),
        }
    }

    /// Sends `lease` to `peer` on its pipe (opened on first use) and waits for the answer
    /// within the lease protocol's timeout. `None`: the lease was not written; send it by
    /// request-response.
    pub(crate) async fn request(
        &self,
        peer: PeerId,
        lease: &<LeaseProto as RrProtocol>::Request,
    ) -> Option<Answer> {
        let answer = self.try_request(peer, lease).await;
        let counter = match answer {
            Some(_) => &self.on_pipes,
            None => &self.not_on_pipes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        answer
    }

    /// How many leases went on pipes, and how many were left to request-response.
    pub fn stats(&self) -> PipeStats {
        PipeStats {
            on_pipes: self.on_pipes.load(Ordering::Relaxed),
            by_request_response: self.not_on_pipes.load(Ordering::Relaxed),
        }
    }

    async fn try_request(
        &self,
        peer: PeerId,
        lease: &<LeaseProto as RrProtocol>::Request,
    ) -> Option<Answer> {
        if !self.enabled || !lock(&self.connected).contains(&peer) {
            return None;
        }
        {
            let mut fallback = lock(&self.fallback);
            match fallback.get(&peer) {
                Some(until) if Instant::now() < *until => return None,
                Some(_) => {
                    fallback.remove(&peer);
                }
                None => {}
            }
        }
        // One deadline for queueing, writing and the answer.
        let deadline = tokio::time::Instant::now() + LeaseProto::TIMEOUT;
        let body = LeaseProto::encode_request(lease).ok()?;
        if body.len() > LeaseProto::REQUEST_MAX {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        let sender = self.sender(peer);
        match tokio::time::timeout_at(deadline, sender.send(Job { body, reply })).await {
            Ok(Ok(())) => {}
            // The pipe ended before taking it: not written.
            Ok(Err(_)) => return None,
            // Not even queued in time (the pipe is stalled): not written, and the time is up.
            Err(_) => return Some(Err(RrError::Timeout)),
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => Some(Err(RrError::Timeout)),
            Ok(Err(_)) => None,
            Ok(Ok(a)) => Some(a),
        }
    }

    /// Records whether `peer` has a connection now.
    pub(crate) fn set_connected(&self, peer: PeerId, connected: bool) {
        let mut c = lock(&self.connected);
        if connected {
            c.insert(peer);
        } else {
            c.remove(&peer);
        }
    }

    /// The live pipe to `peer`, or a new one.
    fn sender(&self, peer: PeerId) -> mpsc::Sender<Job> {
        let mut open = lock(&self.open);
        if let Some(s) = open.get(&peer)
            && !s.is_closed()
        {
            return s.clone();
        }
        open.retain(|_, s| !s.is_closed());
        let (tx, rx) = mpsc::channel(QUEUE);
        open.insert(peer, tx.clone());
        let control = self.control.clone();
        let fallback = self.fallback.clone();
        tokio::spawn(outbound(control, peer, rx, fallback).instrument(debug_span!("pipe", %peer)));
        tx
    }

    /// Accepts pipes and queues their leases on `queue` (replacing an earlier queue).
    pub(crate) fn serve(&self, queue: mpsc::Sender<Inbound>) {
        *lock(&self.queue) = Some(queue);
        let mut acceptor = lock(&self.acceptor);
        if !self.enabled || acceptor.is_some() {
            return;
        }
        let mut incoming = match self.control.clone().accept(PROTOCOL) {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "cannot accept lease pipes");
                return;
            }
        };
        let queue = self.queue.clone();
        let per_peer: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
        *acceptor = Some(tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                {
                    let mut n = lock(&per_peer);
                    let n = n.entry(peer).or_default();
                    if *n >= PIPES_PER_PEER {
                        debug!(%peer, "a lease pipe too many from this peer; dropped");
                        continue;
                    }
                    *n += 1;
                }
                let per_peer = per_peer.clone();
                let queue = queue.clone();
                tokio::spawn(
                    async move {
                        inbound(peer, stream, queue).await;
                        let mut n = lock(&per_peer);
                        if let Some(c) = n.get_mut(&peer) {
                            *c -= 1;
                            if *c == 0 {
                                n.remove(&peer);
                            }
                        }
                    }
                    .instrument(debug_span!("pipe", %peer)),
                );
            }
        }));
    }
}

/// Appends the frame of `body` numbered `id` to `buf`.
fn put_frame(buf: &mut Vec<u8>, id: u64, body: &[u8]) {
    let len = u32::try_from(body.len() + 8).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&id.to_be_bytes());
    buf.extend_from_slice(body);
}

/// What [`read_frame`] read.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// A frame: its id and body.
    Frame(u64, Vec<u8>),
    /// The stream ended cleanly, before a frame's first byte.
    End,
    /// No frame began within the wait given (nothing was consumed).
    Idle,
}

/// Reads one frame whose body is at most `max` bytes, waiting at most `idle` (if given) for
/// its first byte; once a frame has begun, the rest must follow within [`FRAME_TIMEOUT`].
async fn read_frame<R: futures::AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    idle: Option<Duration>,
) -> io::Result<Read> {
    let mut head = [0u8; HEAD];
    // Cancelling a pending read consumes nothing, so the wait for the first byte can time
    // out without breaking the framing.
    let first = r.read(&mut head[..4]);
    let got = match idle {
        Some(wait) => match tokio::time::timeout(wait, first).await {
            Ok(n) => n?,
            Err(_) => return Ok(Read::Idle),
        },
        None => first.await?,
    };
    if got == 0 {
        return Ok(Read::End);
    }
    let rest = async {
        r.read_exact(&mut head[got..]).await?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if !(8..=max + 8).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {len} bytes (at most {} allowed)", max + 8),
            ));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&head[4..]);
        let mut body = vec![0u8; len - 8];
        r.read_exact(&mut body).await?;
        Ok(Read::Frame(u64::from_be_bytes(id), body))
    };
    tokio::time::timeout(FRAME_TIMEOUT, rest)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// Writes `buf` and flushes, within [`FRAME_TIMEOUT`].
async fn write_all<W: futures::AsyncWrite + Unpin>(w: &mut W, buf: &[u8]) -> io::Result<()> {
    let write = async {
        w.write_all(buf).await?;
        w.flush().await
    };
    tokio::time::timeout(FRAME_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// Whether `e` says the peer refused the protocol (lazy negotiation reports it on the first
/// read or write after the stream was handed out).
fn refused_protocol(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<NegotiationError>())
        .is_some_and(|n| matches!(n, NegotiationError::Failed))
}

/// A gateway's pipe to `peer`: opens it, writes the queued leases, routes the answers.
async fn outbound(
    mut control: Control,
    peer: PeerId,
    mut jobs: mpsc::Receiver<Job>,
    fallback: Arc<Mutex<HashMap<PeerId, Instant>>>,
) {
    let opened = tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, PROTOCOL)).await;
    let stream = match opened {
        Ok(Ok(s)) => s,
        // The queued leases are dropped unwritten: they go by request-response.
        Ok(Err(OpenStreamError::UnsupportedProtocol(_))) => {
            debug!("the peer has no lease pipes; request-response instead");
            lock(&fallback).insert(peer, Instant::now() + FALLBACK_FOR);
            return;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "cannot open a lease pipe; request-response instead");
            lock(&fallback).insert(peer, Instant::now() + RETRY_OPEN_AFTER);
            return;
        }
        Err(_) => {
            debug!("no lease pipe after {OPEN_TIMEOUT:?}; request-response instead");
            lock(&fallback).insert(peer, Instant::now() + RETRY_OPEN_AFTER);
            return;
        }
    };
    debug!("lease pipe open");
    let (mut rd, mut wr) = stream.split();
    let pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>> = Mutex::default();
    let writer = async {
        let mut next = 0u64;
        let mut buf = Vec::new();
        loop {
            let job = match tokio::time::timeout(IDLE, jobs.recv()).await {
                Ok(Some(j)) => j,
                Ok(None) => return Ok(()),
                Err(_) => {
                    let mut p = lock(&pending);
                    p.retain(|_, r| !r.is_closed());
                    if p.is_empty() {
                        return Ok(());
                    }
                    continue;
                }
            };
            buf.clear();
            let mut batch = Some(job);
            while let Some(j) = batch.take().or_else(|| jobs.try_recv().ok()) {
                // A caller that gave up has had its lease replaced: do not deliver it.
                if j.reply.is_closed() {
                    continue;
                }
                next += 1;
                put_frame(&mut buf, next, &j.body);
                let mut p = lock(&pending);
                if p.len() >= QUEUE * 4 {
                    p.retain(|_, r| !r.is_closed());
                }
                p.insert(next, j.reply);
                if buf.len() >= 64 * 1024 {
                    break;
                }
            }
            if !buf.is_empty() {
                write_all(&mut wr, &buf).await?;
            }
        }
    };
    let reader = async {
        loop {
            let (id, body) = match read_frame(&mut rd, LeaseProto::RESPONSE_MAX, None).await? {
                Read::Frame(id, body) => (id, body),
                Read::End | Read::Idle => {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
            };
            // An answer whose caller gave up (pruned) has no entry: nothing to do.
            let Some(reply) = lock(&pending).remove(&id) else {
                debug!(id, "an answer to a lease no longer awaited");
                continue;
            };
            let answer = LeaseProto::decode_response(&body)
                .map_err(|e| RrError::Stream(format!("bad answer: {e}")));
            let _ = reply.send(answer);
        }
    };
    let ended: io::Result<()> = tokio::select! {
        r = writer => r,
        r = reader => r,
    };
    jobs.close();
    let pending = std::mem::take(&mut *lock(&pending));
    match ended {
        Ok(()) => {
            debug!("lease pipe idle; closed");
            let _ = wr.close().await;
        }
        // The worker does not speak the protocol (negotiation is lazy, so that shows only
        // now): nothing reached it, and the leases in flight go by request-response.
        Err(e) if refused_protocol(&e) => {
            debug!("the peer has no lease pipes; request-response instead");
            lock(&fallback).insert(peer, Instant::now() + FALLBACK_FOR);
            drop(pending);
        }
        // Leases in flight may have reached the worker: they fail, as on a closed stream.
        Err(e) => {
            debug!(error = %e, in_flight = pending.len(), "lease pipe failed");
            for (_, reply) in pending {
                let _ = reply.send(Err(RrError::Stream(e.to_string())));
            }
        }
    }
}

/// The answer frame `ack` numbered `id` (a refusal if it cannot be encoded).
fn answer_frame(id: u64, ack: &<LeaseProto as RrProtocol>::Response) -> Vec<u8> {
    let body = LeaseProto::encode_response(ack).or_else(|e| {
        warn!(error = %e, "cannot encode a lease answer");
        LeaseProto::encode_response(&LeaseProto::busy())
    });
    let mut f = Vec::new();
    if let Ok(b) = body {
        put_frame(&mut f, id, &b);
    }
    f
}

/// A worker's side of a pipe from `peer`: queues each lease for the market service and
/// writes the answers as they come. Ends when the gateway closes the pipe, when nothing was
/// in flight for twice [`IDLE`], or on an error; a writer that cannot write within
/// [`FRAME_TIMEOUT`] ends it too.
async fn inbound(peer: PeerId, stream: Stream, queue: Arc<Mutex<Option<mpsc::Sender<Inbound>>>>) {
    debug!("lease pipe accepted");
    let (mut rd, mut wr) = stream.split();
    let (out, mut frames) = mpsc::channel::<Vec<u8>>(IN_FLIGHT);
    // The writer owns the channel's receiver: when it ends, every send fails at once.
    let writer = tokio::spawn(
        async move {
            let mut buf = Vec::new();
            while let Some(f) = frames.recv().await {
                buf.clear();
                buf.extend_from_slice(&f);
                while buf.len() < 64 * 1024
                    && let Ok(more) = frames.try_recv()
                {
                    buf.extend_from_slice(&more);
                }
                if let Err(e) = write_all(&mut wr, &buf).await {
                    debug!(error = %e, "lease pipe write failed");
                    return;
                }
            }
            let _ = wr.close().await;
        }
        .in_current_span(),
    );
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let (id, body) = match read_frame(&mut rd, LeaseProto::REQUEST_MAX, Some(2 * IDLE)).await {
            Ok(Read::Frame(id, body)) => (id, body),
            Ok(Read::Idle) if slots.available_permits() == IN_FLIGHT => {
                debug!("lease pipe idle; closed");
                break;
            }
            Ok(Read::Idle) => continue,
            Ok(Read::End) => break,
            Err(e) => {
                debug!(error = %e, "lease pipe closed");
                break;
            }
        };
        if out.is_closed() {
            break;
        }
        let ack = match LeaseProto::decode_request(&body) {
            Err(e) => {
                warn!(error = %e, "bad lease on a pipe; refused");
                Some(LeaseAck::Refused {
                    reason: "bad_request: the lease does not decode".into(),
                })
            }
            Ok(lease) => match slots.clone().try_acquire_owned() {
                Err(_) => Some(LeaseProto::busy()),
                Ok(slot) => {
                    let (reply, answer) = oneshot::channel();
                    let queued = lock(&queue).as_ref().is_some_and(|q| {
                        q.try_send(Inbound::Lease {
                            peer,
                            request: lease,
                            reply,
                        })
                        .is_ok()
                    });
                    if queued {
                        let out = out.clone();
                        tokio::spawn(async move {
                            let ack = answer.await.unwrap_or_else(|_| LeaseProto::busy());
                            let _ = out.send(answer_frame(id, &ack)).await;
                            drop(slot);
                        });
                        None
                    } else {
                        Some(LeaseProto::busy())
                    }
                }
            },
        };
        if let Some(ack) = ack
            && out.send(answer_frame(id, &ack)).await.is_err()
        {
            break;
        }
    }
    // The writer ends once the answers in flight have let go of the channel.
    drop(out);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    async fn read(bytes: &[u8], max: usize) -> io::Result<Read> {
        read_frame(&mut futures::io::Cursor::new(bytes.to_vec()), max, None).await
    }

    #[tokio::test]
    async fn frames_round_trip_and_caps_hold() {
        let mut buf = Vec::new();
        put_frame(&mut buf, 7, b"hello");
        put_frame(&mut buf, u64::MAX, b"");
        let mut r = futures::io::Cursor::new(buf.clone());
        assert_eq!(
            read_frame(&mut r, 5, None).await.unwrap(),
            Read::Frame(7, b"hello".to_vec())
        );
        assert_eq!(
            read_frame(&mut r, 5, None).await.unwrap(),
            Read::Frame(u64::MAX, vec![])
        );
        assert_eq!(read_frame(&mut r, 5, None).await.unwrap(), Read::End);

        // Over the cap: refused before the body is read.
        let e = read(&buf, 4).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        // A length shorter than the id, and a stream cut inside a frame.
        let mut short = 3u32.to_be_bytes().to_vec();
        short.extend_from_slice(&[0; 8]);
        let e = read(&short, 100).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        for cut in [2, 10, 14] {
            let e = read(&buf[..cut], 100).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_a_first_byte_then_for_the_rest_within_the_frame_timeout() {
        // Nothing comes: idle, and nothing consumed (the next frame still reads whole).
        let (tx, mut rx) = futures::channel::mpsc::unbounded::<io::Result<Vec<u8>>>();
        let mut r = (&mut rx).into_async_read();
        let idle = read_frame(&mut r, 10, Some(Duration::from_secs(1))).await;
        assert_eq!(idle.unwrap(), Read::Idle);
        let mut f = Vec::new();
        put_frame(&mut f, 3, b"abc");
        tx.unbounded_send(Ok(f.clone())).unwrap();
        assert_eq!(
            read_frame(&mut r, 10, Some(Duration::from_secs(1)))
                .await
                .unwrap(),
            Read::Frame(3, b"abc".to_vec())
        );
        // A frame that begins and stalls: timed out.
        tx.unbounded_send(Ok(f[..6].to_vec())).unwrap();
        let e = read_frame(&mut r, 10, Some(Duration::from_secs(1)))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    /// A node on loopback (TCP only) with the key of `seed`, its state in `dir`.
    async fn node(seed: u8, dir: &std::path::Path) -> crate::net::Node {
        let mut cfg = crate::net::NetConfig::new(std::net::Ipv4Addr::LOCALHOST.into(), 0);
        cfg.quic = false;
        let state = crate::state::State::open(dir).unwrap();
        crate::net::start(
            cfg,
            &d402_protocol::SigningKey::from_bytes(&[seed; 32]),
            state,
        )
        .await
        .unwrap()
    }

    /// A lease signed by the key of `seed`.
    fn signed_lease(seed: u8, token: u64) -> <LeaseProto as RrProtocol>::Request {
        use d402_protocol::{
            Amount, Cid, PublicKey, Signed, SigningKey, TaskId, messages::Lease,
            types::MESSAGE_VERSION,
        };
        Signed::sign(
            Lease {
                v: MESSAGE_VERSION,
                task_id: TaskId([7; 16]),
                worker: PublicKey(SigningKey::from_bytes(&[1; 32]).verifying_key().to_bytes()),
                bid_cid: Cid::dag_cbor(b"bid"),
                manifest_cid: Cid::dag_cbor(b"manifest"),
                input: b"{}".to_vec(),
                snapshot_cid: None,
                price: Amount {
                    asset: "local:USDC".into(),
                    units: 10,
                },
                deadline: 1_700_000_030_000,
                fencing_token: token,
            },
            &SigningKey::from_bytes(&[seed; 32]),
        )
        .unwrap()
    }

    /// A gateway's pipe against a worker that answers by hand: an answer to no lease is
    /// ignored, an answer that does not decode fails only its own lease, and the others
    /// are routed to their callers by id, in the order they come.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gateway_routes_answers_by_id_and_fails_only_a_bad_one() {
        let (wd, gd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let worker = node(1, wd.path()).await;
        let gateway = node(2, gd.path()).await;
        // The worker's side by hand: its market service is never registered.
        let mut incoming = worker
            .handle()
            .pipes()
            .control
            .clone()
            .accept(PROTOCOL)
            .unwrap();
        let addr = worker.handle().listen_addrs().await.unwrap()[0].clone();
        let wpeer = gateway.handle().connect(addr).await.unwrap();
        let by_hand = tokio::spawn(async move {
            let (_, stream) = incoming.next().await.unwrap();
            let (mut rd, mut wr) = stream.split();
            let mut ids = Vec::new();
            while ids.len() < 2 {
                let Read::Frame(id, body) = read_frame(&mut rd, LeaseProto::REQUEST_MAX, None)
                    .await
                    .unwrap()
                else {
                    panic!("the pipe ended");
                };
                let token = LeaseProto::decode_request(&body)
                    .unwrap()
                    .body
                    .fencing_token;
                ids.push((token, id));
            }
            ids.sort();
            // One to no lease first, then lease 2's, then one for lease 1 that does not decode.
            let mut buf = answer_frame(999, &LeaseAck::Accepted);
            buf.extend(answer_frame(ids[1].1, &LeaseAck::Accepted));
            put_frame(&mut buf, ids[0].1, b"garbage");
            wr.write_all(&buf).await.unwrap();
            wr.flush().await.unwrap();
            // Kept open until the test is done.
            (rd, wr)
        });
        let pipes = gateway.handle().pipes().clone();
        let first = {
            let pipes = pipes.clone();
            tokio::spawn(async move { pipes.request(wpeer, &signed_lease(2, 1)).await })
        };
        let second = pipes.request(wpeer, &signed_lease(2, 2)).await;
        assert_eq!(second, Some(Ok(LeaseAck::Accepted)));
        let first = first.await.unwrap();
        assert!(
            matches!(&first, Some(Err(RrError::Stream(m))) if m.starts_with("bad answer")),
            "{first:?}"
        );
        assert_eq!(
            pipes.stats(),
            PipeStats {
                on_pipes: 2,
                by_request_response: 0
            }
        );
        let _kept = by_hand.await.unwrap();
        gateway.handle().shutdown().await;
        worker.handle().shutdown().await;
    }

    /// A worker's pipe over real libp2p on loopback, driven frame by frame: a lease is
    /// queued for the market service and answered on its id; a body that does not decode
    /// is refused on its own id and the pipe goes on; a frame over the cap closes the pipe.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_answers_each_frame_on_its_id_and_refuses_bad_ones() {
        let (wd, gd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let worker = node(1, wd.path()).await;
        let gateway = node(2, gd.path()).await;
        let mut inbound = worker.handle().serve_market(8).await.unwrap();
        let addr = worker.handle().listen_addrs().await.unwrap()[0].clone();
        let wpeer = gateway.handle().connect(addr).await.unwrap();
        let stream = gateway
            .handle()
            .pipes()
            .control
            .clone()
            .open_stream(wpeer, PROTOCOL)
            .await
            .unwrap();
        let (mut rd, mut wr) = stream.split();

        let lease = signed_lease(2, 1);
        let mut buf = Vec::new();
        put_frame(&mut buf, 41, b"not a lease");
        put_frame(&mut buf, 42, &LeaseProto::encode_request(&lease).unwrap());
        wr.write_all(&buf).await.unwrap();
        wr.flush().await.unwrap();

        // The bad body: refused on its id.
        let max = LeaseProto::RESPONSE_MAX;
        let Read::Frame(id, body) = read_frame(&mut rd, max, None).await.unwrap() else {
            panic!("no answer");
        };
        assert_eq!(id, 41);
        assert!(matches!(
            LeaseProto::decode_response(&body).unwrap(),
            LeaseAck::Refused { reason } if reason.starts_with("bad_request")
        ));
        // The lease: handed to the service as sent by the gateway's peer, answered on 42.
        let Some(Inbound::Lease {
            peer,
            request,
            reply,
        }) = inbound.recv().await
        else {
            panic!("no lease queued");
        };
        assert_eq!(peer, gateway.handle().local_peer_id());
        assert_eq!(request, lease);
        reply.send(LeaseAck::Accepted).unwrap();
        let Read::Frame(id, body) = read_frame(&mut rd, max, None).await.unwrap() else {
            panic!("no answer");
        };
        assert_eq!(id, 42);
        assert_eq!(
            LeaseProto::decode_response(&body).unwrap(),
            LeaseAck::Accepted
        );

        // A frame over the cap: the worker closes the pipe without reading it.
        let len = u32::try_from(LeaseProto::REQUEST_MAX + 9).unwrap();
        let mut over = len.to_be_bytes().to_vec();
        over.extend_from_slice(&43u64.to_be_bytes());
        wr.write_all(&over).await.unwrap();
        wr.flush().await.unwrap();
        let end = read_frame(&mut rd, max, Some(Duration::from_secs(10))).await;
        assert!(matches!(end, Ok(Read::End) | Err(_)), "{end:?}");

        gateway.handle().shutdown().await;
        worker.handle().shutdown().await;
    }

    #[test]
    fn a_refused_protocol_is_told_from_other_errors() {
        assert!(refused_protocol(&io::Error::other(
            NegotiationError::Failed
        )));
        assert!(!refused_protocol(&io::Error::from(
            io::ErrorKind::UnexpectedEof
        )));
        assert!(!refused_protocol(&io::Error::other("reset")));
    }
}
