//! The `GET /v1/capabilities` body: what this gateway sells, at what price and terms.
//!
//! Only offers that pass the acceptance policy are listed (a refused offer is logged at
//! start and refused by name on `POST /v1/tasks`). Money is an integer string of the
//! asset's smallest units.

use serde::Serialize;

use super::policy::GatewayPolicy;

/// A price: asset id and smallest units as a decimal string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Price {
    /// The asset id on the rail, e.g. `local:USDC`.
    pub asset: String,
    /// Smallest units, as a decimal string.
    pub units: String,
}

/// One capability sold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapabilityEntry {
    /// `id@version`.
    pub capability: String,
    /// The exact manifest sold.
    pub manifest_cid: String,
    /// Per task.
    pub price: Price,
    /// The rail paid on.
    pub rail: String,
    /// The rail's CAIP-2 network id (x402 `network`).
    pub network: String,
    /// Workers leased per task.
    pub fanout: u32,
    /// Agreeing claims needed.
    pub quorum: u32,
    /// Creator commission of the accepted registration, in bps.
    pub creator_commission_bps: u16,
    /// The registration the terms come from (`null` without one).
    pub registration_cid: Option<String>,
    /// The capability id's namespace.
    pub namespace: String,
    /// The manifest's description.
    pub description: String,
}

/// The whole body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapabilitiesBody {
    /// Sellable capabilities, by `id@version`.
    pub capabilities: Vec<CapabilityEntry>,
}

/// Builds the body from the policy; `network` is the rail's x402 network id.
pub fn body(policy: &GatewayPolicy, network: &str) -> CapabilitiesBody {
    let capabilities = policy
        .sellable()
        .map(|(offer, terms)| CapabilityEntry {
            capability: terms.capability.to_string(),
            manifest_cid: offer.manifest_cid.to_string(),
            price: Price {
                asset: policy.asset().id.clone(),
                units: policy.price_units().to_string(),
            },
            rail: policy.rail().to_string(),
            network: network.to_string(),
            fanout: policy.fanout(),
            quorum: policy.quorum(),
            creator_commission_bps: terms.creator_commission_bps,
            registration_cid: terms.registration_cid.map(|c| c.to_string()),
            namespace: offer.manifest.namespace().to_string(),
            description: offer.manifest.description.clone(),
        })
        .collect();
    CapabilitiesBody { capabilities }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::policy::{
        GatewaySettings,
        tests::{manifest, offer},
    };
    use d402_protocol::RailKind;
    use d402_settlement::Asset;

    #[test]
    fn lists_sellable_offers_with_server_terms() {
        let mut s = GatewaySettings::new(RailKind::Local, Asset::local_usdc());
        s.price = Some("$0.02".into());
        s.fanout = 3;
        s.quorum = 2;
        s.max_creator_commission_bps = Some(1500);
        let ok = offer(manifest("web.page", true), Some((1000, true)));
        let reg_cid = ok.registration.as_ref().unwrap().cid().unwrap();
        let over_cap = offer(manifest("web.greedy", true), Some((2000, true)));
        let p = GatewayPolicy::new(&s, &[ok.clone(), over_cap]).unwrap();
        let b = body(&p, "d402:local");
        assert_eq!(b.capabilities.len(), 1);
        let json = serde_json::to_value(&b).unwrap();
        let c = &json["capabilities"][0];
        assert_eq!(c["capability"], "web.page@1");
        assert_eq!(c["manifest_cid"], ok.manifest_cid.to_string());
        assert_eq!(
            c["price"],
            serde_json::json!({"asset": "local:USDC", "units": "20000"})
        );
        assert_eq!(c["rail"], "local");
        assert_eq!(c["network"], "d402:local");
        assert_eq!(
            (c["fanout"].as_u64(), c["quorum"].as_u64()),
            (Some(3), Some(2))
        );
        assert_eq!(c["creator_commission_bps"], 1000);
        assert_eq!(c["registration_cid"], reg_cid.to_string());
        assert_eq!(c["namespace"], "web");
        assert_eq!(c["description"], "test web.page");
        // Without a registration: null and 0 bps.
        let p = GatewayPolicy::new(&s, &[offer(manifest("web.page", true), None)]).unwrap();
        let json = serde_json::to_value(body(&p, "d402:local")).unwrap();
        assert_eq!(
            json["capabilities"][0]["registration_cid"],
            serde_json::Value::Null
        );
        assert_eq!(json["capabilities"][0]["creator_commission_bps"], 0);
    }
}
