//! `d402 ops-monitor --state DIR`: a node's peers, tasks, reputation, settlements and, for a
//! running worker, why it is idle (decline counters).
//!
//! It asks the running node over its control socket (`<state>/control.sock`, see
//! [`crate::market::ops`]); when no node runs there, it reads the database directly
//! (read-only), without the in-memory counters.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::market::{
    now_ms,
    ops::{self, Status},
};

/// Arguments of `d402 ops-monitor`.
#[derive(Debug, Args)]
pub struct OpsMonitorArgs {
    /// The node's state directory.
    #[arg(long, env = "D402_STATE", value_name = "DIR")]
    state: PathBuf,
    /// Print the status as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run(args: OpsMonitorArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let live = rt
        .block_on(ops::query_control(&args.state))
        .context("cannot ask the running node")?;
    let status = match live {
        Some(s) => s,
        None => ops::read_database(&args.state)
            .with_context(|| format!("cannot read the state in {}", args.state.display()))?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status, now_ms()));
    }
    Ok(())
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let head: String = s.chars().take(n.saturating_sub(1)).collect();
        format!("{head}…")
    }
}

/// The human-readable tables.
pub fn render(s: &Status, now: u64) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "source: {}{}",
        if s.source == "live" {
            "running node"
        } else {
            "database (no node running; in-memory counters unavailable)"
        },
        s.peer_id
            .as_ref()
            .map(|p| format!("  peer {p}"))
            .unwrap_or_default()
    );
    let connected = s.peers.iter().filter(|p| p.connected == Some(true)).count();
    let _ = writeln!(
        o,
        "\nPEERS  {} known{}",
        s.peers.len(),
        if s.source == "live" {
            format!(", {connected} connected")
        } else {
            String::new()
        }
    );
    for p in s.peers.iter().take(20) {
        let _ = writeln!(
            o,
            "  {:<54} {:<9} seen {:>6}s ago  {}",
            p.peer_id,
            match p.connected {
                Some(true) => "connected",
                Some(false) => "-",
                None => "?",
            },
            now.saturating_sub(p.last_seen_ms) / 1000,
            p.addrs.first().map(String::as_str).unwrap_or("")
        );
    }
    let counts: Vec<String> = s
        .task_counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(
        o,
        "\nTASKS  {}",
        if counts.is_empty() {
            "none".to_string()
        } else {
            counts.join(", ")
        }
    );
    if !s.tasks.is_empty() {
        let _ = writeln!(
            o,
            "  {:<32} {:<24} {:<9} {:>5} {:>6} {:>6} {:>8}  reason / output",
            "task", "capability", "phase", "f/q/v", "leases", "claims", "verdicts"
        );
    }
    for t in &s.tasks {
        let _ = writeln!(
            o,
            "  {:<32} {:<24} {:<9} {:>5} {:>6} {:>6} {:>8}  {}",
            t.task_id,
            short(&t.capability, 24),
            t.phase,
            format!("{}/{}/{}", t.fanout, t.quorum, t.validators),
            t.leases,
            t.claims,
            t.verdicts,
            short(
                t.reason
                    .as_deref()
                    .or(t.accepted_output.as_deref())
                    .unwrap_or(""),
                70
            )
        );
    }
    let _ = writeln!(o, "\nREPUTATION  {} workers", s.reputation.len());
    if !s.reputation.is_empty() {
        let _ = writeln!(
            o,
            "  {:<54} {:>9} {:>8} {:>8} {:>9} {:>8}  banned",
            "worker", "score", "accepted", "rejected", "timed_out", "declined"
        );
    }
    for r in &s.reputation {
        let _ = writeln!(
            o,
            "  {:<54} {:>9} {:>8} {:>8} {:>9} {:>8}  {}",
            r.worker,
            format!("{}.{:04}", r.score / 10_000, r.score % 10_000),
            r.accepted,
            r.rejected,
            r.timed_out,
            r.declined,
            if r.banned_until > now {
                format!("for {}s", (r.banned_until - now) / 1000)
            } else {
                "no".into()
            }
        );
    }
    match &s.settlements {
        Some(st) => {
            let _ = writeln!(
                o,
                "\nSETTLEMENTS (local rail)  {} movements, {} accounts, balances {}, locked {} in {} escrows, minted {}, {}",
                st.journal_entries,
                st.accounts,
                st.balances,
                st.locked,
                st.locked_tasks,
                st.minted,
                if st.balanced {
                    "balanced"
                } else {
                    "NOT BALANCED"
                }
            );
        }
        None => {
            let _ = writeln!(o, "\nSETTLEMENTS  none recorded in this node's database");
        }
    }
    if let Some(w) = &s.worker {
        let _ = writeln!(
            o,
            "\nWORKER  leases accepted {}, claims sent {}",
            w.leases_accepted, w.claims_sent
        );
        if w.declines.is_empty() {
            let _ = writeln!(o, "  why idle: no bid request declined");
        } else {
            let why: Vec<String> = w.declines.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(o, "  why idle (declined bid requests): {}", why.join(", "));
        }
    }
    if let Some(v) = &s.validator {
        let refused: u64 = v.refused.values().sum();
        let _ = writeln!(
            o,
            "\nVALIDATOR  agreed {}, disagreed {}, unable {}, refused {}, busy {}",
            v.agreed, v.disagreed, v.unable, refused, v.busy
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::ops::{ReputationRow, WorkerRow};

    #[test]
    fn renders_every_section() {
        let s = Status {
            source: "live".into(),
            peer_id: Some("12D3KooWme".into()),
            peers: Vec::new(),
            task_counts: [("accepted".to_string(), 2)].into_iter().collect(),
            tasks: Vec::new(),
            reputation: vec![ReputationRow {
                worker: "12D3KooWworker".into(),
                score: 750_000,
                accepted: 3,
                rejected: 0,
                timed_out: 1,
                declined: 4,
                banned_until: 0,
            }],
            settlements: None,
            worker: Some(WorkerRow {
                declines: [("no_capacity".to_string(), 5)].into_iter().collect(),
                leases_accepted: 1,
                claims_sent: 1,
            }),
            validator: None,
        };
        let out = render(&s, 1);
        assert!(out.contains("TASKS  accepted 2"), "{out}");
        assert!(out.contains("75.0000"), "{out}");
        assert!(
            out.contains("why idle (declined bid requests): no_capacity 5"),
            "{out}"
        );
    }
}
