//! `/openapi.json` against the server's real answers: every operation
//! declares a success body and the shared error body on its error
//! statuses, and what a representative set of real requests gets back
//! validates against the schema the document declares for that status.
//! A handler whose output drifts from its declared schema fails here.

mod common;

use std::collections::BTreeSet;

use annals_server::{Role, ServerConfig};
use common::{TestServer, event, open_config, start, within};
use reqwest::Method;
use serde_json::{Value, json};

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];
const ERROR_REF: &str = "#/components/schemas/ErrorOut";

/// The document, with every object schema that lists its properties
/// closed (`additionalProperties: false`), so an undocumented field in a
/// real answer fails validation too.
struct Contract {
    doc: Value,
    components: Value,
}

impl Contract {
    async fn fetch(s: &TestServer) -> Self {
        let (status, doc) = s.get("/openapi.json").await;
        assert_eq!(status, 200);
        let mut components = doc["components"].clone();
        close_objects(&mut components["schemas"]);
        Contract { doc, components }
    }

    fn operations(&self) -> Vec<(String, String, &Value)> {
        let mut out = Vec::new();
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for method in METHODS {
                if let Some(op) = item.get(method) {
                    out.push((path.clone(), method.to_owned(), op));
                }
            }
        }
        out
    }

    /// The declared JSON schema of `status` on `method path`.
    fn schema(&self, method: &str, path: &str, status: u16) -> Value {
        let response = &self.doc["paths"][path][method]["responses"][status.to_string()];
        assert!(response.is_object(), "{method} {path} declares no {status} response");
        let schema = &response["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "{method} {path} {status} declares no JSON schema: {response}");
        schema.clone()
    }

    /// Validates a real answer against the declared schema (a 204 must be
    /// declared without a body and come without one).
    fn check(&self, method: &str, path: &str, status: u16, body: &Value) {
        if status == 204 {
            let response = &self.doc["paths"][path][method]["responses"]["204"];
            assert!(response.is_object(), "{method} {path} declares no 204 response");
            assert!(response.get("content").is_none(), "{method} {path} 204 declares a body");
            assert_eq!(body, &Value::Null, "{method} {path} 204 sent a body");
            return;
        }
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self.components,
            "allOf": [self.schema(method, path, status)],
        });
        let validator = jsonschema::validator_for(&root).expect("the declared schema compiles");
        let errors: Vec<String> =
            validator.iter_errors(body).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        assert!(
            errors.is_empty(),
            "{method} {path} {status}: body does not match its schema: {errors:?}\nbody: {body}"
        );
    }
}

/// Sets `additionalProperties: false` on every object schema with
/// `properties` and no `additionalProperties` of its own.
fn close_objects(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

fn refs(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                out.insert(r.clone());
            }
            map.values().for_each(|x| refs(x, out));
        }
        Value::Array(items) => items.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn every_operation_declares_its_bodies_and_the_shared_error() {
    within(60, async {
        let s = start(open_config()).await;
        let contract = Contract::fetch(&s).await;
        let ops = contract.operations();
        assert!(ops.len() >= 30, "only {} operations documented", ops.len());
        for (path, method, op) in &ops {
            let responses = op["responses"].as_object().expect("responses");
            let successes: Vec<&String> =
                responses.keys().filter(|k| k.starts_with('2') || k.as_str() == "101").collect();
            assert!(!successes.is_empty(), "{method} {path} has no success response");
            for status in successes {
                if status == "204" || status == "101" {
                    continue; // no body by definition
                }
                let content = responses[status]["content"].as_object();
                let has_schema = content.is_some_and(|c| c.values().any(|m| m["schema"].is_object()));
                assert!(has_schema, "{method} {path} {status} has no body schema");
            }
            let errors: Vec<&String> =
                responses.keys().filter(|k| k.starts_with('4') || k.starts_with('5')).collect();
            for status in errors {
                let schema = &responses[status]["content"]["application/json"]["schema"];
                assert_eq!(schema["$ref"], ERROR_REF, "{method} {path} {status} lacks the error schema");
            }
            // Errors the layers produce, wherever they apply.
            let public = ["/health/live", "/health/ready", "/info"].contains(&path.as_str());
            if !public {
                for status in ["401", "429"] {
                    assert!(responses.contains_key(status), "{method} {path} lacks {status}");
                }
            }
            if op.get("requestBody").is_some() {
                for status in ["400", "413"] {
                    assert!(responses.contains_key(status), "{method} {path} lacks {status}");
                }
            }
        }
        // Every reference resolves.
        let mut all = BTreeSet::new();
        refs(&contract.doc, &mut all);
        for r in all {
            let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("foreign $ref {r}"));
            assert!(contract.doc["components"]["schemas"].get(name).is_some(), "{r} does not resolve");
        }
        s.stop().await;
    })
    .await;
}

/// One request: (status, JSON body or `Null`).
async fn call(s: &TestServer, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = s.client.request(method, s.url(path));
    if let Some(b) = body {
        request = request.json(&b);
    }
    let resp = request.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn real_answers_match_their_declared_schemas() {
    within(60, async {
        let s = start(open_config()).await;
        let c = Contract::fetch(&s).await;
        let check = |method: &str, path: &str, got: (u16, Value), want: u16| {
            assert_eq!(got.0, want, "{method} {path}: {}", got.1);
            c.check(method, path, got.0, &got.1);
        };
        let stream = "/streams/{stream}";

        // Appends: written, idempotent, conflict, bad input, wrong media type.
        let first = json!([{ "type": "Opened", "data": { "owner": "Ada" }, "metadata": { "actor": "t" } },
                           { "type": "Blob", "content_type": "application/octet-stream", "data": "AAEC" }]);
        check(
            "post",
            stream,
            call(&s, Method::POST, "/streams/acct-1?expected=no_stream", Some(first)).await,
            201,
        );
        let again = json!([event("Deposited", json!(5))]);
        check(
            "post",
            stream,
            call(&s, Method::POST, "/streams/acct-1?expected=no_stream", Some(again)).await,
            409,
        );
        check(
            "post",
            stream,
            call(&s, Method::POST, "/streams/acct-1?expected=soon", Some(json!([]))).await,
            400,
        );
        let bare = s.client.post(s.url("/streams/acct-1")).body("[]").send().await.unwrap();
        let status = bare.status().as_u16();
        check("post", stream, (status, bare.json().await.unwrap()), 415);
        check(
            "post",
            stream,
            call(&s, Method::POST, "/streams/acct-1", Some(json!([event("Deposited", json!([1, 2]))]))).await,
            201,
        );

        // Reads: a stream (paged, so `next` and its link are set), $all,
        // a missing stream, info of a written and of an unknown stream.
        check("get", stream, call(&s, Method::GET, "/streams/acct-1?limit=2", None).await, 200);
        check("get", stream, call(&s, Method::GET, "/streams/acct-1?direction=backward", None).await, 200);
        check("get", stream, call(&s, Method::GET, "/streams/nobody-1", None).await, 404);
        check("get", "/all", call(&s, Method::GET, "/all?limit=1", None).await, 200);
        check("get", "/all", call(&s, Method::GET, "/all?direction=backward&type=Opened", None).await, 200);
        check("get", "/all", call(&s, Method::GET, "/all?after=yesterday", None).await, 400);
        check(
            "get",
            "/streams/{stream}/info",
            call(&s, Method::GET, "/streams/acct-1/info", None).await,
            200,
        );
        check(
            "get",
            "/streams/{stream}/info",
            call(&s, Method::GET, "/streams/never-1/info", None).await,
            200,
        );
        check("get", "/streams", call(&s, Method::GET, "/streams?limit=1", None).await, 200);

        // A transaction, a conflicting one, a delete and a read after it.
        let tx = json!({ "streams": [
            { "stream": "tx-1", "expected": "no_stream", "events": [event("A", json!({}))] },
            { "stream": "tx-2", "events": [event("B", json!({}))] },
        ]});
        check("post", "/transactions", call(&s, Method::POST, "/transactions", Some(tx.clone())).await, 201);
        check("post", "/transactions", call(&s, Method::POST, "/transactions", Some(tx)).await, 409);
        check("delete", stream, call(&s, Method::DELETE, "/streams/tx-1?expected=0", None).await, 204);
        check("get", stream, call(&s, Method::GET, "/streams/tx-1", None).await, 404);
        check("delete", stream, call(&s, Method::DELETE, "/streams/tx-2?hard=true", None).await, 204);
        check("get", stream, call(&s, Method::GET, "/streams/tx-2", None).await, 410);
        check(
            "post",
            stream,
            call(&s, Method::POST, "/streams/tx-2", Some(json!([event("C", json!({}))]))).await,
            410,
        );

        // Operations.
        check("get", "/stats", call(&s, Method::GET, "/stats", None).await, 200);
        check("get", "/info", call(&s, Method::GET, "/info", None).await, 200);
        check("get", "/health/live", call(&s, Method::GET, "/health/live", None).await, 200);
        check("get", "/health/ready", call(&s, Method::GET, "/health/ready", None).await, 200);
        let metrics = s.client.get(s.url("/metrics")).send().await.unwrap();
        assert_eq!(metrics.status(), 200);
        let declared = &c.doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"];
        let content_type = metrics.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(
            declared.as_object().unwrap().keys().any(|k| content_type.starts_with(k.as_str())),
            "/metrics answers {content_type}, declares {declared}"
        );

        // Snapshots and checkpoints.
        let snap = "/streams/{stream}/snapshot";
        let body = json!({ "version": 1, "data": { "balance": 5 } });
        check("put", snap, call(&s, Method::PUT, "/streams/acct-1/snapshot", Some(body)).await, 201);
        check("get", snap, call(&s, Method::GET, "/streams/acct-1/snapshot", None).await, 200);
        let ahead = json!({ "version": 99, "data": {} });
        check("put", snap, call(&s, Method::PUT, "/streams/acct-1/snapshot", Some(ahead)).await, 409);
        check("get", snap, call(&s, Method::GET, "/streams/acct-1/snapshot?version=0", None).await, 404);
        let cp = "/checkpoints/{name}";
        check(
            "put",
            cp,
            call(&s, Method::PUT, "/checkpoints/proj-1", Some(json!({ "position": 7 }))).await,
            204,
        );
        check("get", cp, call(&s, Method::GET, "/checkpoints/proj-1", None).await, 200);
        check("get", cp, call(&s, Method::GET, "/checkpoints/proj-2", None).await, 404);

        // A consumer group: create, confirm, list, stats, pull, ack, parked,
        // unknown group, delete.
        let g = "/groups/{group}";
        let spec = json!({ "stream": "acct-1", "max_retries": 1 });
        check("put", g, call(&s, Method::PUT, "/groups/billing", Some(spec.clone())).await, 201);
        check("put", g, call(&s, Method::PUT, "/groups/billing", Some(spec)).await, 200);
        let other = json!({ "stream": "acct-1", "max_retries": 2 });
        check("put", g, call(&s, Method::PUT, "/groups/billing", Some(other)).await, 409);
        let filtered = json!({ "stream": "$all", "filter": { "type": "Opened" }, "start_from": "end" });
        check("put", g, call(&s, Method::PUT, "/groups/openings", Some(filtered)).await, 201);
        check("get", "/groups", call(&s, Method::GET, "/groups", None).await, 200);
        check("get", g, call(&s, Method::GET, "/groups/billing", None).await, 200);
        let next = "/groups/{group}/next";
        let pulled =
            call(&s, Method::POST, "/groups/billing/next?consumer=c1&max=2&wait_ms=5000", None).await;
        let ids: Vec<Value> = pulled.1["deliveries"]
            .as_array()
            .expect("deliveries")
            .iter()
            .map(|d| d["delivery_id"].clone())
            .collect();
        assert_eq!(ids.len(), 2, "{}", pulled.1);
        check("post", next, pulled, 200);
        let ack = json!({ "delivery_ids": [ids[0], 999_999] });
        check(
            "post",
            "/groups/{group}/ack",
            call(&s, Method::POST, "/groups/billing/ack?consumer=c1", Some(ack)).await,
            200,
        );
        let nack = json!({ "delivery_ids": [ids[1]], "action": "park", "reason": "test" });
        check(
            "post",
            "/groups/{group}/nack",
            call(&s, Method::POST, "/groups/billing/nack?consumer=c1", Some(nack)).await,
            200,
        );
        check(
            "post",
            "/groups/{group}/ack",
            call(
                &s,
                Method::POST,
                "/groups/billing/ack?consumer=nobody",
                Some(json!({ "delivery_ids": [1] })),
            )
            .await,
            404,
        );
        // Parking is asynchronous to the nack: wait for it to show.
        let mut parked = (0, Value::Null);
        for _ in 0..100 {
            parked = call(&s, Method::GET, "/groups/billing/parked", None).await;
            if parked.1["parked"].as_array().is_some_and(|p| !p.is_empty()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let position = parked.1["parked"][0]["position"].as_u64().expect("a parked message");
        check("get", "/groups/{group}/parked", parked, 200);
        let one = format!("/groups/billing/parked/{position}");
        check("get", "/groups/{group}/parked/{position}", call(&s, Method::GET, &one, None).await, 200);
        check(
            "get",
            "/groups/{group}/parked/{position}",
            call(&s, Method::GET, "/groups/billing/parked/424242", None).await,
            404,
        );
        check(
            "post",
            "/groups/{group}/parked/replay",
            call(&s, Method::POST, "/groups/billing/parked/replay", None).await,
            200,
        );
        check("get", g, call(&s, Method::GET, "/groups/nobody", None).await, 404);
        check("delete", g, call(&s, Method::DELETE, "/groups/openings", None).await, 204);
        check("delete", g, call(&s, Method::DELETE, "/groups/openings", None).await, 404);
        s.stop().await;

        // Without credentials where they are required; a role too low.
        let mut config = ServerConfig::default();
        config.auth.api_keys = vec![annals_server::config::ApiKeyConfig {
            name: "reader".into(),
            key: "reader-key-0123456789".into(),
            role: Role::Reader,
            streams: None,
        }];
        let s = start(config).await;
        check("get", "/stats", call(&s, Method::GET, "/stats", None).await, 401);
        let denied = s
            .client
            .post(s.url("/streams/acct-1"))
            .header("x-api-key", "reader-key-0123456789")
            .json(&json!([event("X", json!({}))]))
            .send()
            .await
            .unwrap();
        let status = denied.status().as_u16();
        check("post", stream, (status, denied.json().await.unwrap()), 403);
        s.stop().await;
    })
    .await;
}
