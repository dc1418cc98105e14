//! What `d402 ops-monitor` shows, and the control socket it reads from a running node.
//!
//! A running node serves a read-only JSON status on `<state>/control.sock` (a Unix socket,
//! mode 0600 inside the 0700 state directory: only the node's owner can connect). The
//! protocol is one line each way: the client writes `status\n`, the node answers one JSON
//! object ([`Status`]) and a newline, and closes; `peers\n` answers the verified peers of
//! the node's database ([`PeerEntry`] array), for `d402 peers`. The status has everything in the node's
//! database (peers, tasks, reputation, local-rail settlements) plus what lives only in
//! memory: connected peers, a worker's decline counters ("why idle"), a validator's
//! counters.
//!
//! When no node runs, [`read_database`] builds the same status from the redb file opened
//! read-only ([`crate::state::StateReader`]), without the in-memory parts.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use d402_protocol::PublicKey;
use libp2p::PeerId;
use redb::{ReadTransaction, ReadableTable};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{
    reputation::{REPUTATION, Record},
    tasks::{MAX_TASK_RECORD, Phase, TASKS, TaskRecord},
    validator::{Validator, ValidatorStats},
    worker::Worker,
};
use crate::{
    net::{NetHandle, peer_id_of},
    state::{State, StateError, decode},
};

/// File name of the control socket inside `--state`.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Largest status answer a client reads.
pub const MAX_STATUS: usize = 16 * 1024 * 1024;
/// Most tasks listed (most recently updated first); counts cover all of them.
pub const MAX_TASKS_LISTED: usize = 50;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;
/// A connection must send its request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the control socket and of reading a status.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The socket could not be created, connected or used.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The node answered something that is not a status.
    #[error("control socket {path}: bad answer: {reason}")]
    BadAnswer {
        /// The socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The database could not be read.
    #[error(transparent)]
    State(#[from] StateError),
}

/// One task, summarised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRow {
    /// Task id (hex).
    pub task_id: String,
    /// `id@version`.
    pub capability: String,
    /// `bidding`, `leasing`, `accepted` or `failed`.
    pub phase: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// Fanout and quorum.
    pub fanout: u32,
    /// Agreeing claims needed.
    pub quorum: u32,
    /// Validator verdicts required.
    pub validators: u32,
    /// Bids ranked.
    pub bids: usize,
    /// Leases issued.
    pub leases: usize,
    /// Leases still open.
    pub open_leases: usize,
    /// Claims received.
    pub claims: usize,
    /// Verdicts received.
    pub verdicts: usize,
    /// The accepted output CID.
    pub accepted_output: Option<String>,
    /// Last update (Unix ms).
    pub updated_at: u64,
}

/// One worker's reputation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReputationRow {
    /// The worker's PeerId (or its key in hex when it is not an ed25519 key).
    pub worker: String,
    /// Score in parts per million.
    pub score: u32,
    /// Claims that agreed with the quorum.
    pub accepted: u64,
    /// Claims that disagreed.
    pub rejected: u64,
    /// Leases that timed out.
    pub timed_out: u64,
    /// Bid requests declined.
    pub declined: u64,
    /// Banned until (Unix ms), 0 when not banned.
    pub banned_until: u64,
}

/// A known peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    /// The peer.
    pub peer_id: String,
    /// Connected now (`None` when read from the database).
    pub connected: Option<bool>,
    /// Addresses from its signed record.
    pub addrs: Vec<String>,
    /// Last verified (Unix ms).
    pub last_seen_ms: u64,
}

/// Local-rail settlement totals (from the ledger in the node's database).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementRow {
    /// Everything the dev faucet ever credited.
    pub minted: u64,
    /// Sum of all balances (decimal string: it may exceed 64 bits).
    pub balances: String,
    /// Sum of escrows still locked.
    pub locked: String,
    /// Accounts with a balance.
    pub accounts: u64,
    /// Escrows still locked.
    pub locked_tasks: u64,
    /// Whether balances plus locked escrow equal what was minted.
    pub balanced: bool,
    /// Journal entries (money movements).
    pub journal_entries: u64,
}

/// A worker's in-memory counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRow {
    /// Bid requests declined, by reason ("why idle").
    pub declines: BTreeMap<String, u64>,
    /// Leases accepted.
    pub leases_accepted: u64,
    /// Claims the gateway acknowledged.
    pub claims_sent: u64,
}

/// Everything `d402 ops-monitor` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// `live` (from the running node) or `database` (no node running).
    pub source: String,
    /// The node's PeerId (live only).
    pub peer_id: Option<String>,
    /// Known peers.
    pub peers: Vec<PeerRow>,
    /// Tasks by phase (all of them).
    pub task_counts: BTreeMap<String, u64>,
    /// The most recently updated tasks.
    pub tasks: Vec<TaskRow>,
    /// Reputation per worker, best score first.
    pub reputation: Vec<ReputationRow>,
    /// Local-rail settlement totals, when the node has a ledger.
    pub settlements: Option<SettlementRow>,
    /// The worker's counters (live, worker nodes only).
    pub worker: Option<WorkerRow>,
    /// The validator's counters (live, validator nodes only).
    pub validator: Option<ValidatorStats>,
}

fn phase_name(p: &Phase) -> (&'static str, Option<String>) {
    match p {
        Phase::Bidding => ("bidding", None),
        Phase::Leasing => ("leasing", None),
        Phase::Accepted => ("accepted", None),
        Phase::Failed { reason } => ("failed", Some(reason.clone())),
    }
}

fn task_row(r: &TaskRecord) -> TaskRow {
    let (phase, reason) = phase_name(&r.phase);
    TaskRow {
        task_id: r.spec.task_id.to_string(),
        capability: r.spec.capability.to_string(),
        phase: phase.into(),
        reason,
        fanout: r.spec.fanout,
        quorum: r.spec.quorum,
        validators: r.validators,
        bids: r.bids.len(),
        leases: r.leases.len(),
        open_leases: r.leases.iter().filter(|l| l.is_open()).count(),
        claims: r.claims.len(),
        verdicts: r.verdicts.len(),
        accepted_output: r.accepted_output.map(|c| c.to_string()),
        updated_at: r.updated_at,
    }
}

fn worker_name(key: &[u8; 32]) -> String {
    peer_id_of(&PublicKey(*key))
        .map(|p| p.to_string())
        .unwrap_or_else(|_| hex::encode(key))
}

fn missing_is_empty<T>(r: Result<T, redb::TableError>) -> Result<Option<T>, StateError> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The database part of the status, read in one transaction.
fn from_txn(txn: &ReadTransaction) -> Result<Status, StateError> {
    let mut tasks = Vec::new();
    let mut task_counts: BTreeMap<String, u64> = BTreeMap::new();
    if let Some(t) = missing_is_empty(txn.open_table(TASKS))? {
        for row in t.iter()? {
            let (_, v) = row?;
            let rec: TaskRecord = decode("tasks", v.value(), MAX_TASK_RECORD)?;
            *task_counts
                .entry(phase_name(&rec.phase).0.to_string())
                .or_default() += 1;
            tasks.push(task_row(&rec));
        }
    }
    tasks.sort_by_key(|t| std::cmp::Reverse(t.updated_at));
    tasks.truncate(MAX_TASKS_LISTED);
    let mut reputation = Vec::new();
    if let Some(t) = missing_is_empty(txn.open_table(REPUTATION))? {
        for row in t.iter()? {
            let (k, v) = row?;
            let Ok(key) = <[u8; 32]>::try_from(k.value()) else {
                continue;
            };
            let r: Record = decode("reputation", v.value(), 1024)?;
            reputation.push(ReputationRow {
                worker: worker_name(&key),
                score: r.score(),
                accepted: r.accepted,
                rejected: r.rejected,
                timed_out: r.timed_out,
                declined: r.declined,
                banned_until: r.banned_until,
            });
        }
    }
    reputation.sort_by(|a, b| b.score.cmp(&a.score).then(a.worker.cmp(&b.worker)));
    let ledger = d402_settlement::local::LedgerReader::new(txn);
    let settlements = match ledger.audit() {
        Ok(a) if a.accounts > 0 || a.minted > 0 || a.locked_tasks > 0 => Some(SettlementRow {
            minted: a.minted,
            balances: a.balances.to_string(),
            locked: a.locked.to_string(),
            accounts: a.accounts,
            locked_tasks: a.locked_tasks,
            balanced: a.is_balanced(),
            journal_entries: ledger
                .journal(0, usize::MAX)
                .map(|j| j.len() as u64)
                .unwrap_or(0),
        }),
        Ok(_) => None,
        Err(e) => {
            warn!(error = %e, "cannot read the local ledger");
            None
        }
    };
    Ok(Status {
        source: "database".into(),
        peer_id: None,
        peers: Vec::new(),
        task_counts,
        tasks,
        reputation,
        settlements,
        worker: None,
        validator: None,
    })
}

/// The status of a node that is not running, from its database opened read-only.
pub fn read_database(state_dir: &Path) -> Result<Status, StateError> {
    let reader = crate::state::StateReader::open(state_dir)?;
    let mut status = reader.read(from_txn)?;
    status.peers = reader
        .known_peers()?
        .into_iter()
        .map(|(id, p)| PeerRow {
            peer_id: PeerId::from_bytes(&id)
                .map(|p| p.to_string())
                .unwrap_or_else(|_| hex::encode(&id)),
            connected: None,
            addrs: p.addrs,
            last_seen_ms: p.last_seen_ms,
        })
        .collect();
    Ok(status)
}

/// What a running node exposes on its control socket.
#[derive(Debug, Clone)]
pub struct ControlSources {
    /// The node's database.
    pub state: State,
    /// The network layer.
    pub net: NetHandle,
    /// The worker, on worker nodes.
    pub worker: Option<Worker>,
    /// The validator, on validator nodes.
    pub validator: Option<Validator>,
}

impl ControlSources {
    /// The live status.
    pub async fn status(&self) -> Result<Status, StateError> {
        let mut status = self.state.read(from_txn)?;
        status.source = "live".into();
        status.peer_id = Some(self.net.local_peer_id().to_string());
        if let Ok(peers) = self.net.peers().await {
            status.peers = peers
                .into_iter()
                .map(|p| PeerRow {
                    peer_id: p.peer_id.to_string(),
                    connected: Some(p.connected),
                    addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                    last_seen_ms: p.last_seen_ms,
                })
                .collect();
        }
        status.worker = self.worker.as_ref().map(|w| WorkerRow {
            declines: w.declines(),
            leases_accepted: w.leases_accepted(),
            claims_sent: w.claims_sent(),
        });
        status.validator = self.validator.as_ref().map(|v| v.stats());
        Ok(status)
    }
}

/// The running control socket. Dropping it stops serving and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl ControlServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves the read-only status on `<state_dir>/control.sock` (owner-only). A socket file
/// left by a node that died is replaced (the node holds the database lock, so no other
/// node can be using this state directory).
pub fn serve_control(state_dir: &Path, sources: ControlSources) -> Result<ControlServer, OpsError> {
    let path = state_dir.join(CONTROL_SOCKET);
    let io = |source| OpsError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => debug!(path = %path.display(), "removed a stale control socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    info!(path = %path.display(), "control socket listening");
    let sources = Arc::new(sources);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Too many at once: close this one.
                continue;
            };
            let sources = sources.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = answer(stream, &sources).await {
                    debug!(error = %e, "control connection failed");
                }
            });
        }
    });
    Ok(ControlServer { path, task })
}

/// A verified peer as `peers` on the control socket and `d402 peers --json` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntry {
    /// The PeerId (or `invalid:<hex>` for a row whose key does not parse).
    pub peer_id: String,
    /// What the node knows of it.
    #[serde(flatten)]
    pub peer: crate::state::KnownPeer,
}

/// Known peers from `(PeerId bytes, peer)` rows, in the same order.
pub fn peer_entries(rows: Vec<(Vec<u8>, crate::state::KnownPeer)>) -> Vec<PeerEntry> {
    rows.into_iter()
        .map(|(id, peer)| PeerEntry {
            peer_id: PeerId::from_bytes(&id)
                .map(|p| p.to_string())
                .unwrap_or_else(|_| format!("invalid:{}", hex::encode(&id))),
            peer,
        })
        .collect()
}

fn error_body(code: &str, message: String) -> std::io::Result<Vec<u8>> {
    serde_json::to_vec(&serde_json::json!({"error": {"code": code, "message": message}}))
        .map_err(std::io::Error::other)
}

async fn answer(stream: UnixStream, sources: &ControlSources) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(64));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let body = match line.trim() {
        "status" => match sources.status().await {
            Ok(s) => serde_json::to_vec(&s).map_err(std::io::Error::other)?,
            Err(e) => error_body("database_error", e.to_string())?,
        },
        "peers" => match sources.state.known_peers() {
            Ok(rows) => serde_json::to_vec(&peer_entries(rows)).map_err(std::io::Error::other)?,
            Err(e) => error_body("database_error", e.to_string())?,
        },
        other => error_body(
            "unknown_request",
            format!("unknown request {other:?}; send \"status\" or \"peers\""),
        )?,
    };
    write.write_all(&body).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

/// Asks the node running on `state_dir` for its status. `Ok(None)` when no node answers
/// (no socket, or a stale one).
pub async fn query_control(state_dir: &Path) -> Result<Option<Status>, OpsError> {
    ask(state_dir, "status").await
}

/// Asks the node running on `state_dir` for the peers in its database. `Ok(None)` when no
/// node answers.
pub async fn query_peers(state_dir: &Path) -> Result<Option<Vec<PeerEntry>>, OpsError> {
    ask(state_dir, "peers").await
}

/// Sends `request` on the control socket and decodes the one JSON answer.
async fn ask<T: serde::de::DeserializeOwned>(
    state_dir: &Path,
    request: &str,
) -> Result<Option<T>, OpsError> {
    let path = state_dir.join(CONTROL_SOCKET);
    let mut stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(source) => return Err(OpsError::Io { path, source }),
    };
    let io = |source| OpsError::Io {
        path: path.clone(),
        source,
    };
    stream
        .write_all(format!("{request}\n").as_bytes())
        .await
        .map_err(io)?;
    let mut buf = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        (&mut stream)
            .take(MAX_STATUS as u64 + 1)
            .read_to_end(&mut buf),
    )
    .await
    .map_err(|_| OpsError::BadAnswer {
        path: path.clone(),
        reason: "no answer within 30 s".into(),
    })?
    .map_err(io)?;
    if buf.len() > MAX_STATUS {
        return Err(OpsError::BadAnswer {
            path,
            reason: format!("over {MAX_STATUS} bytes"),
        });
    }
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_slice(&buf)
        && let Some(err) = o.get("error")
    {
        return Err(OpsError::BadAnswer {
            path,
            reason: format!("the node answered {err}"),
        });
    }
    serde_json::from_slice(&buf)
        .map(Some)
        .map_err(|e| OpsError::BadAnswer {
            path,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::{
        now_ms,
        reputation::{Outcome, Policy, Reputation},
        tasks::{TaskSpec, Tasks},
    };
    use d402_protocol::{Amount, Cid, RailKind, TaskId};

    fn spec(n: u8) -> TaskSpec {
        TaskSpec {
            task_id: TaskId([n; 16]),
            capability: "test.echo@1".parse().unwrap(),
            manifest_cid: Cid::raw(b"m"),
            input: b"{}".to_vec(),
            rail: RailKind::Local,
            budget: Amount {
                asset: "local:USDC".into(),
                units: 10,
            },
            fanout: 3,
            quorum: 2,
            deadline: now_ms() + 1000,
            takes_snapshot: true,
        }
    }

    fn fill(state: &State) {
        let tasks = Tasks::new(state.clone());
        let mut a = TaskRecord::new(spec(1), 5);
        a.phase = Phase::Accepted;
        tasks.create(&a).unwrap();
        let mut f = TaskRecord::new(spec(2), 6);
        f.phase = Phase::Failed {
            reason: "no usable bids".into(),
        };
        tasks.create(&f).unwrap();
        let rep = Reputation::new(state.clone(), Policy::default());
        rep.record(&[7u8; 32], Outcome::Accepted, 1).unwrap();
        rep.record(&[8u8; 32], Outcome::Rejected, 1).unwrap();
    }

    #[test]
    fn database_status_without_a_node() {
        let dir = tempfile::tempdir().unwrap();
        fill(&State::open(dir.path()).unwrap());
        let s = read_database(dir.path()).unwrap();
        assert_eq!(s.source, "database");
        assert_eq!(s.task_counts.get("accepted"), Some(&1));
        assert_eq!(s.task_counts.get("failed"), Some(&1));
        assert_eq!(s.tasks[0].task_id, TaskId([2; 16]).to_string());
        assert_eq!(s.tasks[0].reason.as_deref(), Some("no usable bids"));
        assert_eq!(s.reputation.len(), 2);
        assert_eq!(s.reputation[0].accepted, 1);
        assert_eq!(s.reputation[1].rejected, 1);
        assert!(s.reputation[0].score > s.reputation[1].score);
        assert!(s.settlements.is_none());
    }

    #[tokio::test]
    async fn control_socket_serves_the_live_status_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        fill(&state);
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).unwrap();
        let key = d402_protocol::SigningKey::from_bytes(&seed);
        let mut cfg = crate::net::NetConfig::new(std::net::Ipv4Addr::LOCALHOST.into(), 0);
        cfg.quic = false;
        let node = crate::net::start(cfg, &key, state.clone()).await.unwrap();
        let server = serve_control(
            dir.path(),
            ControlSources {
                state: state.clone(),
                net: node.handle(),
                worker: None,
                validator: None,
            },
        )
        .unwrap();
        let mode = std::fs::metadata(server.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let s = query_control(dir.path()).await.unwrap().unwrap();
        assert_eq!(s.source, "live");
        assert_eq!(s.peer_id, Some(node.peer_id().to_string()));
        assert_eq!(s.task_counts.get("accepted"), Some(&1));
        assert_eq!(s.reputation.len(), 2);
        // The peers of the database, for `d402 peers` (the node holds the file).
        state
            .upsert_peer(
                &node.peer_id().to_bytes(),
                &crate::state::KnownPeer {
                    addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
                    protocols: vec![],
                    agent: "test".into(),
                    kad_server: true,
                    rendezvous_point: false,
                    first_seen_ms: 1,
                    last_seen_ms: 2,
                },
            )
            .unwrap();
        let peers = query_peers(dir.path()).await.unwrap().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].peer_id, node.peer_id().to_string());
        assert!(peers[0].peer.kad_server);
        // A bad request gets a typed error, not a status.
        let mut c = UnixStream::connect(server.path()).await.unwrap();
        c.write_all(b"shutdown\n").await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("unknown_request"), "{out}");
        drop(server);
        assert!(!dir.path().join(CONTROL_SOCKET).exists());
        assert!(query_control(dir.path()).await.unwrap().is_none());
        node.shutdown().await;
        // No node: the database is read directly.
        drop(state);
        assert_eq!(read_database(dir.path()).unwrap().source, "database");
    }
}
