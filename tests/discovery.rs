//! OpenID discovery (SPEC §4) against the real binary: the document's
//! fields, its routes (an issuer with a path, a `jwks_uri` of its own, two
//! keysets side by side), ETag/304/HEAD/Cache-Control like the JWKS,
//! `discovery_file`, a reload that moves the issuer, and an OIDC client's
//! flow checked with `jsonwebtoken`: discovery → `jwks_uri` → verify a token
//! signed with the key from `signing_dir`.

#[allow(dead_code)]
mod common;

use std::collections::BTreeSet;
use std::fs;

use common::*;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};

const DISCOVERY_FIELDS: [&str; 6] = [
    "issuer",
    "jwks_uri",
    "response_types_supported",
    "subject_types_supported",
    "id_token_signing_alg_values_supported",
    "claims_supported",
];

fn discovery_path(issuer_path: &str) -> String {
    format!("{issuer_path}/.well-known/openid-configuration")
}

fn issuer(sb: &Sandbox, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", sb.port)
}

/// A sandbox with one keyset `default` whose issuer is `<sandbox>/tenant`.
fn one_issuer(extra: &str) -> (Sandbox, String) {
    let sb = Sandbox::new();
    let issuer = issuer(&sb, "/tenant");
    let settings = format!(
        "issuer = \"{issuer}\"\ndiscovery_file = '{}'\n{}{extra}",
        sb.path("out/openid-configuration").display(),
        outputs(None, Some(&sb.path("signing")))
    );
    sb.write_config(&keyset_block("default", &ALGS, STEADY, &settings));
    (sb, issuer)
}

/// The document has exactly the SPEC's fields, with the issuer as written,
/// the default `jwks_uri`, and the keyset's algorithms.
#[test]
fn the_document_has_the_spec_fields() {
    let (sb, issuer) = one_issuer("");
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    let reply = get_ok(&sb.url(&discovery_path("/tenant"))).unwrap();
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let document = parse_json(&reply.body, "the discovery document");
    let fields: BTreeSet<&str> = document
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(fields, BTreeSet::from(DISCOVERY_FIELDS), "{document}");
    assert_eq!(document["issuer"], json!(issuer));
    assert_eq!(
        document["jwks_uri"],
        json!(format!("{issuer}/.well-known/jwks.json"))
    );
    assert_eq!(document["response_types_supported"], json!(["id_token"]));
    assert_eq!(document["subject_types_supported"], json!(["public"]));
    assert_eq!(
        document["id_token_signing_alg_values_supported"],
        json!(["ES256", "RS256"])
    );
    assert_eq!(document["claims_supported"], json!(["sub", "iss"]));
    // The same bytes on a second request: the document is deterministic.
    let again = get_ok(&sb.url(&discovery_path("/tenant"))).unwrap();
    assert_eq!(again.body, reply.body);
    assert_eq!(again.header("etag"), reply.header("etag"));
}

/// The discovery route and the `jwks_uri` path answer like the JWKS routes:
/// a strong ETag, 304 on `If-None-Match`, `Cache-Control` with
/// `jwks_cache_ttl`, HEAD with the headers and no body, 404 for other
/// methods; `jwks_uri` serves the very bytes of `/keysets/<name>/jwks.json`;
/// `discovery_file` holds the HTTP bytes, mode 0644.
#[test]
fn discovery_routes_answer_like_the_jwks() {
    let (sb, _) = one_issuer("");
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    let jwks = get_ok(&jwks_url(&sb, "default")).unwrap();
    for (path, content_type) in [
        (discovery_path("/tenant"), "application/json"),
        (
            "/tenant/.well-known/jwks.json".to_string(),
            "application/jwk-set+json",
        ),
    ] {
        let url = sb.url(&path);
        let reply = get_ok(&url).unwrap();
        let etag = reply.header("etag").expect("an ETag").to_string();
        assert!(
            etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2,
            "{path}: a strong ETag, got {etag}"
        );
        assert_eq!(reply.header("content-type"), Some(content_type), "{path}");
        assert_eq!(
            reply.header("cache-control"),
            Some("public, max-age=2"),
            "{path}"
        );
        assert_eq!(
            reply.header("content-length"),
            Some(reply.body.len().to_string().as_str())
        );

        let not_modified = request("GET", &url, &[("If-None-Match", &etag)]).unwrap();
        assert_eq!(not_modified.status, 304, "{path}: {not_modified:?}");
        assert!(not_modified.body.is_empty());
        assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
        let weak = format!("W/{etag}");
        let listed = format!("\"other\", {weak}");
        let weak_match = request("GET", &url, &[("If-None-Match", &listed)]).unwrap();
        assert_eq!(weak_match.status, 304, "{path}: weak comparison");
        let stale = request("GET", &url, &[("If-None-Match", "\"stale\"")]).unwrap();
        assert_eq!(stale.status, 200);
        assert_eq!(stale.body, reply.body);

        let head = request("HEAD", &url, &[]).unwrap();
        assert_eq!(head.status, 200, "{path}");
        assert!(head.body.is_empty(), "{path}: HEAD has no body");
        assert_eq!(head.header("etag"), Some(etag.as_str()));
        assert_eq!(head.header("content-type"), Some(content_type));
        assert_eq!(
            head.header("content-length"),
            reply.header("content-length")
        );

        for method in ["POST", "PUT", "DELETE"] {
            let refused = request(method, &url, &[]).unwrap();
            assert_eq!(refused.status, 404, "{method} {path}");
        }
        if path.ends_with("jwks.json") {
            assert_eq!(reply.body, jwks.body, "jwks_uri serves the keyset's JWKS");
            assert_eq!(reply.header("etag"), jwks.header("etag"));
        } else {
            let file = sb.path("out/openid-configuration");
            daemon.until("discovery_file written", LONG, || {
                fs::read(&file).map_err(|e| e.to_string())
            });
            assert_eq!(
                fs::read(&file).unwrap(),
                reply.body,
                "discovery_file = HTTP"
            );
            assert_eq!(mode(&file), 0o644);
        }
    }
    // Paths beside the issuer's are not ours.
    for path in [
        "/.well-known/openid-configuration",
        "/tenant/.well-known/openid-configuration/",
        "/tenant/openid-configuration",
        "/other/.well-known/openid-configuration",
    ] {
        assert_eq!(get(&sb.url(path)).unwrap().status, 404, "{path}");
    }
}

/// What an OIDC relying party does: fetch the discovery document from the
/// issuer, check its `issuer`, follow `jwks_uri`, and verify a token signed
/// with the active key from `signing_dir` (issuer checked too), for each
/// algorithm the document announces. Verified with `jsonwebtoken`, not
/// keyroll's code.
#[test]
fn an_oidc_client_verifies_tokens_through_discovery() {
    let (sb, issuer) = one_issuer("");
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    let discovery_url = format!("{issuer}/.well-known/openid-configuration");
    let document = parse_json(&get_ok(&discovery_url).unwrap().body, "discovery");
    assert_eq!(document["issuer"].as_str(), Some(issuer.as_str()));
    let jwks_uri = document["jwks_uri"].as_str().expect("jwks_uri");
    let jwks = get_ok(jwks_uri).unwrap().body;
    let algs = document["id_token_signing_alg_values_supported"]
        .as_array()
        .expect("a list of algorithms");
    assert_eq!(algs.len(), 2);
    for alg in ALGS {
        assert!(algs.contains(&json!(alg)), "{alg} not announced");
        let signer = read_signer(&sb.path("signing"), alg).unwrap();
        let token = sign_as_issuer(&signer, &issuer);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        let kid = header.kid.expect("a kid");
        let jwk = find_jwk(&jwks, &kid).unwrap_or_else(|| panic!("{kid} not at jwks_uri"));
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk).unwrap();
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = Validation::new(algorithm(alg));
        validation.set_issuer(&[&issuer]);
        let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation)
            .unwrap_or_else(|e| panic!("{alg}: the token does not verify: {e}"))
            .claims;
        assert_eq!(claims["iss"], json!(issuer));
        // A token from another issuer is refused by the same client.
        let foreign = sign_as_issuer(&signer, "https://someone-else.example.com");
        assert!(jsonwebtoken::decode::<Value>(&foreign, &key, &validation).is_err());
    }
}

fn sign_as_issuer(signer: &SignerKey, issuer: &str) -> String {
    let encoding = match signer.alg {
        "ES256" => EncodingKey::from_ec_pem(&signer.pem),
        _ => EncodingKey::from_rsa_pem(&signer.pem),
    }
    .expect("a usable PKCS#8 key");
    let mut header = Header::new(algorithm(signer.alg));
    header.kid = Some(signer.kid.clone());
    let now = now_unix() as u64;
    let claims =
        json!({"iss": issuer, "sub": "system:serviceaccount:ns:app", "iat": now, "exp": now + 300});
    jsonwebtoken::encode(&header, &claims, &encoding).expect("sign a token")
}

/// Keysets side by side: each issuer's path gets its own discovery route; a
/// `jwks_uri` of the issuer's origin is served at its path, one of another
/// origin is only announced; a keyset without an issuer adds no route.
#[test]
fn each_issuer_gets_its_own_routes() {
    let sb = Sandbox::new();
    let a = issuer(&sb, "/a");
    let b = issuer(&sb, "/teams/b/");
    let c = issuer(&sb, "/c");
    let keysets = [
        keyset_block("a", &["ES256"], STEADY, &format!("issuer = \"{a}\"\n")),
        keyset_block(
            "b",
            &["RS256"],
            STEADY,
            &format!(
                "issuer = \"{b}\"\njwks_uri = \"{}\"\n",
                issuer(&sb, "/keys/b.json")
            ),
        ),
        keyset_block(
            "c",
            &["ES256"],
            STEADY,
            &format!("issuer = \"{c}\"\njwks_uri = \"https://keys.example.com/c.json\"\n"),
        ),
        keyset_block("d", &["ES256"], STEADY, ""),
    ];
    sb.write_config(&keysets.concat());
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    let document = |path: &str| parse_json(&get_ok(&sb.url(path)).unwrap().body, path);

    let doc_a = document(&discovery_path("/a"));
    assert_eq!(doc_a["issuer"], json!(a));
    assert_eq!(
        doc_a["id_token_signing_alg_values_supported"],
        json!(["ES256"])
    );
    assert_eq!(
        get_ok(&sb.url("/a/.well-known/jwks.json")).unwrap().body,
        get_ok(&jwks_url(&sb, "a")).unwrap().body
    );

    // The trailing slash is the issuer's own; the route drops it.
    let doc_b = document(&discovery_path("/teams/b"));
    assert_eq!(doc_b["issuer"], json!(b), "the issuer exactly as written");
    assert_eq!(
        doc_b["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    assert_eq!(doc_b["jwks_uri"], json!(issuer(&sb, "/keys/b.json")));
    assert_eq!(
        get_ok(&sb.url("/keys/b.json")).unwrap().body,
        get_ok(&jwks_url(&sb, "b")).unwrap().body
    );

    let doc_c = document(&discovery_path("/c"));
    assert_eq!(doc_c["jwks_uri"], json!("https://keys.example.com/c.json"));
    assert_eq!(get(&sb.url("/c.json")).unwrap().status, 404);
    assert_eq!(
        get(&sb.url("/c/.well-known/jwks.json")).unwrap().status,
        404
    );

    assert_eq!(
        get(&sb.url("/.well-known/openid-configuration"))
            .unwrap()
            .status,
        404,
        "no keyset has the bare host as issuer"
    );
}

/// A SIGHUP that moves the issuer moves the routes: the old path answers
/// 404, the new one the new document.
#[test]
fn a_reload_moves_the_issuer() {
    let (sb, _) = one_issuer("");
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    get_ok(&sb.url(&discovery_path("/tenant"))).unwrap();
    let moved = issuer(&sb, "/moved");
    sb.write_config(&keyset_block(
        "default",
        &ALGS,
        STEADY,
        &format!("issuer = \"{moved}\"\n"),
    ));
    daemon.signal("HUP");
    let document = daemon.until("the moved issuer to be served", LONG, || {
        get_ok(&sb.url(&discovery_path("/moved"))).map(|reply| reply.body)
    });
    assert_eq!(parse_json(&document, "discovery")["issuer"], json!(moved));
    assert_eq!(
        get(&sb.url(&discovery_path("/tenant"))).unwrap().status,
        404
    );
}

/// `validate` shows where each document is served.
#[test]
fn validate_shows_the_discovery_routes() {
    let (sb, issuer) = one_issuer("s3_jwks = \"s3://keys-bucket/default/jwks.json\"\n");
    let out = sb.cli(&["validate"]).ok();
    out.stdout_has(&[
        &format!("issuer: {issuer}"),
        "discovery: HTTP /tenant/.well-known/openid-configuration",
        "(HTTP /tenant/.well-known/jwks.json)",
        "discovery_file:",
        "s3_jwks: s3://keys-bucket/default/jwks.json",
    ]);
}
