//! The market's request-response protocols and their codec.
//!
//! One `request_response::Behaviour` per protocol (`/d402/bid/1`, `/d402/lease/1`,
//! `/d402/claim/1`, `/d402/verdict/1`, `/d402/blob/1`), so that each stream is negotiated
//! for exactly one message kind and each kind has its own size caps and timeout.
//!
//! A message is its canonical CBOR encoding, written whole, then the stream's write half is
//! closed. The reader takes at most the protocol's cap plus one byte: more is an error, as
//! is anything the protocol crate's canonical decoder refuses (bad form, bad signature,
//! broken body rules). An error closes that stream only; the node keeps serving.

use std::{io, marker::PhantomData, time::Duration};

use d402_protocol::{
    Cid, ProtocolError, Signed,
    messages::{
        BidRequest, BidResponse, Claim, ClaimAck, DeclineReason, Lease, LeaseAck, MAX_REASON,
        SnapshotMeta, Verdict, WireMessage,
    },
    protocol_ids,
};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{StreamProtocol, request_response};
use serde::{Deserialize, Serialize};

/// One request-response protocol of the market: its name, message types, caps, timeout and
/// the answer given at once when the node's inbound queue is full.
pub trait RrProtocol: Send + Sync + 'static {
    /// The protocol id.
    const NAME: &'static str;
    /// Largest encoded request.
    const REQUEST_MAX: usize = <Self::Request as WireMessage>::MAX_SIZE;
    /// Largest encoded response.
    const RESPONSE_MAX: usize = <Self::Response as WireMessage>::MAX_SIZE;
    /// How long a request may take, from sending to the whole response.
    const TIMEOUT: Duration;
    /// The request.
    type Request: WireMessage + Send + std::fmt::Debug + 'static;
    /// The response.
    type Response: WireMessage + Send + std::fmt::Debug + 'static;

    /// Canonical bytes of a request.
    fn encode_request(r: &Self::Request) -> Result<Vec<u8>, ProtocolError> {
        r.to_bytes()
    }
    /// Decodes and checks a request (size cap, canonical form, signature).
    fn decode_request(b: &[u8]) -> Result<Self::Request, ProtocolError> {
        <Self::Request as WireMessage>::from_bytes(b)
    }
    /// Canonical bytes of a response.
    fn encode_response(r: &Self::Response) -> Result<Vec<u8>, ProtocolError> {
        r.to_bytes()
    }
    /// Decodes and checks a response.
    fn decode_response(b: &[u8]) -> Result<Self::Response, ProtocolError> {
        <Self::Response as WireMessage>::from_bytes(b)
    }
    /// The answer when the inbound queue is full or the service is gone.
    fn busy() -> Self::Response;
}

/// `/d402/bid/1`: a signed bid request, answered by a signed bid or a typed decline.
#[derive(Debug)]
pub struct BidProto;
/// `/d402/lease/1`: a signed lease, answered by an acknowledgement.
#[derive(Debug)]
pub struct LeaseProto;
/// `/d402/claim/1`: a signed claim, answered by an acknowledgement.
#[derive(Debug)]
pub struct ClaimProto;
/// `/d402/verdict/1`: a claim to judge (with its lease), answered by a signed verdict.
#[derive(Debug)]
pub struct VerdictProto;
/// `/d402/blob/1`: a CID, answered by the bytes (checked against the CID by the requester).
#[derive(Debug)]
pub struct BlobProto;

/// What a validator is asked to judge: the gateway's lease (task input, manifest, pinned
/// snapshot) and the worker's claim. Both are signed; the validator checks both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictRequest {
    /// The lease the claim answers (signed by the gateway that asks).
    pub lease: Signed<Lease>,
    /// The claim to judge (signed by the worker).
    pub claim: Signed<Claim>,
}

impl WireMessage for VerdictRequest {
    const KIND: &'static str = "verdict request";
    const MAX_SIZE: usize = Signed::<Lease>::max_size() + Signed::<Claim>::max_size() + 64;

    fn from_bytes(bytes: &[u8]) -> d402_protocol::Result<Self> {
        let r: Self = d402_protocol::cbor::from_canonical(bytes, Self::MAX_SIZE, Self::KIND)?;
        r.lease.verify()?;
        r.claim.verify()?;
        Ok(r)
    }
}

/// A validator's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictResponse {
    /// The signed verdict.
    Verdict(Box<Signed<Verdict>>),
    /// The validator's queue is full.
    Busy,
    /// The request was refused (not a validator, bad lease …).
    Refused {
        /// Why.
        reason: String,
    },
}

impl WireMessage for VerdictResponse {
    const KIND: &'static str = "verdict response";
    const MAX_SIZE: usize = Signed::<Verdict>::max_size() + 64;

    fn from_bytes(bytes: &[u8]) -> d402_protocol::Result<Self> {
        let r: Self = d402_protocol::cbor::from_canonical(bytes, Self::MAX_SIZE, Self::KIND)?;
        match &r {
            VerdictResponse::Verdict(v) => v.verify()?,
            VerdictResponse::Refused { reason } => {
                d402_protocol::types::check_len("reason", reason, MAX_REASON)?
            }
            VerdictResponse::Busy => {}
        }
        Ok(r)
    }
}

/// A blob request: the CID wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRequest {
    /// The content wanted.
    pub cid: Cid,
}

impl WireMessage for BlobRequest {
    const KIND: &'static str = "blob request";
    const MAX_SIZE: usize = 128;
}

/// A blob answer. The requester checks the bytes against the CID it asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobResponse {
    /// The bytes.
    Found {
        /// The content.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        /// For a snapshot: what it is (from the claim that first carried it), so that a
        /// worker re-running the Wasm on it gets the same final URL.
        snapshot: Option<SnapshotMeta>,
    },
    /// This peer does not have it.
    NotFound,
    /// The queue is full.
    Busy,
}

impl WireMessage for BlobResponse {
    const KIND: &'static str = "blob response";
    const MAX_SIZE: usize = protocol_ids::MAX_BLOB + 4 * 1024;
}

impl RrProtocol for BidProto {
    const NAME: &'static str = protocol_ids::BID;
    const TIMEOUT: Duration = Duration::from_millis(protocol_ids::DEFAULT_TIMEOUT_MS);
    type Request = Signed<BidRequest>;
    type Response = BidResponse;

    fn busy() -> Self::Response {
        BidResponse::Declined(DeclineReason::Busy)
    }
}

impl RrProtocol for LeaseProto {
    const NAME: &'static str = protocol_ids::LEASE;
    const TIMEOUT: Duration = Duration::from_millis(protocol_ids::DEFAULT_TIMEOUT_MS);
    type Request = Signed<Lease>;
    type Response = LeaseAck;

    fn busy() -> Self::Response {
        LeaseAck::Refused {
            reason: "busy".into(),
        }
    }
}

impl RrProtocol for ClaimProto {
    const NAME: &'static str = protocol_ids::CLAIM;
    const TIMEOUT: Duration = Duration::from_secs(30);
    type Request = Signed<Claim>;
    type Response = ClaimAck;

    fn busy() -> Self::Response {
        ClaimAck::Refused {
            reason: "busy".into(),
        }
    }
}

impl RrProtocol for VerdictProto {
    const NAME: &'static str = protocol_ids::VERDICT;
    /// A validator fetches the snapshot and re-runs the Wasm before it answers.
    const TIMEOUT: Duration = Duration::from_secs(120);
    type Request = VerdictRequest;
    type Response = VerdictResponse;

    fn busy() -> Self::Response {
        VerdictResponse::Busy
    }
}

impl RrProtocol for BlobProto {
    const NAME: &'static str = protocol_ids::BLOB;
    const TIMEOUT: Duration = Duration::from_secs(60);
    type Request = BlobRequest;
    type Response = BlobResponse;

    fn busy() -> Self::Response {
        BlobResponse::Busy
    }
}

/// The request-response codec of one [`RrProtocol`].
pub struct D402Codec<P>(PhantomData<fn() -> P>);

impl<P> Default for D402Codec<P> {
    fn default() -> Self {
        D402Codec(PhantomData)
    }
}

impl<P> Clone for D402Codec<P> {
    fn clone(&self) -> Self {
        D402Codec(PhantomData)
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads the whole stream, refusing more than `max` bytes.
pub async fn read_capped<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
    kind: &str,
) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    io.take(max as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > max {
        return Err(invalid(format!("{kind} is over {max} bytes")));
    }
    Ok(buf)
}

async fn write_all<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.close().await
}

impl<P: RrProtocol> request_response::Codec for D402Codec<P> {
    type Protocol = StreamProtocol;
    type Request = P::Request;
    type Response = P::Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<P::Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_capped(io, P::REQUEST_MAX, "request").await?;
        P::decode_request(&bytes).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<P::Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_capped(io, P::RESPONSE_MAX, "response").await?;
        P::decode_response(&bytes).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: P::Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = P::encode_request(&req).map_err(invalid)?;
        if bytes.len() > P::REQUEST_MAX {
            return Err(invalid(format!("request is over {} bytes", P::REQUEST_MAX)));
        }
        write_all(io, &bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: P::Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = P::encode_response(&res).map_err(invalid)?;
        if bytes.len() > P::RESPONSE_MAX {
            return Err(invalid(format!(
                "response is over {} bytes",
                P::RESPONSE_MAX
            )));
        }
        write_all(io, &bytes).await
    }
}

/// The behaviour of one protocol: full support (we ask and answer), its timeout, and at
/// most `max_streams` concurrent streams per connection.
pub fn behaviour<P: RrProtocol>(max_streams: usize) -> request_response::Behaviour<D402Codec<P>> {
    request_response::Behaviour::with_codec(
        D402Codec::default(),
        [(
            StreamProtocol::new(P::NAME),
            request_response::ProtocolSupport::Full,
        )],
        request_response::Config::default()
            .with_request_timeout(P::TIMEOUT)
            .with_max_concurrent_streams(max_streams),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use request_response::Codec;

    #[tokio::test]
    async fn oversized_and_malformed_are_errors() {
        let mut codec = D402Codec::<BlobProto>::default();
        let proto = StreamProtocol::new(BlobProto::NAME);
        let mut big = Cursor::new(vec![0u8; BlobProto::REQUEST_MAX + 1]);
        assert!(codec.read_request(&proto, &mut big).await.is_err());
        let mut junk = Cursor::new(vec![0xffu8; 10]);
        assert!(codec.read_request(&proto, &mut junk).await.is_err());
        let req = BlobRequest {
            cid: Cid::raw(b"x"),
        };
        let mut ok = Cursor::new(req.to_bytes().unwrap());
        assert_eq!(codec.read_request(&proto, &mut ok).await.unwrap(), req);
    }

    #[tokio::test]
    async fn bad_signatures_are_refused() {
        use d402_protocol::{SigningKey, TaskId, messages::ClaimAck};
        let key = SigningKey::from_bytes(&[3u8; 32]);
        let output = b"out".to_vec();
        let claim = Claim {
            v: 1,
            task_id: TaskId([1; 16]),
            lease_cid: Cid::raw(b"lease"),
            fencing_token: 1,
            output_cid: Cid::raw(&output),
            output,
            snapshot_cid: None,
            snapshot: None,
            fuel_used: 1,
            finished_at: 1,
        };
        let mut signed = Signed::sign(claim, &key).unwrap();
        signed.body.fuel_used = 2; // tamper
        let bytes = signed.to_bytes().unwrap();
        let mut codec = D402Codec::<ClaimProto>::default();
        let proto = StreamProtocol::new(ClaimProto::NAME);
        assert!(
            codec
                .read_request(&proto, &mut Cursor::new(bytes))
                .await
                .is_err()
        );
        let _ = ClaimAck::Received;
    }
}
