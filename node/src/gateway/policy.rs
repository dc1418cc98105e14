//! The gateway's server-owned policy, checked before any payment.
//!
//! [`GatewayPolicy`] is built once at start from the node's configuration and the offers it
//! resolved (`--offer`, through the capability store). It owns everything a client can
//! never choose: the price (integer smallest units of the rail's asset, parsed by
//! [`d402_settlement::amount`]), the budget paid to workers, fanout, quorum, the input size
//! cap, the URL policy applied to the input's `url`, and the capability acceptance policy
//! ([`AcceptancePolicy`]: registration required / signed, commission cap, accepted manifest
//! CIDs, trusted namespaces, and a rail that can split a commission).
//!
//! [`GatewayPolicy::admit`] turns a request's capability and input into an [`Admitted`]
//! task (what the paid flow needs) or an [`ApiError`] with a stable code:
//! `unknown_capability` (404), `capability_refused` (403, the message names the
//! acceptance policy's reason and its own code), `invalid_input` (422), `url_refused`
//! (422), `payload_too_large` (413). Nothing here touches money.

use std::collections::{BTreeMap, BTreeSet};

use axum::http::StatusCode;
use serde::Deserialize;

use d402_capabilities::{
    AcceptancePolicy, AcceptedTerms, CapabilityRegistration, InputSchema, Manifest, Refusal,
    commission::BPS_DENOMINATOR,
};
use d402_protocol::{CapabilityRef, Cid, PublicKey, RailKind, messages::MAX_INPUT};
use d402_runtime::policy::{Resolver, UrlPolicy};
use d402_settlement::{Asset, CommissionTerms};

use super::error::ApiError;
use crate::capstore::ResolvedCapability;

/// Largest `POST /v1/tasks` body: the largest input plus room for the envelope.
pub const MAX_REQUEST_BODY: usize = MAX_INPUT + 1024;

/// Default price per task when `--gateway-price` is not given: `$0.01`.
pub const DEFAULT_PRICE: &str = "$0.01";

/// Fields a client may not send: the gateway alone chooses them.
const SERVER_OWNED: &[&str] = &[
    "price",
    "budget",
    "fanout",
    "quorum",
    "deadline",
    "rail",
    "manifest_cid",
];

/// The body of `POST /v1/tasks`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// `id@version`.
    pub capability: String,
    /// The capability's input (a JSON object).
    pub input: serde_json::Value,
}

/// Parses a `POST /v1/tasks` body: size cap first, then JSON with no unknown fields. A
/// server-owned field (`price`, `fanout`, `quorum`, …) is refused by name.
pub fn parse_task_request(body: &[u8]) -> Result<TaskRequest, ApiError> {
    if body.len() > MAX_REQUEST_BODY {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the request body is {} bytes; at most {MAX_REQUEST_BODY}",
                body.len()
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the body is not JSON: {e}"),
        )
    })?;
    if let Some(obj) = value.as_object()
        && let Some(field) = SERVER_OWNED.iter().find(|f| obj.contains_key(**f))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{field:?} is set by the gateway's policy, not by the client"),
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the body must be {{\"capability\":\"id@version\",\"input\":{{...}}}}: {e}"),
        )
    })
}

/// The policy's inputs, from the node's configuration (built by `d402 node` from its flags:
/// `cli::node_cmd::gateway_settings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySettings {
    /// The rail settled on.
    pub rail: RailKind,
    /// The rail's asset (its decimals decide what the price text means).
    pub asset: Asset,
    /// `--gateway-price` as written, e.g. `$0.01`; `None` for [`DEFAULT_PRICE`].
    pub price: Option<String>,
    /// `--gateway-budget` as written; `None` for the whole price.
    pub budget: Option<String>,
    /// Workers leased per task.
    pub fanout: u32,
    /// Agreeing claims needed.
    pub quorum: u32,
    /// Largest canonical input, in bytes (at most the protocol's `MAX_INPUT`).
    pub max_input_bytes: usize,
    /// Accept loopback URLs in inputs (devnets and tests serve pages on loopback).
    pub allow_loopback_urls: bool,
    /// Refuse a capability without a registration.
    pub require_capability_registration: bool,
    /// Refuse an unsigned registration.
    pub require_signed_capability_registration: bool,
    /// Commission cap in bps; `None` for no cap (10000).
    pub max_creator_commission_bps: Option<u16>,
    /// `--trusted-namespace NAMESPACE=PUBLISHER_KEY` pairs; empty trusts any namespace.
    pub trusted_namespaces: Vec<(String, PublicKey)>,
    /// `--accept-manifest-cid`; empty accepts any manifest CID that passes the other checks.
    pub accepted_manifest_cids: Vec<Cid>,
}

impl GatewaySettings {
    /// Settings with the defaults for `rail` and `asset`: default price, budget = price,
    /// fanout 1, quorum 1, no registration required, no cap, public URLs only.
    pub fn new(rail: RailKind, asset: Asset) -> Self {
        GatewaySettings {
            rail,
            asset,
            price: None,
            budget: None,
            fanout: 1,
            quorum: 1,
            max_input_bytes: MAX_INPUT,
            allow_loopback_urls: false,
            require_capability_registration: false,
            require_signed_capability_registration: false,
            max_creator_commission_bps: None,
            trusted_namespaces: Vec::new(),
            accepted_manifest_cids: Vec::new(),
        }
    }
}

/// Why the policy cannot be built; named after the flag at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A setting is invalid.
    #[error("{flag}: {reason}")]
    Invalid {
        /// The flag, e.g. `--gateway-price`.
        flag: &'static str,
        /// Why.
        reason: String,
    },
    /// Two offers resolve to the same `id@version`.
    #[error("--offer {0} is given twice")]
    DuplicateOffer(CapabilityRef),
    /// An offer's input schema cannot be enforced (see `d402_capabilities::schema`).
    #[error("--offer {capability}: {reason}")]
    InputSchema {
        /// The offer.
        capability: CapabilityRef,
        /// Why its schema does not compile.
        reason: String,
    },
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        flag,
        reason: reason.into(),
    }
}

/// One capability the gateway offers, with the acceptance policy's verdict on it.
#[derive(Debug, Clone)]
pub struct Offer {
    /// The manifest (validated by the capability store).
    pub manifest: Manifest,
    /// Its exact CID.
    pub manifest_cid: Cid,
    /// Its registration, if any.
    pub registration: Option<CapabilityRegistration>,
    /// The terms it is sold under, or why it is refused.
    pub verdict: Result<AcceptedTerms, Refusal>,
    /// Its compiled `input_schema`, checked on every request before payment.
    pub input_checks: InputSchema,
}

/// A request the policy admitted: everything the paid flow needs, all chosen by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    /// `id@version`.
    pub capability: CapabilityRef,
    /// The exact manifest sold.
    pub manifest: Manifest,
    /// Its CID: workers are leased for exactly this manifest.
    pub manifest_cid: Cid,
    /// The accepted terms (commission, creator wallet, publisher).
    pub terms: AcceptedTerms,
    /// The commission a capture applies (from the signed registration).
    pub commission: CommissionTerms,
    /// The registration the terms come from, if any.
    pub registration_cid: Option<Cid>,
    /// The rail.
    pub rail: RailKind,
    /// The rail's asset.
    pub asset: Asset,
    /// What the client pays, in smallest units.
    pub price_units: u64,
    /// Most paid to all workers together, in smallest units (at most the price).
    pub budget_units: u64,
    /// Workers leased.
    pub fanout: u32,
    /// Agreeing claims needed.
    pub quorum: u32,
    /// The input as canonical JSON bytes (keys sorted, no whitespace): the task's input.
    pub input: Vec<u8>,
    /// The input's `url`, checked against the URL policy (without DNS; see
    /// [`GatewayPolicy::admit_resolved`]).
    pub url: Option<String>,
}

/// The server-owned policy.
#[derive(Debug, Clone)]
pub struct GatewayPolicy {
    rail: RailKind,
    asset: Asset,
    price_units: u64,
    budget_units: u64,
    fanout: u32,
    quorum: u32,
    max_input_bytes: usize,
    url_policy: UrlPolicy,
    acceptance: AcceptancePolicy,
    offers: BTreeMap<CapabilityRef, Offer>,
}

impl GatewayPolicy {
    /// Builds the policy from `settings` and the offers the node resolved. Every offer is
    /// checked against the acceptance policy now; a refused one stays listed with its
    /// reason so that a request for it is refused (before payment) by name.
    pub fn new(
        settings: &GatewaySettings,
        offers: &[ResolvedCapability],
    ) -> Result<GatewayPolicy, PolicyError> {
        let asset = settings.asset.clone();
        asset
            .validate()
            .map_err(|e| invalid("--payment", format!("asset {}: {e}", asset.id)))?;
        let price_units = asset
            .parse(settings.price.as_deref().unwrap_or(DEFAULT_PRICE))
            .map_err(|e| invalid("--gateway-price", e.to_string()))?;
        if price_units == 0 {
            return Err(invalid("--gateway-price", "the price must be above 0"));
        }
        let budget_units = match &settings.budget {
            Some(b) => asset
                .parse(b)
                .map_err(|e| invalid("--gateway-budget", e.to_string()))?,
            None => price_units,
        };
        if budget_units == 0 {
            return Err(invalid("--gateway-budget", "the budget must be above 0"));
        }
        if budget_units > price_units {
            return Err(invalid(
                "--gateway-budget",
                format!(
                    "{} is more than the price {}: the gateway would pay workers more than it \
                     charges",
                    asset.format(budget_units),
                    asset.format(price_units)
                ),
            ));
        }
        if settings.fanout == 0 || settings.fanout > crate::config::MAX_FANOUT {
            return Err(invalid(
                "--fanout",
                format!(
                    "{} must be 1 to {}",
                    settings.fanout,
                    crate::config::MAX_FANOUT
                ),
            ));
        }
        if settings.quorum == 0 || settings.quorum > settings.fanout {
            return Err(invalid(
                "--quorum",
                format!(
                    "{} must be 1 to --fanout ({})",
                    settings.quorum, settings.fanout
                ),
            ));
        }
        if settings.max_input_bytes == 0 || settings.max_input_bytes > MAX_INPUT {
            return Err(invalid(
                "max input size",
                format!("must be 1 to {MAX_INPUT} bytes"),
            ));
        }
        let mut trusted: Option<BTreeMap<String, BTreeSet<PublicKey>>> = None;
        for (ns, key) in &settings.trusted_namespaces {
            trusted
                .get_or_insert_with(BTreeMap::new)
                .entry(ns.clone())
                .or_default()
                .insert(*key);
        }
        let acceptance = AcceptancePolicy {
            accepted_manifest_cids: (!settings.accepted_manifest_cids.is_empty())
                .then(|| settings.accepted_manifest_cids.iter().copied().collect()),
            trusted_namespaces: trusted,
            require_capability_registration: settings.require_capability_registration,
            require_signed_capability_registration: settings.require_signed_capability_registration,
            max_creator_commission_bps: settings
                .max_creator_commission_bps
                .unwrap_or(BPS_DENOMINATOR),
            rail: settings.rail,
        };
        acceptance.validate().map_err(|e| {
            let flag = if e.to_string().starts_with("trusted_namespaces") {
                "--trusted-namespace"
            } else {
                "--max-creator-commission-bps"
            };
            invalid(flag, e.to_string())
        })?;
        let url_policy = if settings.allow_loopback_urls {
            UrlPolicy::allow_loopback_for_tests()
        } else {
            UrlPolicy::new()
        };
        let mut map = BTreeMap::new();
        for o in offers {
            let verdict = acceptance.check(&o.manifest, o.registration.as_ref());
            if let Err(r) = &verdict {
                tracing::warn!(
                    capability = %o.capability,
                    manifest_cid = %o.manifest_cid,
                    code = r.code(),
                    "offered capability refused by the gateway's acceptance policy: {r}"
                );
            }
            let input_checks = o
                .manifest
                .input_checks()
                .map_err(|e| PolicyError::InputSchema {
                    capability: o.capability.clone(),
                    reason: e.to_string(),
                })?;
            let offer = Offer {
                input_checks,
                manifest: o.manifest.clone(),
                manifest_cid: o.manifest_cid,
                registration: o.registration.clone(),
                verdict,
            };
            if map.insert(o.capability.clone(), offer).is_some() {
                return Err(PolicyError::DuplicateOffer(o.capability.clone()));
            }
        }
        Ok(GatewayPolicy {
            rail: settings.rail,
            asset,
            price_units,
            budget_units,
            fanout: settings.fanout,
            quorum: settings.quorum,
            max_input_bytes: settings.max_input_bytes,
            url_policy,
            acceptance,
            offers: map,
        })
    }

    /// The rail.
    pub fn rail(&self) -> RailKind {
        self.rail
    }
    /// The rail's asset.
    pub fn asset(&self) -> &Asset {
        &self.asset
    }
    /// Price per task in smallest units.
    pub fn price_units(&self) -> u64 {
        self.price_units
    }
    /// Budget per task in smallest units.
    pub fn budget_units(&self) -> u64 {
        self.budget_units
    }
    /// Workers leased per task.
    pub fn fanout(&self) -> u32 {
        self.fanout
    }
    /// Agreeing claims needed.
    pub fn quorum(&self) -> u32 {
        self.quorum
    }
    /// Largest canonical input.
    pub fn max_input_bytes(&self) -> usize {
        self.max_input_bytes
    }
    /// The URL policy applied to inputs.
    pub fn url_policy(&self) -> &UrlPolicy {
        &self.url_policy
    }
    /// The capability acceptance policy.
    pub fn acceptance(&self) -> &AcceptancePolicy {
        &self.acceptance
    }
    /// Every offer with its verdict, by `id@version`.
    pub fn offers(&self) -> &BTreeMap<CapabilityRef, Offer> {
        &self.offers
    }
    /// The offers that pass the acceptance policy (what `GET /v1/capabilities` lists).
    pub fn sellable(&self) -> impl Iterator<Item = (&Offer, &AcceptedTerms)> {
        self.offers
            .values()
            .filter_map(|o| o.verdict.as_ref().ok().map(|t| (o, t)))
    }

    /// Admits a request for `capability` with `input`, or refuses it with a stable code.
    /// Checks, in order: the capability is offered, the acceptance policy accepted it, the
    /// input is a JSON object within the size cap that satisfies the manifest's
    /// `input_schema`, and its `url` (required when the manifest takes a snapshot) passes
    /// the URL policy without DNS.
    pub fn admit(&self, capability: &str, input: &serde_json::Value) -> Result<Admitted, ApiError> {
        let cap: CapabilityRef = capability.parse().map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("capability: {e}"),
            )
        })?;
        let offer = self.offers.get(&cap).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_capability",
                format!(
                    "this gateway does not sell {cap}; GET /v1/capabilities lists what it sells"
                ),
            )
        })?;
        let terms = match &offer.verdict {
            Ok(t) => t.clone(),
            Err(r) => return Err(refused(&cap, r)),
        };
        let obj = input.as_object().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                "input must be a JSON object",
            )
        })?;
        // serde_json's map is ordered by key, so this is the canonical (sorted, compact) form.
        let bytes = serde_json::to_vec(input).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                e.to_string(),
            )
        })?;
        if bytes.len() > self.max_input_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the input is {} bytes; this gateway accepts at most {}",
                    bytes.len(),
                    self.max_input_bytes
                ),
            ));
        }
        if let Err(violations) = offer.input_checks.check(input) {
            let listed: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                format!(
                    "the input does not match {cap}'s input schema: {}",
                    listed.join("; ")
                ),
            ));
        }
        let takes_snapshot = !offer.manifest.permissions.snapshotters.is_empty();
        let url = match obj.get("url") {
            Some(serde_json::Value::String(u)) => {
                self.url_policy.parse(u).map_err(|e| url_refused(u, &e))?;
                Some(u.clone())
            }
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_input",
                    "input.url must be a string",
                ));
            }
            None if takes_snapshot => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_input",
                    format!("{cap} takes a snapshot of a page: the input needs a \"url\" string"),
                ));
            }
            None => None,
        };
        Ok(Admitted {
            capability: cap,
            manifest: offer.manifest.clone(),
            manifest_cid: offer.manifest_cid,
            commission: CommissionTerms::from(&terms),
            registration_cid: terms.registration_cid,
            terms,
            rail: self.rail,
            asset: self.asset.clone(),
            price_units: self.price_units,
            budget_units: self.budget_units,
            fanout: self.fanout,
            quorum: self.quorum,
            input: bytes,
            url,
        })
    }

    /// [`Self::admit`], then resolves the input's `url` and checks every address it
    /// resolves to (so a name pointing at a private, loopback or metadata address is
    /// refused before payment; the worker checks again when it connects).
    pub async fn admit_resolved(
        &self,
        capability: &str,
        input: &serde_json::Value,
        resolver: &dyn Resolver,
    ) -> Result<Admitted, ApiError> {
        let admitted = self.admit(capability, input)?;
        if let Some(u) = &admitted.url {
            self.url_policy
                .resolve(u, resolver)
                .await
                .map_err(|e| url_refused(u, &e))?;
        }
        Ok(admitted)
    }
}

fn refused(cap: &CapabilityRef, r: &Refusal) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "capability_refused",
        format!(
            "{cap} is refused by this gateway's policy ({}): {r}",
            r.code()
        ),
    )
}

fn url_refused(url: &str, e: &d402_runtime::policy::PolicyError) -> ApiError {
    let shown: String = url.chars().take(200).collect();
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "url_refused",
        format!("input.url {shown:?} is refused: {e}"),
    )
}

/// Parses `--trusted-namespace NAMESPACE=PUBLISHER_KEY` (the key in base58).
pub fn parse_trusted_namespace(text: &str) -> Result<(String, PublicKey), String> {
    crate::config::parse_trusted_namespace(text)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::capstore::Source;
    use d402_capabilities::{
        Registration,
        manifest::{EMPTY_WASM_MODULE, SnapshotterKind},
    };
    use d402_protocol::{Chain, SigningKey, Wallets};
    use serde_json::json;

    pub(crate) fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    pub(crate) fn pk(n: u8) -> PublicKey {
        PublicKey::from(key(n).verifying_key())
    }

    pub(crate) fn local_wallet(n: u8) -> String {
        pk(n).to_string()
    }

    /// A valid manifest `id@1` that snapshots a page when `snapshot`.
    pub(crate) fn manifest(id: &str, snapshot: bool) -> Manifest {
        let snapshotters = if snapshot {
            vec![SnapshotterKind::Fetch]
        } else {
            Vec::new()
        };
        let mut m = Manifest::template(id, 1, Cid::raw(EMPTY_WASM_MODULE), snapshotters).unwrap();
        m.description = format!("test {id}");
        if snapshot {
            // The tests' inputs carry a second field, to check their canonical key order.
            m.input_schema["properties"]["b"] = json!({"type": "integer"});
        }
        m
    }

    /// An offer of `m` with a registration of `bps` (signed by key 1 when `signed`), or none.
    pub(crate) fn offer(m: Manifest, reg: Option<(u16, bool)>) -> ResolvedCapability {
        let registration = reg.map(|(bps, signed)| {
            let wallets: Wallets = if bps > 0 {
                [
                    (Chain::Local, local_wallet(9)),
                    (Chain::Solana, pk(9).to_string()),
                ]
                .into_iter()
                .collect()
            } else {
                Wallets::new()
            };
            let body = Registration::for_manifest(&m, bps, wallets, None, 1).unwrap();
            if signed {
                CapabilityRegistration::sign(body, &key(1)).unwrap()
            } else {
                CapabilityRegistration::unsigned(body).unwrap()
            }
        });
        ResolvedCapability {
            capability: m.capability(),
            manifest_cid: m.cid().unwrap(),
            manifest: m,
            registration,
            wasm: EMPTY_WASM_MODULE.to_vec(),
            wasm_path: None,
            source: Source::Store,
        }
    }

    fn settings() -> GatewaySettings {
        GatewaySettings::new(RailKind::Local, Asset::local_usdc())
    }

    fn input() -> serde_json::Value {
        json!({"url": "https://example.com/page", "b": 1})
    }

    #[test]
    fn admits_with_server_owned_terms() {
        let m = manifest("web.page", true);
        let cid = m.cid().unwrap();
        let mut s = settings();
        s.price = Some("$0.01".into());
        s.budget = Some("0.006".into());
        s.fanout = 3;
        s.quorum = 2;
        s.require_capability_registration = true;
        s.require_signed_capability_registration = true;
        s.max_creator_commission_bps = Some(2000);
        s.trusted_namespaces = vec![("web".into(), pk(1))];
        s.accepted_manifest_cids = vec![cid];
        let o = offer(m, Some((1000, true)));
        let reg_cid = o.registration.as_ref().unwrap().cid().unwrap();
        let p = GatewayPolicy::new(&s, &[o]).unwrap();
        let a = p.admit("web.page@1", &input()).unwrap();
        assert_eq!(a.price_units, 10_000);
        assert_eq!(a.budget_units, 6_000);
        assert_eq!((a.fanout, a.quorum), (3, 2));
        assert_eq!(a.manifest_cid, cid);
        assert_eq!(a.registration_cid, Some(reg_cid));
        assert_eq!(a.commission.bps, 1000);
        assert_eq!(a.commission.registration_cid, Some(reg_cid));
        assert_eq!(
            a.commission.creator_wallet.as_deref(),
            Some(local_wallet(9).as_str())
        );
        assert_eq!(a.terms.publisher, Some(pk(1)));
        // Canonical input: keys sorted, no whitespace.
        assert_eq!(
            a.input,
            br#"{"b":1,"url":"https://example.com/page"}"#.to_vec()
        );
        assert_eq!(a.url.as_deref(), Some("https://example.com/page"));
        assert_eq!(p.sellable().count(), 1);
    }

    #[test]
    fn refuses_commission_above_cap_untrusted_namespace_and_unsigned() {
        let m = manifest("web.page", true);
        let mut s = settings();
        s.max_creator_commission_bps = Some(500);
        let p = GatewayPolicy::new(&s, &[offer(m.clone(), Some((1000, true)))]).unwrap();
        let e = p.admit("web.page@1", &input()).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::FORBIDDEN, "capability_refused")
        );
        assert!(e.message.contains("commission_above_cap"), "{e}");
        assert!(e.message.contains("1000 bps"), "{e}");
        assert_eq!(p.sellable().count(), 0);

        let mut s = settings();
        s.trusted_namespaces = vec![("acme".into(), pk(1))];
        let p = GatewayPolicy::new(&s, &[offer(m.clone(), Some((0, true)))]).unwrap();
        let e = p.admit("web.page@1", &input()).unwrap_err();
        assert_eq!(e.code, "capability_refused");
        assert!(e.message.contains("untrusted_namespace"), "{e}");
        assert!(e.message.contains("\"web\""), "{e}");

        let mut s = settings();
        s.require_signed_capability_registration = true;
        let p = GatewayPolicy::new(&s, &[offer(m.clone(), Some((1000, false)))]).unwrap();
        let e = p.admit("web.page@1", &input()).unwrap_err();
        assert!(e.message.contains("registration_unsigned"), "{e}");
        // The same unsigned registration is fine when signatures are not required.
        let p = GatewayPolicy::new(&settings(), &[offer(m.clone(), Some((1000, false)))]).unwrap();
        assert_eq!(
            p.admit("web.page@1", &input()).unwrap().commission.bps,
            1000
        );

        let mut s = settings();
        s.require_capability_registration = true;
        let p = GatewayPolicy::new(&s, &[offer(m.clone(), None)]).unwrap();
        let e = p.admit("web.page@1", &input()).unwrap_err();
        assert!(e.message.contains("registration_missing"), "{e}");

        let mut s = settings();
        s.accepted_manifest_cids = vec![Cid::dag_cbor(b"another manifest")];
        let p = GatewayPolicy::new(&s, &[offer(m, Some((0, true)))]).unwrap();
        let e = p.admit("web.page@1", &input()).unwrap_err();
        assert!(e.message.contains("unknown_manifest_cid"), "{e}");
    }

    #[test]
    fn refuses_commission_on_a_rail_that_cannot_split() {
        let m = manifest("web.page", true);
        let s = GatewaySettings::new(RailKind::SolanaDirect, Asset::local_usdc());
        let p = GatewayPolicy::new(&s, &[offer(m.clone(), Some((1000, true)))]).unwrap();
        let e = p.admit("web.page@1", &input()).unwrap_err();
        assert_eq!(e.code, "capability_refused");
        assert!(e.message.contains("rail_cannot_split_commission"), "{e}");
        // Zero commission is sellable there.
        let p = GatewayPolicy::new(&s, &[offer(m, Some((0, true)))]).unwrap();
        assert_eq!(p.admit("web.page@1", &input()).unwrap().commission.bps, 0);
    }

    #[test]
    fn refuses_unknown_capability_bad_input_and_urls() {
        let p = GatewayPolicy::new(
            &settings(),
            &[
                offer(manifest("web.page", true), None),
                offer(manifest("text.upper", false), None),
            ],
        )
        .unwrap();
        let e = p.admit("web.other@1", &input()).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, "unknown_capability")
        );
        let e = p.admit("web.page@2", &input()).unwrap_err();
        assert_eq!(e.code, "unknown_capability");
        let e = p.admit("not a capability", &input()).unwrap_err();
        assert_eq!(e.code, "bad_request");
        let e = p.admit("web.page@1", &json!([1])).unwrap_err();
        assert_eq!(e.code, "invalid_input");
        let e = p.admit("web.page@1", &json!({"text": "x"})).unwrap_err();
        assert_eq!(e.code, "invalid_input");
        assert!(e.message.contains("url"), "{e}");
        let e = p.admit("web.page@1", &json!({"url": 5})).unwrap_err();
        assert_eq!(e.code, "invalid_input");
        // No url needed when the capability takes no snapshot.
        p.admit("text.upper@1", &json!({"text": "x"})).unwrap();
        // The manifest's input schema is enforced, each violation named by its place.
        let mut m = manifest("math.double", false);
        m.input_schema = json!({
            "type": "object",
            "properties": {"n": {"type": "integer", "maximum": 100}},
            "required": ["n"],
            "additionalProperties": false
        });
        let schema = GatewayPolicy::new(&settings(), &[offer(m, None)]).unwrap();
        schema.admit("math.double@1", &json!({"n": 7})).unwrap();
        for (bad, why) in [
            (json!({}), "input: the property \"n\" is required"),
            (json!({"n": "7"}), "/n: must be of type integer, not string"),
            (json!({"n": 101}), "/n: must be at most 100"),
            (json!({"n": 1, "m": 2}), "/m: is not an allowed property"),
        ] {
            let e = schema.admit("math.double@1", &bad).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input")
            );
            assert!(e.message.contains(why), "{bad}: {e}");
        }
        for bad in [
            "http://127.0.0.1:8080/",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://2130706433/",
            "file:///etc/passwd",
            "http://user:pw@example.com/",
        ] {
            let e = p.admit("web.page@1", &json!({"url": bad})).unwrap_err();
            assert_eq!(e.code, "url_refused", "{bad}: {e}");
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        }
        // A url is checked even where no snapshot is taken.
        let e = p
            .admit("text.upper@1", &json!({"url": "http://192.168.1.1/"}))
            .unwrap_err();
        assert_eq!(e.code, "url_refused");
        // The operator may opt in to loopback (devnet); private stays refused.
        let mut s = settings();
        s.allow_loopback_urls = true;
        let p = GatewayPolicy::new(&s, &[offer(manifest("web.page", true), None)]).unwrap();
        p.admit("web.page@1", &json!({"url": "http://127.0.0.1:8080/"}))
            .unwrap();
        let e = p
            .admit("web.page@1", &json!({"url": "http://10.1.2.3/"}))
            .unwrap_err();
        assert_eq!(e.code, "url_refused");
    }

    #[test]
    fn input_size_is_capped() {
        let mut s = settings();
        s.max_input_bytes = 100;
        let p = GatewayPolicy::new(&s, &[offer(manifest("text.upper", false), None)]).unwrap();
        p.admit("text.upper@1", &json!({"text": "x".repeat(50)}))
            .unwrap();
        let e = p
            .admit("text.upper@1", &json!({"text": "x".repeat(100)}))
            .unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        );
    }

    struct FixedResolver(Vec<std::net::IpAddr>);
    impl Resolver for FixedResolver {
        fn lookup(
            &self,
            _host: &str,
            port: u16,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = std::io::Result<Vec<std::net::SocketAddr>>>
                    + Send
                    + '_,
            >,
        > {
            let addrs = self
                .0
                .iter()
                .map(|ip| std::net::SocketAddr::new(*ip, port))
                .collect();
            Box::pin(async move { Ok(addrs) })
        }
    }

    #[tokio::test]
    async fn names_are_checked_after_dns() {
        let p =
            GatewayPolicy::new(&settings(), &[offer(manifest("web.page", true), None)]).unwrap();
        let url = json!({"url": "http://metadata.example/"});
        let metadata = FixedResolver(vec!["169.254.169.254".parse().unwrap()]);
        let e = p
            .admit_resolved("web.page@1", &url, &metadata)
            .await
            .unwrap_err();
        assert_eq!(e.code, "url_refused");
        assert!(e.message.contains("169.254.169.254"), "{e}");
        let public = FixedResolver(vec!["93.184.216.34".parse().unwrap()]);
        p.admit_resolved("web.page@1", &url, &public).await.unwrap();
    }

    #[test]
    fn settings_are_checked() {
        let o = [offer(manifest("web.page", true), None)];
        type Edit = fn(&mut GatewaySettings);
        let cases: &[(Edit, &str)] = &[
            (|s| s.price = Some("0.0000001".into()), "--gateway-price"),
            (|s| s.price = Some("1e-2".into()), "--gateway-price"),
            (|s| s.price = Some("0".into()), "--gateway-price"),
            (|s| s.budget = Some("$0.02".into()), "--gateway-budget"),
            (|s| s.budget = Some("0".into()), "--gateway-budget"),
            (|s| s.fanout = 0, "--fanout"),
            (|s| s.quorum = 2, "--quorum"),
            (
                |s| s.max_creator_commission_bps = Some(10_001),
                "--max-creator-commission-bps",
            ),
        ];
        for (edit, flag) in cases {
            let mut s = settings();
            edit(&mut s);
            let e = GatewayPolicy::new(&s, &o).unwrap_err();
            assert!(e.to_string().starts_with(flag), "{e}");
        }
        // Default price, budget = price.
        let p = GatewayPolicy::new(&settings(), &o).unwrap();
        assert_eq!((p.price_units(), p.budget_units()), (10_000, 10_000));
        let e = GatewayPolicy::new(&settings(), &[o[0].clone(), o[0].clone()]).unwrap_err();
        assert!(matches!(e, PolicyError::DuplicateOffer(_)));
    }

    #[test]
    fn request_bodies_are_parsed_strictly() {
        let r = parse_task_request(br#"{"capability":"a.b@1","input":{"url":"x"}}"#).unwrap();
        assert_eq!(r.capability, "a.b@1");
        for (body, code) in [
            (&b"not json"[..], "bad_request"),
            (br#"{"capability":"a.b@1"}"#, "bad_request"),
            (
                br#"{"capability":"a.b@1","input":{},"fanout":9}"#,
                "bad_request",
            ),
            (
                br#"{"capability":"a.b@1","input":{},"price":"0"}"#,
                "bad_request",
            ),
            (
                br#"{"capability":"a.b@1","input":{},"extra":1}"#,
                "bad_request",
            ),
        ] {
            let e = parse_task_request(body).unwrap_err();
            assert_eq!(e.code, code, "{}", String::from_utf8_lossy(body));
        }
        let e = parse_task_request(br#"{"capability":"a.b@1","input":{},"quorum":1}"#).unwrap_err();
        assert!(e.message.contains("quorum"), "{e}");
        let big = vec![b' '; MAX_REQUEST_BODY + 1];
        assert_eq!(
            parse_task_request(&big).unwrap_err().code,
            "payload_too_large"
        );
    }

    #[test]
    fn trusted_namespace_flag_parses() {
        let (ns, k) = parse_trusted_namespace(&format!("web={}", pk(1))).unwrap();
        assert_eq!((ns.as_str(), k), ("web", pk(1)));
        assert!(parse_trusted_namespace("web").is_err());
        assert!(parse_trusted_namespace("Web=abc").is_err());
        assert!(parse_trusted_namespace("web=notakey").is_err());
    }
}
