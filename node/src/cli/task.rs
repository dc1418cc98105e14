//! `d402 task run`: one paid task through a gateway's x402 flow.
//!
//! 1. `POST /v1/tasks` without payment; the gateway answers `402` with its terms
//!    (`PAYMENT-REQUIRED`, or the v1 JSON body with `--x402-version 1`).
//! 2. The client refuses terms above `--max-price`, signs a local-rail payment for exactly
//!    the asked amount (a fresh nonce, a validity window of the gateway's
//!    `maxTimeoutSeconds`) and sends the same request again with `PAYMENT-SIGNATURE` (v2)
//!    or `X-PAYMENT` (v1) and the same `Idempotency-Key` (a random one when none is given, so
//!    a repeated request is never charged twice).
//! 3. On `200` it prints the output (Markdown as text, anything else as JSON) on stdout
//!    and, on stderr, the quorum, the workers and the settlement, after checking the
//!    receipt in `PAYMENT-RESPONSE`: signed by the gateway's `payTo` key, for this task,
//!    this payer and the amount paid, its transfers adding up. Any other answer exits
//!    non-zero with the gateway's JSON error on stdout.

use std::{borrow::Cow, path::PathBuf, sync::OnceLock, time::Duration};

use anyhow::{Context, bail};
use clap::Args;
use d402_protocol::{PublicKey, SigningKey, messages::PayeeRole};
use d402_settlement::{
    Asset, LOCAL_NETWORK, client,
    x402::{
        PAYMENT_REQUIRED, PAYMENT_RESPONSE, PaymentRequired, SCHEME_EXACT, SettlementResponse,
        X_PAYMENT_RESPONSE,
    },
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    http_client::{BaseUrl, Connection, Response},
    wallet::{describe_units, load_wallet},
};

/// Default `--max-price`: the most this client pays for one task unless told otherwise.
pub const DEFAULT_MAX_PRICE: &str = "$0.05";

/// Longest `Idempotency-Key` (the gateway accepts 1..=128 visible ASCII characters).
const MAX_IDEMPOTENCY_KEY: usize = 128;

/// `d402 task` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TaskCommand {
    /// Run one paid task through a gateway (402, pay, result and receipt).
    Run(RunArgs),
}

/// `d402 task run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The gateway, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    gateway: String,
    /// The capability, `id@version`, e.g. web.page_to_markdown@1.
    #[arg(long)]
    capability: String,
    /// An input field, `key=value` (a string; repeatable), e.g. url=https://example.com.
    #[arg(long = "input", value_name = "KEY=VALUE")]
    inputs: Vec<String>,
    /// Input fields as a JSON object (merged with --input; a key given twice is refused).
    #[arg(long, value_name = "JSON")]
    input_json: Option<String>,
    /// The local-rail wallet key file that pays.
    #[arg(long)]
    wallet: PathBuf,
    /// Idempotency-Key: repeating a request with it returns the first answer, uncharged.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// The most this task may cost, e.g. '$0.05'; a higher price is refused before paying.
    #[arg(long, default_value = DEFAULT_MAX_PRICE)]
    max_price: String,
    /// x402 version to pay with: 2 (PAYMENT-SIGNATURE header) or 1 (X-PAYMENT).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    x402_version: u8,
    /// Print the gateway's whole JSON answer (with `receipt_verified`) on stdout.
    #[arg(long)]
    json: bool,
    /// Longest wait for the gateway's answer, in seconds.
    #[arg(long, default_value_t = 180)]
    timeout_secs: u64,
}

/// Runs a `d402 task` subcommand.
pub fn run(cmd: TaskCommand) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Run(a) => run_task(a),
    }
}

fn run_task(a: RunArgs) -> anyhow::Result<()> {
    let input = build_input(&a.inputs, a.input_json.as_deref())?;
    let max_units = Asset::local_usdc()
        .parse(&a.max_price)
        .with_context(|| format!("--max-price {:?}", a.max_price))?;
    let payer = load_wallet(&a.wallet)?;
    let base = BaseUrl::parse(&a.gateway)?;
    let request = TaskRequest {
        capability: a.capability.clone(),
        input,
        idempotency_key: a.idempotency_key.clone(),
    };
    let options = PayOptions {
        max_units,
        x402_version: a.x402_version,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = rt.block_on(async {
        let mut conn = Connection::new(base, Duration::from_secs(a.timeout_secs.max(1)));
        run_paid_task(&mut conn, &request, &payer, &options).await
    })?;
    if !outcome.response.status.is_success() {
        println!("{}", String::from_utf8_lossy(&outcome.response.body));
        bail!(
            "the gateway answered {} after payment: {}{}",
            outcome.response.status,
            outcome.response.error_text(),
            if outcome.refunded() {
                " (the payment was refunded)"
            } else {
                ""
            }
        );
    }
    if a.json {
        let mut body = outcome.body().clone();
        if let Some(obj) = body.as_object_mut() {
            obj.insert("receipt_verified".into(), json!(outcome.receipt.is_some()));
        }
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        println!("{}", output_text(outcome.body())?);
    }
    eprintln!("{}", outcome.summary());
    Ok(())
}

/// The task input from `key=value` pairs and a JSON object.
pub fn build_input(
    pairs: &[String],
    json_text: Option<&str>,
) -> anyhow::Result<Map<String, Value>> {
    let mut input = match json_text {
        Some(text) => {
            match serde_json::from_str::<Value>(text).with_context(|| "--input-json is not JSON")? {
                Value::Object(m) => m,
                other => bail!("--input-json must be a JSON object, not {other}"),
            }
        }
        None => Map::new(),
    };
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("--input {pair:?} is not key=value"))?;
        if k.is_empty() {
            bail!("--input {pair:?} has an empty key");
        }
        if input
            .insert(k.to_string(), Value::String(v.to_string()))
            .is_some()
        {
            bail!("input field {k:?} is given twice");
        }
    }
    Ok(input)
}

/// What to run.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    /// `id@version`.
    pub capability: String,
    /// The input object.
    pub input: Map<String, Value>,
    /// The `Idempotency-Key` (a random one is used when `None`).
    pub idempotency_key: Option<String>,
}

/// How to pay.
#[derive(Debug, Clone, Copy)]
pub struct PayOptions {
    /// Refuse a price above this many smallest units.
    pub max_units: u64,
    /// 2: `PAYMENT-SIGNATURE`; 1: `X-PAYMENT`.
    pub x402_version: u8,
}

/// The result of a paid request.
#[derive(Debug)]
pub struct TaskOutcome {
    /// The challenge the gateway sent.
    pub challenge: PaymentRequired,
    /// Units paid (the challenge's amount).
    pub paid_units: u64,
    /// The answer to the paid request.
    pub response: Response,
    /// Its JSON body, parsed when first asked for ([`TaskOutcome::body`]).
    body: OnceLock<Value>,
    /// The settlement header, decoded.
    pub settlement: Option<SettlementResponse>,
    /// The verified receipt (present only when verified).
    pub receipt: Option<d402_protocol::Signed<d402_protocol::messages::SettlementReceipt>>,
    /// The payer's address.
    pub payer: String,
}

impl TaskOutcome {
    /// The answer's JSON body (`Null` when not JSON). Parsed on first use: a caller that
    /// only checks the receipt (a benchmark's client) does not pay for the tree.
    pub fn body(&self) -> &Value {
        self.body
            .get_or_init(|| serde_json::from_slice(&self.response.body).unwrap_or(Value::Null))
    }

    /// Whether the gateway says the payment was refunded.
    pub fn refunded(&self) -> bool {
        self.body().get("refunded").and_then(Value::as_bool) == Some(true)
    }

    /// Lines for stderr: task, quorum, workers, split and receipt.
    pub fn summary(&self) -> String {
        let b = self.body();
        let asset = self
            .receipt
            .as_ref()
            .map(|r| r.body.charged.asset.clone())
            .unwrap_or_else(|| Asset::local_usdc().id);
        let mut lines = vec![format!(
            "task {} {} ({}), paid {}",
            b["task_id"].as_str().unwrap_or("?"),
            b["status"].as_str().unwrap_or("?"),
            b["capability"].as_str().unwrap_or("?"),
            describe_units(self.paid_units, &asset)
        )];
        if let Some(q) = b.get("quorum") {
            lines.push(format!(
                "quorum {} of {} agreed (fanout {}, quorum {})",
                q["agreeing"], q["fanout"], q["fanout"], q["quorum"]
            ));
        }
        for c in b["claims"].as_array().into_iter().flatten() {
            lines.push(format!(
                "  worker {} claim {} {}",
                c["worker"].as_str().unwrap_or("?"),
                c["claim_cid"].as_str().unwrap_or("?"),
                c["judgement"].as_str().unwrap_or("?")
            ));
        }
        match &self.receipt {
            Some(r) => {
                for t in &r.body.transfers {
                    lines.push(format!(
                        "  {:<8} {} -> {}",
                        role_name(t.role),
                        describe_units(t.units, &r.body.charged.asset),
                        t.to
                    ));
                }
                lines.push(format!(
                    "receipt verified: signed by the gateway {}, {} transfers adding up to {}",
                    self.challenge
                        .find(SCHEME_EXACT, LOCAL_NETWORK)
                        .map_or("?", |r| r.pay_to.as_str()),
                    r.body.transfers.len(),
                    describe_units(r.body.charged.units, &r.body.charged.asset)
                ));
            }
            None => lines.push("no receipt in the answer".to_string()),
        }
        lines.join("\n")
    }
}

/// The display name of a payee role.
pub fn role_name(role: PayeeRole) -> &'static str {
    match role {
        PayeeRole::Worker => "worker",
        PayeeRole::Creator => "creator",
        PayeeRole::Gateway => "gateway",
        PayeeRole::Refund => "refund",
    }
}

/// The task's output as text: a JSON string as is (Markdown), anything else as JSON.
pub fn output_text(body: &Value) -> anyhow::Result<String> {
    match body.get("output") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Ok(serde_json::to_string_pretty(other)?),
        None => bail!("the gateway's answer has no output: {body}"),
    }
}

fn now_ms() -> anyhow::Result<u64> {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    u64::try_from(d.as_millis()).context("the system clock is out of range")
}

fn random_idempotency_key() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).context("no randomness from the OS")?;
    Ok(format!("d402-cli-{}", hex::encode(b)))
}

/// The gateway's 402 for a request, before anything is paid.
#[derive(Debug, Clone)]
pub struct Challenge {
    /// The request body sent (sent again with the payment).
    pub body: Value,
    /// The `Idempotency-Key` used for both requests.
    pub idempotency_key: String,
    /// The terms, in the v2 form.
    pub terms: PaymentRequired,
    /// The local-rail amount asked, in smallest units.
    pub amount: u64,
    /// The gateway's `payTo` key: its local-rail account, and the key that signs receipts.
    pub gateway_key: PublicKey,
}

/// The 402 dance: [`fetch_challenge`] then [`pay_challenge`].
///
/// Errors before payment (no 402, terms above the limit, an unusable challenge) return
/// `Err` and nothing was paid. After payment, any answer is returned in the
/// [`TaskOutcome`]; a `2xx` whose receipt does not verify is an `Err`.
pub async fn run_paid_task(
    conn: &mut Connection,
    request: &TaskRequest,
    payer: &SigningKey,
    options: &PayOptions,
) -> anyhow::Result<TaskOutcome> {
    let challenge = fetch_challenge(conn, request, options).await?;
    pay_challenge(conn, &challenge, payer, options).await
}

/// Sends the request without payment and reads the 402: refuses terms above
/// `options.max_units` or not payable on the local rail. Nothing is paid.
pub async fn fetch_challenge(
    conn: &mut Connection,
    request: &TaskRequest,
    options: &PayOptions,
) -> anyhow::Result<Challenge> {
    let key = match &request.idempotency_key {
        Some(k) => {
            if k.is_empty()
                || k.len() > MAX_IDEMPOTENCY_KEY
                || !k.bytes().all(|b| b.is_ascii_graphic())
            {
                bail!(
                    "--idempotency-key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                );
            }
            k.clone()
        }
        None => random_idempotency_key()?,
    };
    let body = json!({"capability": request.capability, "input": request.input});
    let first = conn
        .post_json("/v1/tasks", &[("Idempotency-Key", key.clone())], &body)
        .await?;
    if first.status != http::StatusCode::PAYMENT_REQUIRED {
        bail!(
            "expected 402 Payment Required, the gateway answered {}: {}",
            first.status,
            first.error_text()
        );
    }
    let terms = if options.x402_version == 1 {
        client::read_challenge(None, Some(&first.body))
    } else {
        client::read_challenge(first.header(PAYMENT_REQUIRED), Some(&first.body))
    }
    .context("cannot read the gateway's 402")?;
    let requirement = client::local_requirement(&terms)?;
    let local = Asset::local_usdc();
    if requirement.asset != local.id {
        bail!(
            "the gateway asks for asset {:?}; this client pays the local rail's {}",
            requirement.asset,
            local.id
        );
    }
    let amount = requirement.amount.0;
    if amount > options.max_units {
        bail!(
            "the gateway asks {} for {}, above --max-price {}; nothing was paid",
            describe_units(amount, &local.id),
            request.capability,
            describe_units(options.max_units, &local.id)
        );
    }
    let gateway_key: PublicKey = requirement
        .pay_to
        .parse()
        .map_err(|_| anyhow::anyhow!("payTo {:?} is not a key", requirement.pay_to))?;
    Ok(Challenge {
        body,
        idempotency_key: key,
        terms,
        amount,
        gateway_key,
    })
}

/// Pays `challenge` with `payer` and sends the request again with the payment; checks the
/// receipt of a `2xx`.
pub async fn pay_challenge(
    conn: &mut Connection,
    challenge: &Challenge,
    payer: &SigningKey,
    options: &PayOptions,
) -> anyhow::Result<TaskOutcome> {
    let payment = client::pay_local(&challenge.terms, payer, now_ms()?, Some(options.max_units))?;
    let (name, value) = if options.x402_version == 1 {
        payment.header_v1()?
    } else {
        payment.header_v2()?
    };
    let response = conn
        .post_json(
            "/v1/tasks",
            &[
                ("Idempotency-Key", challenge.idempotency_key.clone()),
                (name, value),
            ],
            &challenge.body,
        )
        .await?;
    let payer_address = d402_settlement::wallet::address(payer);
    let header_name = if options.x402_version == 1 {
        X_PAYMENT_RESPONSE
    } else {
        PAYMENT_RESPONSE
    };
    // The header of the version paid with; a stored answer replayed for an
    // Idempotency-Key may carry the other version's name.
    let settlement = response
        .header(header_name)
        .or_else(|| response.header(PAYMENT_RESPONSE))
        .or_else(|| response.header(X_PAYMENT_RESPONSE))
        .map(SettlementResponse::from_header)
        .transpose()
        .with_context(|| format!("cannot read {header_name}"))?;
    let mut outcome = TaskOutcome {
        challenge: challenge.terms.clone(),
        paid_units: challenge.amount,
        response,
        body: OnceLock::new(),
        settlement,
        receipt: None,
        payer: payer_address,
    };
    if outcome.response.status.is_success() {
        let settlement = outcome
            .settlement
            .as_ref()
            .with_context(|| format!("the paid answer carries no {header_name} header"))?;
        let receipt = settlement
            .verified_receipt(Some(&challenge.gateway_key))
            .context("the settlement receipt does not verify")?
            .with_context(|| format!("{header_name} carries no receipt"))?;
        check_receipt(&outcome, receipt)?;
        outcome.receipt = Some(receipt.clone());
    }
    Ok(outcome)
}

/// The `task_id` of the answer, read without building the whole tree when it can be
/// (`None` when the answer is not JSON or has no string `task_id`).
fn answer_task_id(outcome: &TaskOutcome) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct TaskId<'a> {
        #[serde(borrow, default)]
        task_id: Option<Cow<'a, str>>,
    }
    match serde_json::from_slice::<TaskId<'_>>(&outcome.response.body) {
        Ok(t) => t.task_id,
        // Not JSON, a `task_id` that is not a string, or a key given twice: read as the
        // tree reads it (the last of repeated keys counts).
        Err(_) => outcome
            .body()
            .get("task_id")
            .and_then(Value::as_str)
            .map(Cow::Borrowed),
    }
}

/// Checks the verified receipt against what was asked and paid.
fn check_receipt(
    outcome: &TaskOutcome,
    receipt: &d402_protocol::Signed<d402_protocol::messages::SettlementReceipt>,
) -> anyhow::Result<()> {
    let r = &receipt.body;
    if let Some(task) = answer_task_id(outcome)
        && r.task_id.to_string() != task
    {
        bail!(
            "the receipt is for task {}, the answer for {task}",
            r.task_id
        );
    }
    if r.payer != outcome.payer {
        bail!(
            "the receipt names payer {}, not this wallet {}",
            r.payer,
            outcome.payer
        );
    }
    if r.charged.units != outcome.paid_units {
        bail!(
            "the receipt charges {} units, the payment was {}",
            r.charged.units,
            outcome.paid_units
        );
    }
    let sum = r
        .transfers
        .iter()
        .try_fold(0u64, |acc, t| acc.checked_add(t.units))
        .context("the receipt's transfers overflow")?;
    if sum != r.charged.units {
        bail!(
            "the receipt's transfers add up to {sum}, not {}",
            r.charged.units
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answers_task_id_is_read_as_the_tree_reads_it() {
        let outcome = |body: &[u8]| TaskOutcome {
            challenge: serde_json::from_value(
                json!({"x402Version": 2, "resource": {"url": "http://gw/v1/tasks"}, "accepts": []}),
            )
            .unwrap(),
            paid_units: 0,
            response: Response {
                status: http::StatusCode::OK,
                headers: Default::default(),
                body: body.to_vec().into(),
            },
            body: OnceLock::new(),
            settlement: None,
            receipt: None,
            payer: String::new(),
        };
        let id = |body: &[u8]| answer_task_id(&outcome(body)).map(|c| c.into_owned());
        let answer = br##"{"status":"completed","result":{"markdown":"# t","n":[1,2]},"task_id":"bafy\u0041x","x":null}"##;
        assert_eq!(id(answer).as_deref(), Some("bafyAx"));
        assert_eq!(id(br#"{"status":"failed"}"#), None);
        assert_eq!(id(b"not json"), None);
        assert_eq!(id(br#"{"task_id":7}"#), None);
        // A repeated key: the last counts, as in the tree.
        assert_eq!(
            id(br#"{"task_id":"a","task_id":"b"}"#).as_deref(),
            Some("b")
        );
    }

    #[test]
    fn inputs_merge_and_refuse_duplicates() {
        let m = build_input(
            &["url=https://example.com/?a=b".into()],
            Some(r#"{"n": 3}"#),
        )
        .unwrap();
        assert_eq!(m["url"], "https://example.com/?a=b");
        assert_eq!(m["n"], 3);
        assert!(build_input(&["url".into()], None).is_err());
        assert!(build_input(&["=x".into()], None).is_err());
        assert!(build_input(&["a=1".into(), "a=2".into()], None).is_err());
        assert!(build_input(&["a=1".into()], Some(r#"{"a": 0}"#)).is_err());
        assert!(build_input(&[], Some("[1]")).is_err());
        assert!(build_input(&[], Some("{")).is_err());
    }

    #[test]
    fn output_text_prints_markdown_as_is() {
        assert_eq!(output_text(&json!({"output": "# Hi"})).unwrap(), "# Hi");
        assert_eq!(
            output_text(&json!({"output": {"a": 1}})).unwrap(),
            "{\n  \"a\": 1\n}"
        );
        assert!(output_text(&json!({})).is_err());
    }
}
