//! The OpenAPI 3.1 document of the gateway, served at `GET /openapi.json`.
//!
//! It documents every route of [`super::ROUTES`], the JSON error shape and its stable
//! codes, and the x402 headers. A test keeps the document's paths and methods equal to the
//! routes the router serves.

use std::collections::BTreeSet;

use serde_json::{Value, json};

/// Stable error codes the gateway answers with.
pub const ERROR_CODES: &[&str] = &[
    "bad_request",
    "payload_too_large",
    "unknown_capability",
    "capability_refused",
    "url_refused",
    "invalid_input",
    "payment_invalid",
    "payment_replayed",
    "payment_insufficient",
    "idempotency_key_reused",
    "idempotency_in_progress",
    "no_workers",
    "quorum_not_reached",
    "task_not_found",
    "faucet_disabled",
    "not_ready",
    "not_found",
    "internal",
];

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn units() -> Value {
    json!({"type": "string", "pattern": "^[0-9]{1,20}$",
           "description": "An integer count of the asset's smallest unit, as a decimal string."})
}

/// The document.
pub fn document() -> Value {
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "d402 gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Paid tasks over x402: POST a task, get 402 with the payment \
                terms, pay with PAYMENT-SIGNATURE (x402 v2) or X-PAYMENT (v1), get the \
                result with a settlement receipt. The price, budget, fanout and quorum are \
                the gateway's own. Every non-2xx answer except the 402 is \
                {\"error\":{\"code\",\"message\"}} with a stable code."
        }
    });
    let mut paths = serde_json::Map::new();
    paths.insert("/v1/tasks".into(), json!({
                "post": {
                    "operationId": "createTask",
                    "summary": "Run a paid task",
                    "parameters": [
                        {"$ref": "#/components/parameters/IdempotencyKey"},
                        {"$ref": "#/components/parameters/PaymentSignature"},
                        {"$ref": "#/components/parameters/XPayment"}
                    ],
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskRequest"}}}
                    },
                    "responses": {
                        "200": {
                            "description": "The task completed and was settled.",
                            "headers": {
                                "PAYMENT-RESPONSE": {"$ref": "#/components/headers/PaymentResponse"},
                                "X-PAYMENT-RESPONSE": {"$ref": "#/components/headers/XPaymentResponse"}
                            },
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskResult"}}}
                        },
                        "400": error_response("bad_request: the body, a header or the capability is malformed."),
                        "402": {
                            "description": "Payment required (no payment, or the payment was refused: payment_invalid, payment_replayed, payment_insufficient in `error`).",
                            "headers": {"PAYMENT-REQUIRED": {"$ref": "#/components/headers/PaymentRequired"}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PaymentRequiredV1"}}}
                        },
                        "403": error_response("capability_refused: the gateway's acceptance policy refuses the capability (commission cap, untrusted namespace, unsigned or missing registration, manifest not accepted, commission on a rail that cannot split); the message names the reason. Nothing is charged."),
                        "404": error_response("unknown_capability: this gateway does not sell it."),
                        "409": error_response("idempotency_in_progress: a request with this Idempotency-Key is still running."),
                        "413": error_response("payload_too_large: the body or input is over the gateway's cap."),
                        "422": error_response("invalid_input, url_refused (the input's url is private, loopback, metadata or otherwise refused), idempotency_key_reused (the key was used with another body)."),
                        "500": error_response("internal"),
                        "503": {
                            "description": "no_workers or quorum_not_reached: the task could not be served; the payment was refunded (`refunded: true`, PAYMENT-RESPONSE of the refund).",
                            "headers": {
                                "PAYMENT-RESPONSE": {"$ref": "#/components/headers/PaymentResponse"},
                                "X-PAYMENT-RESPONSE": {"$ref": "#/components/headers/XPaymentResponse"}
                            },
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RefundedError"}}}
                        }
                    }
                }
            }));
    paths.insert("/v1/tasks/{id}".into(), json!({
                "get": {
                    "operationId": "getTask",
                    "summary": "A task's status, result, claims and receipt",
                    "parameters": [{"name": "id", "in": "path", "required": true,
                                    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}],
                    "responses": {
                        "200": {"description": "The task.",
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskStatus"}}}},
                        "400": error_response("bad_request: not a task id."),
                        "404": error_response("task_not_found")
                    }
                }
            }));
    paths.insert("/v1/capabilities".into(), json!({
                "get": {
                    "operationId": "listCapabilities",
                    "summary": "What this gateway sells, at what price and terms",
                    "responses": {
                        "200": {"description": "Capabilities sold.",
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Capabilities"}}}}
                    }
                }
            }));
    paths.insert("/healthz".into(), json!({
                "get": {
                    "operationId": "healthz",
                    "summary": "The process is up",
                    "responses": {"200": {"description": "Up.", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["status"],
                        "properties": {"status": {"const": "ok"}}}}}}}
                }
            }));
    paths.insert(
        "/readyz".into(),
        json!({
            "get": {
                "operationId": "readyz",
                "summary": "The gateway can sell: network up, a worker known, rail open",
                "responses": {
                    "200": {"description": "Ready.", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["status"],
                        "properties": {"status": {"const": "ready"}}}}}},
                    "503": error_response("not_ready, with the reason.")
                }
            }
        }),
    );
    paths.insert(
        "/metrics".into(),
        json!({
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Text exposition format 0.0.4.",
                    "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}}}
            }
        }),
    );
    paths.insert(
        "/openapi.json".into(),
        json!({
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1.",
                    "content": {"application/json": {"schema": {"type": "object"}}}}}
            }
        }),
    );
    paths.insert("/v1/local/accounts/{address}".into(), json!({
                "get": {
                    "operationId": "localAccount",
                    "summary": "A balance on the embedded local rail (only with --payment local)",
                    "parameters": [{"name": "address", "in": "path", "required": true,
                                    "schema": {"type": "string", "maxLength": 128}}],
                    "responses": {
                        "200": {"description": "The balance.", "content": {"application/json": {"schema": {
                            "type": "object", "required": ["address", "asset", "units"],
                            "properties": {"address": {"type": "string"}, "asset": {"type": "string"},
                                           "units": units()}}}}},
                        "400": error_response("bad_request: not a local-rail address.")
                    }
                }
            }));
    paths.insert("/v1/local/faucet".into(), json!({
                "post": {
                    "operationId": "localFaucet",
                    "summary": "Credit a local-rail account (only with --dev-faucet true)",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["address", "units"], "additionalProperties": false,
                        "properties": {"address": {"type": "string"}, "units": units()}}}}},
                    "responses": {
                        "200": {"description": "The new balance.", "content": {"application/json": {"schema": {
                            "type": "object", "required": ["address", "units"],
                            "properties": {"address": {"type": "string"}, "units": units()}}}}},
                        "400": error_response("bad_request"),
                        "403": error_response("faucet_disabled: the node runs without --dev-faucet.")
                    }
                }
            }));
    doc["paths"] = Value::Object(paths);
    let mut schemas = serde_json::Map::new();
    let parameters = json!({
        "IdempotencyKey": {"name": "Idempotency-Key", "in": "header", "required": false,
            "description": "Same key and body: the stored answer, no second charge. Other body: 422 idempotency_key_reused. While the first runs: 409 idempotency_in_progress. Answers are kept for 24 hours unless the operator set --idempotency-ttl-hours; after that the key is free again.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[\\x21-\\x7e]+$"}},
        "PaymentSignature": {"name": "PAYMENT-SIGNATURE", "in": "header", "required": false,
            "description": "x402 v2 payment payload, base64 JSON.",
            "schema": {"type": "string", "maxLength": 16384}},
        "XPayment": {"name": "X-PAYMENT", "in": "header", "required": false,
            "description": "x402 v1 payment payload, base64 JSON.",
            "schema": {"type": "string", "maxLength": 16384}}
    });
    let headers = json!({
        "PaymentRequired": {"description": "x402 v2 PaymentRequired (x402Version, resource, accepts[] of scheme, network, amount, asset, payTo, maxTimeoutSeconds, extra), base64 JSON.",
            "schema": {"type": "string"}},
        "PaymentResponse": {"description": "x402 v2 settlement response with the signed receipt, base64 JSON (answers to PAYMENT-SIGNATURE).",
            "schema": {"type": "string"}},
        "XPaymentResponse": {"description": "x402 v1 settlement response, base64 JSON (answers to X-PAYMENT).",
            "schema": {"type": "string"}}
    });
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string", "enum": ERROR_CODES},
                               "message": {"type": "string"}}}}
        }),
    );
    schemas.insert(
        "RefundedError".into(),
        json!({
            "allOf": [{"$ref": "#/components/schemas/Error"}, {
                "type": "object", "required": ["refunded"],
                "properties": {"refunded": {"const": true}, "task_id": {"type": "string"},
                               "receipt": {"type": "object"}}}]
        }),
    );
    schemas.insert("TaskRequest".into(), json!({
                    "type": "object", "required": ["capability", "input"], "additionalProperties": false,
                    "properties": {
                        "capability": {"type": "string", "examples": ["web.page_to_markdown@1"]},
                        "input": {"type": "object", "description": "The capability's input; a page capability needs a public http(s) `url`."}
                    }
                }));
    schemas.insert(
        "Amount".into(),
        json!({
            "type": "object", "required": ["asset", "units"],
            "properties": {"asset": {"type": "string"}, "units": units()}
        }),
    );
    schemas.insert(
        "Transfer".into(),
        json!({
            "type": "object", "required": ["role", "to", "units"],
            "properties": {"role": {"enum": ["worker", "creator", "gateway", "refund"]},
                           "to": {"type": "string"}, "units": units()}
        }),
    );
    schemas.insert("Settlement".into(), json!({
                    "type": "object", "required": ["rail", "asset", "price", "transfers"],
                    "properties": {"rail": {"type": "string"}, "asset": {"type": "string"}, "price": units(),
                                   "transfers": {"type": "array", "items": {"$ref": "#/components/schemas/Transfer"}}}
                }));
    schemas.insert(
        "Claim".into(),
        json!({
            "type": "object", "required": ["worker", "claim_cid", "output_cid", "judgement"],
            "properties": {"worker": {"type": "string"}, "claim_cid": {"type": "string"},
                           "output_cid": {"type": "string"},
                           "judgement": {"enum": ["accepted", "rejected", "pending"]}}
        }),
    );
    schemas.insert("TaskResult".into(), json!({
                    "type": "object",
                    "required": ["task_id", "status", "capability", "manifest_cid", "output", "output_cid", "quorum", "claims", "settlement", "receipt"],
                    "properties": {
                        "task_id": {"type": "string"},
                        "status": {"const": "completed"},
                        "capability": {"type": "string"},
                        "manifest_cid": {"type": "string"},
                        "output": {"description": "The capability's JSON output, or {\"base64\": ...} when it is not JSON."},
                        "output_cid": {"type": "string"},
                        "quorum": {"type": "object", "required": ["fanout", "quorum", "agreeing"],
                                   "properties": {"fanout": {"type": "integer"}, "quorum": {"type": "integer"},
                                                  "agreeing": {"type": "integer"}}},
                        "claims": {"type": "array", "items": {"$ref": "#/components/schemas/Claim"}},
                        "settlement": {"$ref": "#/components/schemas/Settlement"},
                        "receipt": {"type": "object", "description": "The signed SettlementReceipt."}
                    }
                }));
    schemas.insert(
        "TaskStatus".into(),
        json!({
            "type": "object", "required": ["task_id", "status"],
            "properties": {
                "task_id": {"type": "string"},
                "status": {"enum": ["running", "completed", "failed", "refunded"]}
            },
            "additionalProperties": true
        }),
    );
    schemas.insert("Capabilities".into(), json!({
                    "type": "object", "required": ["capabilities"],
                    "properties": {"capabilities": {"type": "array", "items": {
                        "type": "object",
                        "required": ["capability", "manifest_cid", "price", "rail", "network", "fanout", "quorum", "creator_commission_bps", "registration_cid", "namespace", "description"],
                        "properties": {
                            "capability": {"type": "string"}, "manifest_cid": {"type": "string"},
                            "price": {"$ref": "#/components/schemas/Amount"},
                            "rail": {"type": "string"}, "network": {"type": "string"},
                            "fanout": {"type": "integer"}, "quorum": {"type": "integer"},
                            "creator_commission_bps": {"type": "integer", "minimum": 0, "maximum": 10000},
                            "registration_cid": {"type": ["string", "null"]},
                            "namespace": {"type": "string"}, "description": {"type": "string"}
                        }}}}
                }));
    schemas.insert("PaymentRequiredV1".into(), json!({
                    "type": "object", "required": ["x402Version", "accepts"],
                    "properties": {
                        "x402Version": {"const": 1},
                        "error": {"type": "string"},
                        "accepts": {"type": "array", "items": {
                            "type": "object",
                            "required": ["scheme", "network", "maxAmountRequired", "resource", "description", "mimeType", "payTo", "maxTimeoutSeconds", "asset"],
                            "properties": {
                                "scheme": {"type": "string"}, "network": {"type": "string"},
                                "maxAmountRequired": units(), "resource": {"type": "string"},
                                "description": {"type": "string"}, "mimeType": {"type": "string"},
                                "payTo": {"type": "string"}, "maxTimeoutSeconds": {"type": "integer"},
                                "asset": {"type": "string"}, "extra": {"type": "object"}
                            }}}
                    }
                }));
    doc["components"] = json!({
        "parameters": parameters,
        "headers": headers,
        "schemas": Value::Object(schemas),
    });
    doc
}

/// The `(METHOD, path)` pairs the document describes, methods upper-case.
pub fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            if let Some(ops) = item.as_object() {
                for method in ops.keys() {
                    if [
                        "get", "post", "put", "delete", "patch", "head", "options", "trace",
                    ]
                    .contains(&method.as_str())
                    {
                        out.insert((method.to_ascii_uppercase(), path.clone()));
                    }
                }
            }
        }
    }
    out
}

/// Every `$ref` in `doc` that points nowhere in it.
pub fn dangling_refs(doc: &Value) -> Vec<String> {
    fn walk(v: &Value, root: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    let ok = r
                        .strip_prefix('#')
                        .is_some_and(|ptr| root.pointer(ptr).is_some());
                    if !ok {
                        out.push(r.clone());
                    }
                }
                m.values().for_each(|c| walk(c, root, out));
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, root, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(doc, doc, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The routes the router serves (kept equal to `gateway::ROUTES` by the test below
    /// once that constant is in the tree).
    fn routes() -> BTreeSet<(String, String)> {
        super::super::ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect()
    }

    #[test]
    fn documents_exactly_the_routes_served() {
        let doc = document();
        let documented = operations(&doc);
        let served = routes();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routes without documentation: {undocumented:?}; documented paths not routed: {unrouted:?}"
        );
    }

    #[test]
    fn document_is_openapi_3_1_with_errors_and_x402_headers() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(dangling_refs(&doc).is_empty(), "{:?}", dangling_refs(&doc));
        let codes = &doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
            ["enum"];
        for code in [
            "capability_refused",
            "idempotency_key_reused",
            "payment_replayed",
        ] {
            assert!(
                codes.as_array().unwrap().iter().any(|c| c == code),
                "{code}"
            );
        }
        let post = &doc["paths"]["/v1/tasks"]["post"];
        assert!(post["responses"]["402"]["headers"]["PAYMENT-REQUIRED"].is_object());
        assert!(post["responses"]["200"]["headers"]["PAYMENT-RESPONSE"].is_object());
        let params: Vec<_> = post["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["$ref"].as_str())
            .collect();
        assert_eq!(params.len(), 3);
        // Every operation has an id and every answer a description.
        for (method, path) in operations(&doc) {
            let op = &doc["paths"][&path][method.to_ascii_lowercase()];
            assert!(op["operationId"].is_string(), "{method} {path}");
            for (status, r) in op["responses"].as_object().unwrap() {
                assert!(r["description"].is_string(), "{method} {path} {status}");
            }
        }
        // Path parameters are declared.
        for (method, path) in operations(&doc) {
            for name in path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            {
                let op = &doc["paths"][&path][method.to_ascii_lowercase()];
                assert!(
                    op["parameters"].as_array().is_some_and(|ps| ps
                        .iter()
                        .any(|p| p["name"] == name && p["in"] == "path")),
                    "{method} {path}: {name}"
                );
            }
        }
    }

    #[test]
    fn a_missing_route_is_caught() {
        let mut doc = document();
        doc["paths"].as_object_mut().unwrap().remove("/metrics");
        assert!(!operations(&doc).contains(&("GET".into(), "/metrics".into())));
        assert_ne!(operations(&doc), routes());
    }
}
