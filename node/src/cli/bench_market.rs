//! `d402 bench market`: the coordinator's overhead for fanout 3 / quorum 2 (issue 6).
//!
//! In this process: a gateway and three workers, each a real node (own key, swarm, event
//! loop, redb file in a temporary directory) on loopback TCP, selling a trivial capability
//! (an echo module: its output is its input; it takes no snapshot, so nothing is pinned).
//! Each sample is one `Coordinator::run_task` from the task's creation to its acceptance:
//! bid round, ranking, three leases at once (committed with the ranked bids), the claims
//! (inline in the leases' answers), the quorum decision (committed with the claim that
//! completes it), every step committed to redb before the next message. Compute is excluded
//! by measuring, in the same run, the echo module's whole `Runner::run` alone and
//! subtracting one run: the three run in parallel, one on the critical path.
//!
//! The floor, measured in the same run over the same connections: three bare
//! request-response round trips in sequence (`/d402/blob/1`, answered from memory) whose
//! answer is as large as the task's largest message (its signed claim or lease).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use d402_capabilities::Manifest;
use d402_protocol::{Amount, Chain, Cid, RailKind, TaskId};
use d402_runtime::Runner;
use libp2p::Multiaddr;

use super::bench::{TmpDir, echo_runner, ms, percentile, random_key, start_market_node};
use crate::{
    market::{
        blobs::{self, BlobStore},
        coordinator::{Coordinator, CoordinatorConfig},
        now_ms,
        reputation::{Policy, Reputation},
        service::{self, Services},
        tasks::{Phase, TaskSpec},
        worker::{OfferedCapability, Worker, WorkerConfig},
    },
    net::{NetHandle, Node},
    state::State,
};

/// An echo module speaking d402-wasm-1 (`d402_alloc` returns 1024, `d402_run` returns its
/// whole input as output). Checked against its WAT source in the tests below.
pub const ECHO_WASM: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x02, 0x60, 0x01, 0x7f, 0x01, 0x7f,
    0x60, 0x02, 0x7f, 0x7f, 0x01, 0x7e, 0x03, 0x03, 0x02, 0x00, 0x01, 0x05, 0x03, 0x01, 0x00, 0x02,
    0x07, 0x22, 0x03, 0x06, 0x6d, 0x65, 0x6d, 0x6f, 0x72, 0x79, 0x02, 0x00, 0x0a, 0x64, 0x34, 0x30,
    0x32, 0x5f, 0x61, 0x6c, 0x6c, 0x6f, 0x63, 0x00, 0x00, 0x08, 0x64, 0x34, 0x30, 0x32, 0x5f, 0x72,
    0x75, 0x6e, 0x00, 0x01, 0x0a, 0x14, 0x02, 0x05, 0x00, 0x41, 0x80, 0x08, 0x0b, 0x0c, 0x00, 0x20,
    0x00, 0xad, 0x42, 0x20, 0x86, 0x20, 0x01, 0xad, 0x84, 0x0b,
];

/// Arguments of `d402 bench market`.
#[derive(Debug, Args)]
pub struct MarketArgs {
    /// Tasks measured.
    #[arg(long, default_value_t = 200)]
    tasks: usize,
    /// Tasks run first and not measured.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Where the nodes' databases go (default: the system's temporary directory). A tmpfs
    /// such as /dev/shm takes the disk's fsync latency out of the numbers.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Send leases on long-lived pipes (`/d402/lease-pipe/1`); `false` sends each on its own
    /// request-response stream (`/d402/lease/1`), to compare.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    lease_pipes: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

struct Peer {
    node: Node,
    net: NetHandle,
    addr: Multiaddr,
    blobs: BlobStore,
    service: tokio::task::JoinHandle<()>,
    _dir: TmpDir,
}

fn offer() -> anyhow::Result<OfferedCapability> {
    let manifest = Manifest::template("bench.echo", 1, Cid::raw(ECHO_WASM), Vec::new())?;
    Ok(OfferedCapability {
        manifest_cid: manifest.cid()?,
        manifest,
        wasm: Arc::new(ECHO_WASM.to_vec()),
        floor: 10,
        asset: "local:USDC".into(),
    })
}

async fn worker(
    offer: &OfferedCapability,
    runner: &Runner,
    i: usize,
    base: &Option<PathBuf>,
    lease_pipes: bool,
) -> anyhow::Result<Peer> {
    let k = random_key()?;
    let dir = TmpDir::new_in(base.as_deref())?;
    let (node, net, addr, _state) = start_market_node(&k, &dir, lease_pipes).await?;
    let blobs = BlobStore::new(64 * 1024 * 1024);
    let payout = [(Chain::Local, format!("bench-worker-{i}"))]
        .into_iter()
        .collect();
    let w = Worker::new(
        k,
        net.clone(),
        runner.clone(),
        WorkerConfig::new(vec![offer.clone()], vec![RailKind::Local], payout),
        blobs.clone(),
    );
    let service = service::serve(
        &net,
        Services {
            worker: Some(w),
            coordinator: None,
            validator: None,
            blobs: blobs.clone(),
        },
        64,
    )
    .await?;
    Ok(Peer {
        node,
        net,
        addr,
        blobs,
        service,
        _dir: dir,
    })
}

fn spec(offer: &OfferedCapability, n: usize) -> anyhow::Result<TaskSpec> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).context("no randomness")?;
    Ok(TaskSpec {
        task_id: TaskId(id),
        capability: offer.manifest.capability(),
        manifest_cid: offer.manifest_cid,
        input: format!("{{\"n\":{n}}}").into_bytes(),
        rail: RailKind::Local,
        budget: Amount {
            asset: offer.asset.clone(),
            units: 1_000,
        },
        fanout: 3,
        quorum: 2,
        deadline: now_ms() + 60_000,
        takes_snapshot: !offer.manifest.permissions.snapshotters.is_empty(),
    })
}

struct Dist {
    p50: Duration,
    p90: Duration,
    p99: Duration,
}

impl Dist {
    fn of(s: &[Duration]) -> Dist {
        Dist {
            p50: percentile(s, 0.50),
            p90: percentile(s, 0.90),
            p99: percentile(s, 0.99),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"p50_ms": ms(self.p50), "p90_ms": ms(self.p90), "p99_ms": ms(self.p99)})
    }
}

/// Runs the benchmark.
pub async fn market(args: MarketArgs) -> anyhow::Result<()> {
    if args.tasks == 0 {
        bail!("--tasks must be at least 1");
    }
    let offer = offer()?;
    let runner = echo_runner(4, 256 * 1024 * 1024)?;
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(worker(&offer, &runner, i, &args.dir, args.lease_pipes).await?);
    }
    let gk = random_key()?;
    let _gdir = TmpDir::new_in(args.dir.as_deref())?;
    let (gnode, gnet, _gaddr, gstate) = start_market_node(&gk, &_gdir, args.lease_pipes).await?;
    let gblobs = BlobStore::new(64 * 1024 * 1024);
    let coord = Coordinator::new(
        gk,
        gnet.clone(),
        gstate.clone(),
        Reputation::new(gstate.clone(), Policy::default()),
        gblobs.clone(),
        CoordinatorConfig::default(),
    );
    let gservice = service::serve(
        &gnet,
        Services {
            worker: None,
            coordinator: Some(coord.clone()),
            validator: None,
            blobs: gblobs,
        },
        64,
    )
    .await?;
    for w in &workers {
        gnet.connect(w.addr.clone()).await?;
    }
    // The workers announce the capability as `d402 node` does, so the gateway's provider
    // lookup finds them (once: it is reused for `PROVIDER_TTL`, as in production).
    for w in &workers {
        w.net.provide(offer.manifest_cid).await?;
    }

    // Compute alone: the echo module's whole run (compile cache hit, instantiate, call).
    let mut compute = Vec::new();
    for n in 0..(args.warmup + args.tasks) {
        let input = format!("{{\"n\":{n}}}");
        let t = Instant::now();
        runner
            .run(&offer.manifest, ECHO_WASM, input.as_bytes(), None)
            .await?;
        if n >= args.warmup {
            compute.push(t.elapsed());
        }
    }

    // The coordinator, end to end.
    let mut totals = Vec::new();
    let mut largest = 0usize;
    for n in 0..(args.warmup + args.tasks) {
        let s = spec(&offer, n)?;
        let t = Instant::now();
        let rec = coord.run_task(s).await?;
        let took = t.elapsed();
        if rec.phase != Phase::Accepted {
            bail!("task {n} was not accepted: {:?}", rec.phase);
        }
        for c in &rec.claims {
            largest = largest.max(c.claim.to_bytes()?.len());
        }
        for l in &rec.leases {
            largest = largest.max(l.lease.to_bytes()?.len());
        }
        if n >= args.warmup {
            totals.push(took);
        }
    }

    // The floor: three bare round trips in sequence, answers as large as the largest message.
    let blob: Vec<u8> = (0..largest).map(|i| i as u8).collect();
    let blob_cid = Cid::raw(&blob);
    for w in &workers {
        w.blobs.put(blob_cid, Arc::new(blob.clone()), None);
    }
    let mut floor = Vec::new();
    for n in 0..(args.warmup + args.tasks) {
        let t = Instant::now();
        for w in &workers {
            blobs::fetch(&gnet, w.node.peer_id(), Vec::new(), blob_cid).await?;
        }
        if n >= args.warmup {
            floor.push(t.elapsed());
        }
    }

    // One durable redb commit (what each coordinator step costs at least), in a scratch
    // table of a database of its own.
    let scratch_dir = TmpDir::new_in(args.dir.as_deref())?;
    let scratch = State::open(&scratch_dir.0)?;
    const SCRATCH: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("bench_scratch");
    let mut commits = Vec::new();
    for n in 0..(args.warmup + args.tasks) as u64 {
        let t = Instant::now();
        scratch.write(|tx| {
            tx.open_table(SCRATCH)?.insert(n, n)?;
            Ok(())
        })?;
        if n >= args.warmup as u64 {
            commits.push(t.elapsed());
        }
    }
    drop(scratch);

    let c = Dist::of(&compute);
    let commit = Dist::of(&commits);
    let total = Dist::of(&totals);
    let fl = Dist::of(&floor);
    // One run on the critical path: the three leased workers run in parallel.
    let overhead: Vec<Duration> = totals.iter().map(|t| t.saturating_sub(c.p50)).collect();
    let o = Dist::of(&overhead);
    let ratio = |a: Duration, b: Duration| {
        if b.is_zero() {
            0.0
        } else {
            a.as_secs_f64() / b.as_secs_f64()
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "tasks": args.tasks,
                "fanout": 3,
                "quorum": 2,
                "message_bytes": largest,
                "task_total": total.json(),
                "compute_per_run": c.json(),
                "coordinator_overhead": o.json(),
                "floor_three_round_trips": fl.json(),
                "redb_durable_commit": commit.json(),
                "overhead_over_floor_p50": ratio(o.p50, fl.p50),
            }))?
        );
    } else {
        println!(
            "market: {} tasks, fanout 3, quorum 2, echo capability, largest message {} bytes",
            args.tasks, largest
        );
        let row = |name: &str, d: &Dist| {
            println!(
                "  {name:<40} p50 {:>8.3} ms  p90 {:>8.3} ms  p99 {:>8.3} ms",
                ms(d.p50),
                ms(d.p90),
                ms(d.p99)
            )
        };
        row("task end to end", &total);
        row("compute (one echo run)", &c);
        row("coordinator overhead (total - 1 run)", &o);
        row("floor: 3 bare round trips", &fl);
        row("one durable redb commit", &commit);
        println!(
            "  overhead / floor at p50: {:.2}x (target: overhead p50 <= 2 ms)",
            ratio(o.p50, fl.p50)
        );
    }
    gservice.abort();
    gnode.shutdown().await;
    for w in workers {
        w.service.abort();
        w.node.shutdown().await;
        drop(w.net);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_module_is_its_wat_source() {
        // Without `$names`, so that no name section is emitted.
        let wat = wat::parse_str(
            r#"(module
  (memory (export "memory") 2)
  (func (export "d402_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "d402_run") (param i32) (param i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get 0)) (i64.const 32))
            (i64.extend_i32_u (local.get 1)))))"#,
        )
        .unwrap();
        assert_eq!(wat, ECHO_WASM);
    }
}
