//! The signer against the real binary (SPEC §4, "The signer"; §6 `keyroll
//! sign`): the sign API over its Unix socket, spoken by hand here rather
//! than through keyroll's client; every bad input; the socket's file rules;
//! tokens verified by `jsonwebtoken` against the served JWKS across
//! rotations; and the Kubernetes ExternalJWTSigner service through a gRPC
//! client generated from the project's proto, over the real socket.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

#[allow(dead_code)]
mod common;
use common::*;

// ---- speaking HTTP/1.1 over the socket by hand ------------------------------------

/// An answer of the sign API.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Value,
}

/// Sends `raw` on a new connection and reads the answer to the end (every
/// request here says `Connection: close`).
fn exchange(socket: &Path, raw: &[u8]) -> Result<Answer, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    stream.write_all(raw).map_err(|e| format!("write: {e}"))?;
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| "the answer is not UTF-8".to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of header in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let body = serde_json::from_str(body).map_err(|e| format!("body {body:?}: {e}"))?;
    Ok(Answer {
        status,
        head: head.to_ascii_lowercase(),
        body,
    })
}

fn http_request(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: keyroll\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn post(socket: &Path, keyset: &str, body: &Value) -> Answer {
    let raw = http_request(
        "POST",
        &format!("/v1/keysets/{keyset}/sign"),
        &body.to_string(),
    );
    exchange(socket, &raw).unwrap_or_else(|e| panic!("POST to {}: {e}", socket.display()))
}

fn now() -> i64 {
    now_unix() as i64
}

fn token_parts(token: &str) -> (Value, Value, Vec<u8>) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWS compact token: {token}");
    for part in &parts {
        assert!(
            !part.contains('='),
            "segments are unpadded base64url: {token}"
        );
    }
    let json = |s: &str| parse_json(&b64url_decode(s), "a token segment");
    (json(parts[0]), json(parts[1]), b64url_decode(parts[2]))
}

/// The JWS header must be exactly `{"alg","kid","typ":"JWT"}`.
fn check_header(header: &Value, alg: &str) -> String {
    let names: BTreeSet<&str> = header
        .as_object()
        .expect("the header is an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(names, BTreeSet::from(["alg", "kid", "typ"]), "{header}");
    assert_eq!(header["alg"], alg, "{header}");
    assert_eq!(header["typ"], "JWT", "{header}");
    header["kid"].as_str().expect("a kid").to_string()
}

fn jwks(sb: &Sandbox) -> Vec<u8> {
    get_ok(&jwks_url(sb, "default")).expect("GET the JWKS").body
}

fn signer_config(sb: &Sandbox, keysets: &str, signer: &str) {
    let text = format!("{}{keysets}\n[signer]\n{signer}", sb.head());
    fs::write(sb.config_path(), text).expect("write the config");
}

/// Waits until the sign API signs for `keyset` (it answers 503 until the
/// keyset's first publish).
fn wait_signing(daemon: &mut Daemon, socket: &Path, keyset: &str) {
    daemon.until("the sign API to sign", LONG, || {
        let raw = http_request(
            "POST",
            &format!("/v1/keysets/{keyset}/sign"),
            r#"{"claims":{}}"#,
        );
        match exchange(socket, &raw) {
            Ok(answer) if answer.status == 200 => Ok(()),
            Ok(answer) => Err(format!("{answer:?}")),
            Err(e) => Err(e),
        }
    });
}

fn refused(answer: &Answer, status: u16, words: &[&str]) {
    assert_eq!(answer.status, status, "{answer:?}");
    let error = answer.body["error"].as_str().unwrap_or_default();
    for word in words {
        assert!(error.contains(word), "{word:?} missing in {answer:?}");
    }
}

// ---- 1. the sign API: a good request and every bad input ------------------------

#[test]
fn sign_api_signs_good_requests_and_refuses_every_bad_input() {
    let sb = Sandbox::new();
    let socket = sb.path("run/sign.sock");
    let keysets = keyset_block("default", &ALGS, STEADY, "");
    signer_config(
        &sb,
        &keysets,
        &format!("socket = '{}'\nsocket_mode = \"0640\"\n", socket.display()),
    );
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    wait_signing(&mut daemon, &socket, "default");

    // The socket: its configured mode and its folder's group.
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode(&socket), 0o640);
    assert_eq!(meta.gid(), fs::metadata(sb.path("run")).unwrap().gid());

    // A good request, for each algorithm; the default is the first.
    let status = sb.status_json();
    let rows = key_rows(&status, "default");
    let body = jwks(&sb);
    for (alg, request) in [
        ("ES256", json!({"claims": {"sub": "alice", "scope": "api"}})),
        ("ES256", json!({"claims": {"sub": "alice"}, "alg": "ES256"})),
        ("RS256", json!({"claims": {"sub": "alice"}, "alg": "RS256"})),
    ] {
        let t = now();
        let answer = post(&socket, "default", &request);
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(answer.head.contains("content-type: application/json"));
        let token = answer.body["token"].as_str().expect("a token");
        let (header, claims, signature) = token_parts(token);
        let kid = check_header(&header, alg);
        assert_eq!(kid, row(&rows, alg, "active").kid, "the active key signs");
        assert_eq!(answer.body["kid"], kid.as_str());
        assert_eq!(answer.body["alg"], alg);
        if alg == "ES256" {
            assert_eq!(signature.len(), 64, "ES256 is R||S");
        }
        let iat = claims["iat"].as_i64().expect("iat defaults to now");
        assert!((iat - t).abs() <= 2, "iat {iat}, now {t}");
        assert_eq!(
            claims["exp"].as_i64(),
            Some(iat + 5),
            "exp = iat + token_ttl"
        );
        assert_eq!(claims["sub"], "alice");
        assert_eq!(
            timestamp(&answer.body["expires_at"]),
            claims["exp"].as_i64(),
            "{answer:?}"
        );
        verify(token, &body).unwrap_or_else(|e| panic!("{e}"));
    }

    // Every bad input, refused with its status and a message naming it.
    // The claims carry a marker that must never reach the log.
    let marker = "claims-must-not-be-logged";
    let t = now();
    let cases: Vec<(Value, &str, u16, Vec<&str>)> = vec![
        (
            json!({"claims": {"sub": marker, "exp": t + 60}}),
            "default",
            400,
            vec!["exp", "token_ttl"],
        ),
        (
            json!({"claims": {"sub": marker, "exp": t + 61, "iat": t + 1}}),
            "default",
            400,
            vec!["exp"],
        ),
        (
            json!({"claims": {"sub": marker, "iat": t - 100}}),
            "default",
            400,
            vec!["iat", "clock_skew"],
        ),
        (
            json!({"claims": {"sub": marker, "iat": t + 100}}),
            "default",
            400,
            vec!["iat"],
        ),
        (
            json!({"claims": {"sub": marker, "exp": "later"}}),
            "default",
            400,
            vec!["exp", "number"],
        ),
        (json!({"claims": [marker]}), "default", 400, vec!["object"]),
        (json!({"claims": marker}), "default", 400, vec!["object"]),
        (
            json!({"claims": {"sub": marker}, "extra": 1}),
            "default",
            400,
            vec![],
        ),
        (json!({"alg": "ES256"}), "default", 400, vec![]),
        (
            json!({"claims": {"sub": marker}}),
            "nope",
            404,
            vec!["nope"],
        ),
        (
            json!({"claims": {"sub": marker}, "alg": "HS256"}),
            "default",
            404,
            vec!["HS256"],
        ),
        (
            json!({"claims": {"sub": marker}, "alg": "es256"}),
            "default",
            404,
            vec!["es256"],
        ),
    ];
    for (request, keyset, status, words) in &cases {
        let answer = post(&socket, keyset, request);
        refused(&answer, *status, words);
        assert!(!answer.body.to_string().contains(marker), "{answer:?}");
    }
    let not_json = exchange(
        &socket,
        &http_request("POST", "/v1/keysets/default/sign", "{\"claims\": {"),
    )
    .unwrap();
    refused(&not_json, 400, &["JSON"]);

    // Wrong method: 405 with Allow; wrong path: 404.
    for method in ["GET", "PUT", "DELETE"] {
        let answer = exchange(
            &socket,
            &http_request(method, "/v1/keysets/default/sign", ""),
        )
        .unwrap();
        refused(&answer, 405, &[]);
        assert!(answer.head.contains("allow: post"), "{answer:?}");
    }
    for path in [
        "/",
        "/v1/sign",
        "/v1/keysets/default",
        "/v1/keysets/default/sign/x",
        "/v1/keysets//sign",
    ] {
        let answer = exchange(&socket, &http_request("POST", path, "{}")).unwrap();
        refused(&answer, 404, &[]);
    }

    // A body over 64 KiB: 413, whether declared or streamed in chunks.
    let big = json!({"claims": {"pad": "x".repeat(70 * 1024)}}).to_string();
    let answer = exchange(
        &socket,
        &http_request("POST", "/v1/keysets/default/sign", &big),
    )
    .unwrap();
    refused(&answer, 413, &["65536"]);
    let mut chunked = b"POST /v1/keysets/default/sign HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for piece in big.as_bytes().chunks(8192) {
        chunked.extend(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend(piece);
        chunked.extend(b"\r\n");
    }
    chunked.extend(b"0\r\n\r\n");
    refused(&exchange(&socket, &chunked).unwrap(), 413, &[]);
    // Just under the limit is fine (and then refused only for its claims).
    let under = json!({"claims": {"pad": "x".repeat(60 * 1024)}});
    assert_eq!(post(&socket, "default", &under).status, 200);

    // Clients that send half a request and hang delay no other.
    let mut half_header = UnixStream::connect(&socket).unwrap();
    half_header
        .write_all(b"POST /v1/keysets/default/sign HTTP/1.1\r\nHost: k\r\nContent-")
        .unwrap();
    let mut half_body = UnixStream::connect(&socket).unwrap();
    half_body
        .write_all(b"POST /v1/keysets/default/sign HTTP/1.1\r\nHost: k\r\nContent-Length: 100\r\n\r\n{\"claims\": {")
        .unwrap();
    for _ in 0..20 {
        let started = Instant::now();
        let answer = post(&socket, "default", &json!({"claims": {"sub": "b"}}));
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a request took {:?} beside two stalled clients",
            started.elapsed()
        );
    }
    // The server ends the stalled connections itself (10 s deadlines).
    for stalled in [&mut half_header, &mut half_body] {
        stalled.set_read_timeout(Some(LONG)).unwrap();
        let mut rest = Vec::new();
        let _ = stalled.read_to_end(&mut rest);
        let text = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || text.starts_with("HTTP/1.1 408"),
            "a stalled client got {text:?}"
        );
    }

    // 200 concurrent clients, all signed and verified.
    let clients = 200;
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let (barrier, socket) = (barrier.clone(), socket.clone());
            thread::spawn(move || {
                let mut stream = UnixStream::connect(&socket).map_err(|e| e.to_string())?;
                barrier.wait();
                let body = json!({"claims": {"sub": format!("client-{i}")}, "alg": if i % 2 == 0 { "ES256" } else { "RS256" }}).to_string();
                stream
                    .write_all(&http_request("POST", "/v1/keysets/default/sign", &body))
                    .map_err(|e| e.to_string())?;
                let mut answer = String::new();
                stream.read_to_string(&mut answer).map_err(|e| e.to_string())?;
                let (_, body) = answer.split_once("\r\n\r\n").ok_or("no body")?;
                let body: Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
                body["token"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("client {i}: {answer}"))
            })
        })
        .collect();
    let tokens: Vec<String> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .expect("a client thread")
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let body = jwks(&sb);
    let failures: Vec<String> = tokens
        .iter()
        .filter_map(|t| verify(t, &body).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {clients} failed: {failures:?}",
        failures.len()
    );

    // Metrics count every signature and every refusal by reason.
    let text = metrics_text(&sb);
    let signed = |alg| {
        metric(
            &text,
            "keyroll_tokens_signed_total",
            &[("keyset", "default"), ("alg", alg)],
        )
    };
    assert!(signed("ES256").unwrap_or(0.0) >= 120.0, "{text}");
    assert!(signed("RS256").unwrap_or(0.0) >= 100.0, "{text}");
    let refusals = |keyset: &str, reason: &str| {
        metric(
            &text,
            "keyroll_sign_refused_total",
            &[("keyset", keyset), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(refusals("default", "exp_too_long"), 2.0, "{text}");
    assert_eq!(refusals("default", "iat_skewed"), 2.0, "{text}");
    assert_eq!(refusals("default", "claims_not_object"), 2.0, "{text}");
    assert_eq!(refusals("default", "unknown_alg"), 2.0, "{text}");
    assert_eq!(refusals("default", "method"), 3.0, "{text}");
    assert_eq!(refusals("default", "too_large"), 2.0, "{text}");
    assert_eq!(refusals("", "unknown_keyset"), 1.0, "{text}");
    assert_eq!(refusals("", "not_found"), 5.0, "{text}");

    // Refusals are logged with the peer, once per reason per minute, never
    // with the claims.
    let log = daemon.stderr();
    let logged = |reason: &str| {
        log.lines()
            .filter(|l| {
                l.contains("sign request refused") && l.contains(&format!("reason=\"{reason}\""))
            })
            .collect::<Vec<_>>()
    };
    let exp_lines = logged("exp_too_long");
    assert_eq!(exp_lines.len(), 1, "{log}");
    assert!(
        exp_lines[0].contains(&format!(
            "peer_uid={}",
            fs::metadata(sb.root()).unwrap().uid()
        )) && exp_lines[0].contains(&format!("peer_pid={}", std::process::id())),
        "{}",
        exp_lines[0]
    );
    assert!(!log.contains(marker), "claims reached the log:\n{log}");

    // `keyroll sign` through the daemon: the bare token on stdout.
    let out = sb.cli(&["sign", "--claims", r#"{"sub":"cli"}"#]).ok();
    let token = out.stdout.trim();
    assert_eq!(out.stdout, format!("{token}\n"));
    verify(token, &jwks(&sb)).unwrap_or_else(|e| panic!("{e}"));
    let out = sb
        .cli(&[
            "sign",
            "default",
            "--alg",
            "RS256",
            "--claims",
            r#"{"sub":"cli"}"#,
        ])
        .ok();
    let (header, _, _) = token_parts(out.stdout.trim());
    check_header(&header, "RS256");
    let far = now() + 3600;
    sb.cli(&["sign", "--claims", &format!("{{\"exp\":{far}}}")])
        .exits(2)
        .stderr_has(&["exp", "token_ttl"]);
    sb.cli(&["sign", "--claims", "not json"]).exits(2);

    // Without a daemon: exit 1 saying so; the socket left with it.
    daemon.stop_cleanly("TERM");
    assert!(!socket.exists(), "a clean stop removes its socket");
    sb.cli(&["sign", "--claims", "{}"])
        .exits(1)
        .stderr_has(&["no keyroll daemon is listening", "sign.sock"]);
    // Without a socket in the config: exit 1 saying so.
    sb.write_config(&keysets);
    sb.cli(&["sign", "--claims", "{}"])
        .exits(1)
        .stderr_has(&["no [signer] socket"]);
}

// ---- 2. socket paths: created, stale replaced, anything else refused ------------------

#[test]
fn socket_folders_are_created_stale_sockets_replaced_and_other_files_kept() {
    let sb = Sandbox::new();
    let socket = sb.path("a/b/sign.sock");
    let keysets = keyset_block("default", &["ES256"], STEADY, "");
    signer_config(&sb, &keysets, &format!("socket = '{}'\n", socket.display()));

    // A missing folder is created.
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    wait_signing(&mut daemon, &socket, "default");
    assert_eq!(mode(&socket), 0o660, "the default socket_mode");
    // A crash leaves the socket behind: the next start replaces it.
    drop(daemon);
    assert!(fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());
    sb.cli(&["validate"]).ok();
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    wait_signing(&mut daemon, &socket, "default");
    // A socket someone still answers on is not stale: a second daemon
    // leaves it alone and fails.
    sb.cli(&["run"])
        .exits(1)
        .stderr_has(&["signer", "another process is listening"]);
    wait_signing(&mut daemon, &socket, "default");
    daemon.stop_cleanly("TERM");

    // Any other file at the path is refused (exit 2, named) and never deleted.
    fs::write(&socket, "not a socket").unwrap();
    for command in ["validate", "run"] {
        sb.cli(&[command])
            .exits(2)
            .stderr_has(&["signer.socket", "exists and is not a socket"]);
        assert_eq!(fs::read_to_string(&socket).unwrap(), "not a socket");
    }
    fs::remove_file(&socket).unwrap();
    fs::create_dir(&socket).unwrap();
    sb.cli(&["run"])
        .exits(2)
        .stderr_has(&["signer.socket", "is not a socket"]);
    assert!(socket.is_dir());
}

// ---- 3. tokens verified across rotations ----------------------------------------------

#[test]
fn signed_tokens_verify_against_the_served_jwks_across_rotations() {
    let sb = Sandbox::new();
    let socket = sb.path("run/sign.sock");
    let signing_dir = sb.path("signing/default");
    let keysets = keyset_block("default", &ALGS, FAST, &outputs(None, Some(&signing_dir)));
    signer_config(&sb, &keysets, &format!("socket = '{}'\n", socket.display()));
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    wait_signing(&mut daemon, &socket, "default");

    // Tokens still within their exp, re-verified against every later JWKS.
    let mut live: Vec<(String, i64)> = Vec::new();
    let mut kids: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let (mut signed, mut verified) = (0, 0);
    let mut failures = Vec::new();
    // What signing_dir offered at the previous sample, per algorithm: the
    // files are written just before the signer's keys are swapped.
    let mut offered: BTreeMap<&str, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(3 * ROTATE_EVERY as u64 + 60);
    while kids.values().map(BTreeSet::len).min().unwrap_or(0) < 3 {
        daemon.assert_alive();
        assert!(
            Instant::now() < deadline,
            "fewer than two rotations seen: {kids:?}\n{}",
            tail(&daemon.stderr())
        );
        for alg in ALGS {
            // The signer switches keys when signing_dir does: the kid it
            // uses is the one signing_dir offered just before or just after.
            let before =
                fs::read_to_string(signing_dir.join(format!("{alg}.kid"))).unwrap_or_default();
            let answer = post(
                &socket,
                "default",
                &json!({"claims": {"sub": "rotation"}, "alg": alg}),
            );
            let after =
                fs::read_to_string(signing_dir.join(format!("{alg}.kid"))).unwrap_or_default();
            assert_eq!(answer.status, 200, "{answer:?}");
            let kid = answer.body["kid"].as_str().unwrap().to_string();
            let earlier = offered.insert(alg, after.clone()).unwrap_or_default();
            assert!(
                kid == before || kid == after || kid == earlier,
                "signed with {kid} while signing_dir offered {earlier}, {before} then {after}"
            );
            let token = answer.body["token"].as_str().unwrap().to_string();
            let exp = token_parts(&token).1["exp"].as_i64().unwrap();
            kids.entry(alg).or_default().insert(kid);
            live.push((token, exp));
            signed += 1;
        }
        let body = jwks(&sb);
        let t = now();
        // A token verifies from iat until exp (jsonwebtoken allows 60 s of
        // leeway past exp itself; only tokens within exp are checked here).
        live.retain(|(_, exp)| *exp > t);
        for (token, _) in &live {
            verified += 1;
            if let Err(e) = verify(token, &body) {
                failures.push(e);
            }
        }
        thread::sleep(Duration::from_millis(250));
    }
    assert!(
        failures.is_empty(),
        "{} of {verified} verifications failed: {failures:?}",
        failures.len()
    );
    assert!(signed >= 20, "only {signed} tokens signed");
    eprintln!("{signed} tokens, {verified} verifications, kids {kids:?}");
}

// ---- 4. the Kubernetes external signer over gRPC ---------------------------------------

mod grpc {
    use super::*;
    use keyroll::signer::proto::external_jwt_signer_client::ExternalJwtSignerClient;
    use keyroll::signer::proto::{FetchKeysRequest, MetadataRequest, SignJwtRequest};
    use tonic::transport::Channel;

    pub type Client = ExternalJwtSignerClient<Channel>;

    /// A client on the Unix socket, the way kube-apiserver dials it.
    pub fn connect(runtime: &tokio::runtime::Runtime, socket: &Path) -> Client {
        let socket = socket.to_path_buf();
        let channel = runtime
            .block_on(async {
                tonic::transport::Endpoint::from_static("http://keyroll.invalid")
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let socket = socket.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(socket).await?,
                            ))
                        }
                    }))
                    .await
            })
            .expect("connect to the Kubernetes signer socket");
        ExternalJwtSignerClient::new(channel)
    }

    pub fn metadata(rt: &tokio::runtime::Runtime, client: &mut Client) -> i64 {
        rt.block_on(client.metadata(MetadataRequest {}))
            .expect("Metadata")
            .into_inner()
            .max_token_expiration_seconds
    }

    pub struct Fetched {
        pub keys: BTreeMap<String, Vec<u8>>,
        pub refresh_hint_seconds: i64,
        pub data_timestamp: i64,
    }

    pub fn fetch(
        rt: &tokio::runtime::Runtime,
        client: &mut Client,
    ) -> Result<Fetched, tonic::Status> {
        let response = rt
            .block_on(client.fetch_keys(FetchKeysRequest {}))?
            .into_inner();
        let mut keys = BTreeMap::new();
        for key in response.keys {
            assert!(!key.exclude_from_oidc_discovery, "{}", key.key_id);
            keys.insert(key.key_id, key.key);
        }
        Ok(Fetched {
            keys,
            refresh_hint_seconds: response.refresh_hint_seconds,
            data_timestamp: response.data_timestamp.map_or(0, |t| t.seconds),
        })
    }

    /// Sign as kube-apiserver does: it encodes the claims, keyroll returns
    /// header and signature, the token is the three joined.
    pub fn sign(
        rt: &tokio::runtime::Runtime,
        client: &mut Client,
        claims: &str,
    ) -> Result<String, tonic::Status> {
        let encoded = URL_SAFE_NO_PAD.encode(claims);
        let response = rt
            .block_on(client.sign(SignJwtRequest {
                claims: encoded.clone(),
            }))?
            .into_inner();
        Ok(format!(
            "{}.{encoded}.{}",
            response.header, response.signature
        ))
    }
}

/// The public key of a PKIX DER, compared with the JWK's own members.
fn der_matches_jwk(der: &[u8], jwk: &Value) -> Result<(), String> {
    match str_member(jwk, "kty") {
        "EC" => {
            use p256::elliptic_curve::sec1::ToEncodedPoint;
            use p256::pkcs8::DecodePublicKey;
            let key = p256::PublicKey::from_public_key_der(der).map_err(|e| e.to_string())?;
            let point = key.to_encoded_point(false);
            let same = point.x().map(|x| x.to_vec()) == Some(b64url_decode(str_member(jwk, "x")))
                && point.y().map(|y| y.to_vec()) == Some(b64url_decode(str_member(jwk, "y")));
            same.then_some(())
                .ok_or_else(|| format!("EC point differs from {jwk}"))
        }
        "RSA" => {
            // The DER read with the RustCrypto types, not with what made it
            // (aws-lc-rs).
            let info = pkcs8::SubjectPublicKeyInfoRef::try_from(der).map_err(|e| e.to_string())?;
            if info.algorithm != pkcs1::ALGORITHM_ID {
                return Err(format!("not rsaEncryption: {:?}", info.algorithm));
            }
            let bits = info.subject_public_key.as_bytes().ok_or("a partial byte")?;
            let key = pkcs1::RsaPublicKey::try_from(bits).map_err(|e| e.to_string())?;
            let same = key.modulus.as_bytes() == b64url_decode(str_member(jwk, "n"))
                && key.public_exponent.as_bytes() == b64url_decode(str_member(jwk, "e"));
            same.then_some(())
                .ok_or_else(|| format!("RSA key differs from {jwk}"))
        }
        other => Err(format!("unexpected kty {other}")),
    }
}

/// Claims as kube-apiserver writes them (its own spacing and order): signed
/// as received, so the token carries exactly these bytes.
fn kube_claims(iat: i64, lifetime: i64) -> String {
    format!(
        "{{\"iss\":\"https://kubernetes.default.svc\",\"sub\":\"system:serviceaccount:default:default\", \"nbf\":{iat},\"iat\":{iat},\"exp\":{}}}",
        iat + lifetime
    )
}

#[test]
fn kubernetes_external_signer_over_grpc_across_rotations() {
    let sb = Sandbox::new();
    let socket = sb.path("kube/signer.sock");
    // token_ttl at kube-apiserver's minimum; publish_lead = 2s + 2s + the
    // API server's cache (jwks_cache_ttl, 2s) = 6s, a rotation every 10s.
    let timings = "rotate_every = \"10s\"\ntoken_ttl = \"10m\"\njwks_cache_ttl = \"2s\"\nverifier_cache_ttl = \"2s\"\npropagation = \"2s\"\nclock_skew = \"1s\"\n";
    let keysets = keyset_block("default", &ALGS, timings, "");
    signer_config(
        &sb,
        &keysets,
        &format!("kubernetes_socket = '{}'\n", socket.display()),
    );
    let validate = sb.cli(&["validate"]).ok();
    validate.stdout_has(&[
        "kube-apiserver cache (2s) = 6s",
        "--service-account-max-token-expiration=10m",
    ]);

    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    daemon.until("the Kubernetes socket", LONG, || {
        socket.exists().then_some(()).ok_or("not yet".to_string())
    });
    assert_eq!(mode(&socket), 0o660);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = grpc::connect(&rt, &socket);

    assert_eq!(
        grpc::metadata(&rt, &mut client),
        600,
        "max_token_expiration_seconds = token_ttl"
    );

    // FetchKeys: every published key, each DER the JWK's key.
    let fetched = daemon.until("FetchKeys to list the JWKS", LONG, || {
        let fetched = grpc::fetch(&rt, &mut client).map_err(|e| e.to_string())?;
        let body = jwks(&sb);
        let published: BTreeSet<String> = jwks_kids(&body).into_iter().collect();
        let listed: BTreeSet<String> = fetched.keys.keys().cloned().collect();
        if listed != published {
            return Err(format!("FetchKeys {listed:?}, JWKS {published:?}"));
        }
        for (kid, der) in &fetched.keys {
            der_matches_jwk(der, &find_jwk(&body, kid).unwrap())?;
        }
        Ok(fetched)
    });
    assert!(fetched.keys.len() >= 4, "ES256 and RS256, active and next");
    let fetched_at = Instant::now();
    assert_eq!(fetched.refresh_hint_seconds, 2, "= jwks_cache_ttl");
    assert!(
        (fetched.data_timestamp - now()).abs() <= 10,
        "data_timestamp {}",
        fetched.data_timestamp
    );

    // Sign: the header exactly {"alg","kid","typ"}, R||S, the claims as sent.
    let t = now();
    let claims = kube_claims(t, 600);
    let token = grpc::sign(&rt, &mut client, &claims).expect("Sign");
    let (header, _, signature) = token_parts(&token);
    let kid = check_header(&header, "ES256");
    assert_eq!(signature.len(), 64);
    assert_eq!(
        token.split('.').nth(1).unwrap(),
        URL_SAFE_NO_PAD.encode(&claims)
    );
    assert!(fetched.keys.contains_key(&kid));
    verify(&token, &jwks(&sb)).unwrap_or_else(|e| panic!("{e}"));
    let too_long = grpc::sign(&rt, &mut client, &kube_claims(t, 601)).unwrap_err();
    assert_eq!(
        too_long.code(),
        tonic::Code::InvalidArgument,
        "{too_long:?}"
    );
    assert!(too_long.message().contains("token_ttl"), "{too_long:?}");
    let skewed = grpc::sign(&rt, &mut client, &kube_claims(t - 3600, 600)).unwrap_err();
    assert_eq!(skewed.code(), tonic::Code::InvalidArgument, "{skewed:?}");

    // Rotations: a kid shows in FetchKeys at least publish_lead before it
    // signs, and every token verifies against the served JWKS.
    // Keys listed at the first fetch were published earlier than this test
    // can tell; a key first listed later is timed from its first listing.
    let initial: BTreeSet<String> = fetched.keys.keys().cloned().collect();
    let mut first_listed: BTreeMap<String, Instant> = fetched
        .keys
        .keys()
        .map(|kid| (kid.clone(), fetched_at))
        .collect();
    let mut first_signed: BTreeMap<String, Instant> = BTreeMap::new();
    let mut failures = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !first_signed.keys().any(|kid| !initial.contains(kid)) {
        daemon.assert_alive();
        assert!(
            Instant::now() < deadline,
            "fewer than two rotations: {first_signed:?}"
        );
        let fetched = grpc::fetch(&rt, &mut client).expect("FetchKeys");
        assert!(!fetched.keys.is_empty());
        for kid in fetched.keys.keys() {
            first_listed.entry(kid.clone()).or_insert_with(Instant::now);
        }
        let token = grpc::sign(&rt, &mut client, &kube_claims(now(), 600)).expect("Sign");
        let kid = check_header(&token_parts(&token).0, "ES256");
        first_signed.entry(kid.clone()).or_insert_with(Instant::now);
        if let Err(e) = verify(&token, &jwks(&sb)) {
            failures.push(e);
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert!(failures.is_empty(), "{failures:?}");
    assert!(first_signed.len() >= 3, "two rotations: {first_signed:?}");
    for (kid, signed_at) in &first_signed {
        let listed_at = first_listed
            .get(kid)
            .unwrap_or_else(|| panic!("{kid} signed but never listed by FetchKeys"));
        assert!(
            listed_at <= signed_at,
            "{kid} signed before FetchKeys listed it"
        );
        if initial.contains(kid) {
            continue;
        }
        let lead = signed_at.saturating_duration_since(*listed_at);
        assert!(
            lead >= Duration::from_secs(4),
            "{kid} signed {lead:?} after FetchKeys first listed it (publish_lead is 6s)"
        );
    }
}
