//! End-to-end tests of the real `keyroll` binary: what an operator and a
//! verifier rely on (SPEC §1–§7), checked from the outside. Each test owns a
//! temporary folder and a free port, drives `keyroll` as a child process and
//! checks its outputs independently: tokens are signed with the keys from
//! `signing_dir` and verified with `jsonwebtoken` against the served JWKS,
//! thumbprints and certificate digests are recomputed here.
//!
//! Nothing sleeps to synchronise: every wait polls a condition with a
//! generous deadline (the machine may be loaded), while the assertions stay
//! strict.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::*;

// ---- 1. rotation, verified from the outside ----------------------------------

/// What the end-to-end test has seen of one retired key.
struct RetiredKey {
    alg: String,
    remove_at: i64,
    removed_seen: bool,
}

#[test]
fn scheduled_rotations_never_break_an_independent_verifier() {
    let sb = Sandbox::new();
    let jwks_file = sb.path("public/default.jwks.json");
    let signing_dir = sb.path("signing/default");
    sb.write_config(&keyset_block(
        "default",
        &ALGS,
        FAST,
        &outputs(Some(&jwks_file), Some(&signing_dir)),
    ));
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    daemon.until("signing_dir and jwks_file to be written", LONG, || {
        let missing: Vec<String> = [
            "ES256.pem",
            "ES256.kid",
            "RS256.pem",
            "RS256.kid",
            "signing.json",
        ]
        .iter()
        .map(|f| signing_dir.join(f))
        .chain([jwks_file.clone()])
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing {missing:?}"))
        }
    });

    let well_known = sb.url("/.well-known/jwks.json");
    let mut active_history: BTreeMap<&str, Vec<String>> =
        ALGS.iter().map(|a| (*a, Vec::new())).collect();
    let mut retired: BTreeMap<String, RetiredKey> = BTreeMap::new();
    // kid → the validity of its x5c certificate.
    let mut certificates: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut verified = 0usize;
    let mut torn_reads = 0usize;
    let mut file_matches = 0usize;
    let mut file_differs_since: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(120);

    loop {
        daemon.assert_alive();

        // A co-located signer signs with the active key of each slot; a
        // verifier that fetches the JWKS afterwards must accept the token.
        for alg in ALGS {
            let key = read_signer(&signing_dir, alg).unwrap_or_else(|e| panic!("signing_dir: {e}"));
            assert!(
                !key.kid.is_empty() && !key.kid.contains('\n'),
                "{alg}.kid is the bare kid: {:?}",
                key.kid
            );
            let token = sign(&key);
            let served = get_ok(&well_known).expect("GET the JWKS");
            if let Err(e) = verify(&token, &served.body) {
                // <ALG>.pem and <ALG>.kid are two files: a read straddling
                // their replacement is torn. A pair that is still the same
                // when read again is not, and must verify.
                let again = read_signer(&signing_dir, alg).expect("signing_dir");
                assert_ne!(
                    again, key,
                    "a token signed with the {alg} key in signing_dir (kid {}) is rejected by the served JWKS: {e}\nJWKS: {}",
                    key.kid,
                    served.text()
                );
                torn_reads += 1;
                continue;
            }
            verified += 1;
            let history = active_history.get_mut(alg).expect("a slot");
            if history.last() != Some(&key.kid) {
                assert!(
                    !history.contains(&key.kid),
                    "{alg} key {} became active twice: {history:?}",
                    key.kid
                );
                history.push(key.kid.clone());
            }
        }

        // signing.json: the active private keys, each published.
        let signing_json = parse_json(
            &fs::read(signing_dir.join("signing.json")).expect("signing.json"),
            "signing.json",
        );
        let served = get_ok(&well_known).expect("GET the JWKS");
        let served_kids = jwks_kids(&served.body);
        let signing_keys = signing_json["keys"]
            .as_array()
            .expect("signing.json has keys");
        assert_eq!(
            signing_keys.len(),
            2,
            "one private JWK per slot: {signing_json}"
        );
        for private in signing_keys {
            let kid = str_member(private, "kid");
            assert!(private.get("d").is_some(), "a private JWK has d");
            let public = find_jwk(&served.body, kid).unwrap_or_else(|| {
                panic!("signing.json key {kid} is not in the served JWKS {served_kids:?}")
            });
            for member in ["kty", "alg", "crv", "x", "y", "n", "e"] {
                assert_eq!(
                    private.get(member),
                    public.get(member),
                    "signing.json and JWKS disagree on {member} of {kid}"
                );
            }
        }

        // Every published JWK, checked once per kid.
        for jwk in jwks_keys(&served.body) {
            let kid = str_member(&jwk, "kid").to_string();
            certificates
                .entry(kid)
                .or_insert_with(|| check_jwk(&jwk, "default"));
        }

        // Retired keys stay published until their remove_at, then go.
        let status = sb.status_json();
        let before_fetch = now_unix();
        let served = get_ok(&well_known).expect("GET the JWKS");
        let after_fetch = now_unix();
        let served_kids: BTreeSet<String> = jwks_kids(&served.body).into_iter().collect();
        let rows = key_rows(&status, "default");
        check_status_rows(&rows);
        // The certificate is valid from created_at to at least remove_at.
        for r in &rows {
            if let Some(&(not_before, not_after)) = certificates.get(&r.kid) {
                assert!(
                    not_before <= r.created_at,
                    "certificate of {} valid only from {not_before}: {r:?}",
                    r.kid
                );
                let must_cover = r.remove_at.unwrap_or(after_fetch as i64 + RETIRE_GRACE);
                assert!(
                    not_after >= must_cover,
                    "certificate of {} expires at {not_after}: {r:?}",
                    r.kid
                );
            }
        }
        for r in rows.iter().filter(|r| r.state == "retired") {
            let remove_at = r.remove_at.expect("retired keys have remove_at");
            retired.entry(r.kid.clone()).or_insert(RetiredKey {
                alg: r.alg.clone(),
                remove_at,
                removed_seen: false,
            });
        }
        for (kid, key) in retired.iter_mut() {
            let present = served_kids.contains(kid);
            if after_fetch < key.remove_at as f64 {
                assert!(
                    present,
                    "retired key {kid} left the JWKS before its remove_at {}",
                    key.remove_at
                );
            }
            if present {
                assert!(
                    !key.removed_seen,
                    "removed key {kid} came back into the JWKS"
                );
                assert!(
                    before_fetch < (key.remove_at + 15) as f64,
                    "retired key {kid} is still published 15s after its remove_at {}",
                    key.remove_at
                );
            } else if before_fetch >= key.remove_at as f64 {
                key.removed_seen = true;
            }
        }
        // The JWKS holds every key the store says is published (allowing the
        // daemon a moment to publish what the status just read).
        let expected: BTreeSet<String> = rows
            .iter()
            .filter(|r| {
                r.state != "retired" || (r.remove_at.expect("remove_at") as f64) > after_fetch + 1.0
            })
            .map(|r| r.kid.clone())
            .collect();
        if !expected.is_subset(&served_kids) {
            daemon.until(
                "the JWKS to contain every next, active and retired key",
                Duration::from_secs(10),
                || {
                    let kids: BTreeSet<String> =
                        jwks_kids(&get_ok(&well_known)?.body).into_iter().collect();
                    let missing: Vec<&String> = expected.difference(&kids).collect();
                    if missing.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("missing {missing:?}"))
                    }
                },
            );
        }
        // Order (SPEC §2) whenever the JWKS and the status show the same
        // keys. At a scheduled instant the outputs follow the plan before the
        // store records the rotation (C5: a store call never delays a
        // switch), so for a moment the two may disagree on states: read both
        // again until they agree.
        let rank = |state: &str| {
            ["active", "next", "retired"]
                .iter()
                .position(|s| *s == state)
                .expect("a state")
        };
        let in_order = |rows: &[KeyRow], body: &[u8]| -> Result<(), String> {
            let status_kids: BTreeSet<String> = rows.iter().map(|r| r.kid.clone()).collect();
            let served: Vec<String> = jwks_kids(body);
            if status_kids != served.iter().cloned().collect::<BTreeSet<String>>() {
                return Ok(());
            }
            let mut ordered = rows.to_vec();
            ordered.sort_by(|a, b| {
                (rank(&a.state), &a.alg, &a.kid).cmp(&(rank(&b.state), &b.alg, &b.kid))
            });
            let want: Vec<String> = ordered.into_iter().map(|r| r.kid).collect();
            (served == want).then_some(()).ok_or(format!(
                "JWKS order {served:?}, the store's states want {want:?}"
            ))
        };
        if in_order(&rows, &served.body).is_err() {
            daemon.until(
                "JWKS order: active, next, retired; then alg, kid",
                Duration::from_secs(10),
                || {
                    let rows = key_rows(&sb.status_json(), "default");
                    let served = get_ok(&well_known)?;
                    in_order(&rows, &served.body)
                },
            );
        }

        // jwks_file holds the bytes HTTP serves (compared while the ETag is stable).
        let first = get_ok(&well_known).expect("GET the JWKS");
        let etag = first.header("etag").expect("an ETag").to_string();
        let file = fs::read(&jwks_file).expect("read jwks_file");
        let second =
            request("GET", &well_known, &[("If-None-Match", &etag)]).expect("conditional GET");
        if second.status == 304 {
            if file == first.body {
                file_matches += 1;
                file_differs_since = None;
            } else {
                let since = *file_differs_since.get_or_insert_with(Instant::now);
                assert!(
                    since.elapsed() < Duration::from_secs(10),
                    "jwks_file has differed from the served JWKS for 10s\nfile: {}\nHTTP: {}",
                    String::from_utf8_lossy(&file),
                    first.text()
                );
            }
        }

        let rotated_twice = active_history.values().all(|h| h.len() >= 3);
        let removal_seen_per_alg = ALGS
            .iter()
            .all(|alg| retired.values().any(|k| k.alg == *alg && k.removed_seen));
        if rotated_twice && removal_seen_per_alg {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "two rotations per slot and a removal were not seen in time: active keys {active_history:?}, retired {:?}\n--- daemon stderr ---\n{}",
            retired.iter().map(|(k, r)| (k, r.remove_at, r.removed_seen)).collect::<Vec<_>>(),
            tail(&daemon.stderr())
        );
        thread::sleep(Duration::from_millis(150));
    }

    // Every key that ever signed was activated by the schedule, after
    // publish_lead; the rotations show in the metrics.
    let metrics = metrics_text(&sb);
    for alg in ALGS {
        let rotations = metric(
            &metrics,
            "keyroll_rotations_total",
            &[("keyset", "default"), ("alg", alg), ("trigger", "schedule")],
        );
        assert!(
            rotations.unwrap_or(0.0) >= 2.0,
            "keyroll_rotations_total for {alg}: {rotations:?}\n{metrics}"
        );
    }
    daemon.until("jwks_file to equal the served JWKS", LONG, || {
        let served = get_ok(&well_known)?;
        let file = fs::read(&jwks_file).map_err(|e| e.to_string())?;
        if file == served.body {
            Ok(())
        } else {
            Err("differs".into())
        }
    });
    assert!(file_matches > 0, "jwks_file never matched the served JWKS");
    assert!(verified >= 20, "only {verified} tokens were verified");
    eprintln!(
        "verified {verified} tokens, {torn_reads} torn pem/kid reads retried, {} kids checked, active keys {active_history:?}",
        certificates.len()
    );
    daemon.stop_cleanly("TERM");
}

/// The timing rules of SPEC §1 as `status --json` shows them.
fn check_status_rows(rows: &[KeyRow]) {
    for alg in ALGS {
        let active = row(rows, alg, "active");
        row(rows, alg, "next");
        assert!(
            active.activated_at.is_some()
                && active.retired_at.is_none()
                && active.remove_at.is_none(),
            "{active:?}"
        );
    }
    for r in rows {
        assert!(r.published_at >= r.created_at, "{r:?}");
        if let Some(activated) = r.activated_at {
            // Bootstrap keys are active at once; every other activation waits
            // publish_lead (I3).
            if activated != r.created_at {
                assert!(
                    activated - r.published_at >= PUBLISH_LEAD,
                    "key {} activated {}s after being published (publish_lead {PUBLISH_LEAD}s): {r:?}",
                    r.kid,
                    activated - r.published_at
                );
            }
        }
        if r.state == "retired" {
            let (activated, retired, remove_at) = (
                r.activated_at.expect("a retired key was active"),
                r.retired_at.expect("retired_at"),
                r.remove_at.expect("remove_at"),
            );
            assert_eq!(
                remove_at - retired,
                RETIRE_GRACE,
                "remove_at = retired_at + retire_grace: {r:?}"
            );
            let served = retired - activated;
            assert!(
                (ROTATE_EVERY..=ROTATE_EVERY + 15).contains(&served),
                "a scheduled rotation every {ROTATE_EVERY}s, but key {} signed for {served}s",
                r.kid
            );
        }
    }
}

// ---- 2. HTTP semantics ---------------------------------------------------------

#[test]
fn http_serves_jwks_with_cache_semantics_health_and_metrics() {
    let sb = Sandbox::new();
    let default_timings = STEADY.replace(
        "jwks_cache_ttl = \"2s\"\nverifier_cache_ttl = \"2s\"",
        "jwks_cache_ttl = \"37s\"\nverifier_cache_ttl = \"37s\"",
    );
    sb.write_config(&format!(
        "{}{}",
        keyset_block("default", &["ES256"], &default_timings, ""),
        keyset_block("other", &ALGS, STEADY, "rsa_bits = 3072\nx5c = false\n")
    ));
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);

    let well_known = sb.url("/.well-known/jwks.json");
    let reply = get_ok(&well_known).expect("GET the default JWKS");
    assert_eq!(
        reply.header("content-type"),
        Some("application/jwk-set+json"),
        "{reply:?}"
    );
    assert_eq!(
        reply.header("cache-control"),
        Some("public, max-age=37"),
        "{reply:?}"
    );
    assert_eq!(
        reply.header("content-length"),
        Some(reply.body.len().to_string().as_str()),
        "{reply:?}"
    );
    let etag = reply.header("etag").expect("an ETag").to_string();
    assert!(
        etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'),
        "a strong, quoted ETag: {etag}"
    );
    let default_kids = jwks_kids(&reply.body);
    assert_eq!(
        default_kids.len(),
        2,
        "an active and a next key: {default_kids:?}"
    );
    for jwk in jwks_keys(&reply.body) {
        check_jwk(&jwk, "default");
    }
    // Deterministic: the same state gives the same bytes and ETag.
    let again = get_ok(&well_known).expect("GET again");
    assert_eq!(
        (&again.body, again.header("etag")),
        (&reply.body, Some(etag.as_str()))
    );

    let by_name = get_ok(&jwks_url(&sb, "default")).expect("GET /keysets/default/jwks.json");
    assert_eq!(
        by_name.body, reply.body,
        "/.well-known serves the keyset named default"
    );
    assert_eq!(by_name.header("etag"), Some(etag.as_str()));

    let other = get_ok(&jwks_url(&sb, "other")).expect("GET /keysets/other/jwks.json");
    assert_eq!(
        other.header("content-type"),
        Some("application/jwk-set+json")
    );
    assert_eq!(
        other.header("cache-control"),
        Some("public, max-age=2"),
        "max-age is the keyset's jwks_cache_ttl"
    );
    let other_etag = other.header("etag").expect("an ETag").to_string();
    assert_ne!(other_etag, etag);
    let other_kids = jwks_kids(&other.body);
    assert_eq!(other_kids.len(), 4);
    assert!(
        other_kids.iter().all(|k| !default_kids.contains(k)),
        "keysets have their own keys"
    );
    for jwk in jwks_keys(&other.body) {
        // rsa_bits = 3072, x5c = false: no certificate members.
        check_key_members(&jwk, 3072);
        assert!(
            jwk.get("x5c").is_none() && jwk.get("x5t#S256").is_none(),
            "x5c = false: {jwk}"
        );
    }

    // Conditional requests.
    for (if_none_match, expected) in [
        (etag.clone(), 304),
        (format!("W/{etag}"), 304),
        (format!("\"nope\", {etag}"), 304),
        ("*".to_string(), 304),
        ("\"nope\"".to_string(), 200),
        (other_etag.clone(), 200),
    ] {
        let reply = request("GET", &well_known, &[("If-None-Match", &if_none_match)])
            .expect("conditional GET");
        assert_eq!(
            reply.status, expected,
            "If-None-Match: {if_none_match} → {reply:?}"
        );
        assert_eq!(reply.header("etag"), Some(etag.as_str()), "{reply:?}");
        assert_eq!(
            reply.header("cache-control"),
            Some("public, max-age=37"),
            "{reply:?}"
        );
        if expected == 304 {
            assert!(reply.body.is_empty(), "a 304 has no body: {reply:?}");
        } else {
            assert_eq!(reply.body, by_name.body);
        }
    }

    // HEAD: the headers of GET, no body.
    let head = request("HEAD", &well_known, &[]).expect("HEAD");
    assert_eq!(head.status, 200, "{head:?}");
    assert!(head.body.is_empty(), "HEAD has no body: {head:?}");
    assert_eq!(
        head.header("content-type"),
        Some("application/jwk-set+json")
    );
    assert_eq!(head.header("etag"), Some(etag.as_str()));
    assert_eq!(head.header("cache-control"), Some("public, max-age=37"));
    assert_eq!(
        head.header("content-length"),
        Some(by_name.body.len().to_string().as_str())
    );
    assert_eq!(
        request("HEAD", &sb.url("/healthz"), &[])
            .expect("HEAD /healthz")
            .status,
        200
    );

    // Anything else is 404.
    for (method, path) in [
        ("POST", "/.well-known/jwks.json"),
        ("PUT", "/.well-known/jwks.json"),
        ("DELETE", "/keysets/default/jwks.json"),
        ("PATCH", "/keysets/other/jwks.json"),
        ("POST", "/healthz"),
        ("GET", "/"),
        ("GET", "/nope"),
        ("GET", "/.well-known/jwks"),
        ("GET", "/keysets/missing/jwks.json"),
        ("GET", "/keysets/default"),
    ] {
        let reply = request(method, &sb.url(path), &[]).expect("a request");
        assert_eq!(reply.status, 404, "{method} {path} → {reply:?}");
    }

    assert_eq!(get(&sb.url("/healthz")).expect("GET /healthz").status, 200);
    assert_eq!(get(&sb.url("/readyz")).expect("GET /readyz").status, 200);

    let metrics = get_ok(&sb.url("/metrics")).expect("GET /metrics");
    let content_type = metrics
        .header("content-type")
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/plain")
            || content_type.starts_with("application/openmetrics-text"),
        "Prometheus text format: {content_type}"
    );
    let text = metrics.text();
    for family in [
        "keyroll_keys",
        "keyroll_active_key_age_seconds",
        "keyroll_next_rotation_timestamp_seconds",
        "keyroll_rotations",
        "keyroll_reconcile_errors",
        "keyroll_last_reconcile_success_timestamp_seconds",
        "keyroll_store_conflicts",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "metric {family} is not declared:\n{text}"
        );
    }
    for keyset in ["default", "other"] {
        for (state, count) in [("active", 1.0), ("next", 1.0), ("retired", 0.0)] {
            let value = metric(
                &text,
                "keyroll_keys",
                &[("keyset", keyset), ("alg", "ES256"), ("state", state)],
            );
            assert_eq!(value, Some(count), "keyroll_keys {keyset} {state}:\n{text}");
        }
        assert_eq!(
            metric(
                &text,
                "keyroll_reconcile_errors_total",
                &[("keyset", keyset)]
            ),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            metric(
                &text,
                "keyroll_store_conflicts_total",
                &[("keyset", keyset)]
            ),
            Some(0.0),
            "{text}"
        );
        let age = metric(
            &text,
            "keyroll_active_key_age_seconds",
            &[("keyset", keyset), ("alg", "ES256")],
        );
        assert!(
            age.is_some_and(|a| (0.0..600.0).contains(&a)),
            "active key age {age:?}:\n{text}"
        );
        let next = metric(
            &text,
            "keyroll_next_rotation_timestamp_seconds",
            &[("keyset", keyset), ("alg", "ES256")],
        )
        .expect("next rotation timestamp");
        let now = now_unix();
        assert!(
            next > now + 3000.0 && next < now + 3700.0,
            "the next rotation is in about an hour: {next} vs {now}"
        );
        let last = metric(
            &text,
            "keyroll_last_reconcile_success_timestamp_seconds",
            &[("keyset", keyset)],
        )
        .expect("last success timestamp");
        assert!(
            (now - last).abs() < 120.0,
            "last successful reconcile {last}, now {now}"
        );
    }
    assert!(
        metric(
            &text,
            "keyroll_keys",
            &[("keyset", "default"), ("alg", "RS256"), ("state", "active")]
        ) != Some(1.0)
    );

    daemon.stop_cleanly("INT");
}

// ---- 3. the CLI: status, jwks, validate, invalid configs ----------------------

#[test]
fn status_json_and_jwks_commands_show_what_is_published() {
    let sb = Sandbox::new();
    sb.write_config(&keyset_block("default", &ALGS, STEADY, ""));

    // Before anything ran: status shows an empty keyset and writes nothing.
    let empty = sb.status_json();
    let keyset = keyset_status(&empty, "default");
    assert_eq!(keyset["keys"], json!([]), "{empty}");
    assert!(
        !sb.store_file("default").exists(),
        "status must not write the store"
    );
    let unbootstrapped = sb.cli(&["jwks"]);
    assert!(
        unbootstrapped.code != Some(0) && unbootstrapped.stdout.is_empty(),
        "no JWKS to print yet: {unbootstrapped}"
    );

    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    // A forced rotation gives every slot a retired key too.
    let forced = sb.cli(&["rotate", "--now"]).ok();
    forced.stdout_has(&["is now active"]);

    let status = sb.status_json();
    let top = status.as_object().expect("an object");
    assert_eq!(top.keys().collect::<Vec<_>>(), ["keysets"], "{status}");
    let keyset = keyset_status(&status, "default");
    assert_eq!(keyset["name"], "default");
    let next_rotation = timestamp(&keyset["next_rotation"]).expect("next_rotation is a timestamp");
    let now = now_unix() as i64;
    assert!(
        next_rotation > now && next_rotation <= now + 3600 + 5,
        "next_rotation {next_rotation} vs now {now}"
    );
    let fields: BTreeSet<&str> = [
        "kid",
        "alg",
        "state",
        "created_at",
        "published_at",
        "activated_at",
        "retired_at",
        "remove_at",
    ]
    .into_iter()
    .collect();
    let keys = keyset["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 6, "per slot: active, next, retired: {status}");
    for key in keys {
        let have: BTreeSet<&str> = key
            .as_object()
            .expect("a key object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(have, fields, "key fields: {key}");
        let nulls: Vec<&str> = ["activated_at", "retired_at", "remove_at"]
            .into_iter()
            .filter(|f| key[*f].is_null())
            .collect();
        match key["state"].as_str().expect("state") {
            "next" => assert_eq!(nulls, ["activated_at", "retired_at", "remove_at"], "{key}"),
            "active" => assert_eq!(nulls, ["retired_at", "remove_at"], "{key}"),
            "retired" => assert!(nulls.is_empty(), "{key}"),
            other => panic!("unknown state {other}: {key}"),
        }
    }
    let rows = key_rows(&status, "default");
    for alg in ALGS {
        let (active, retired) = (row(&rows, alg, "active"), row(&rows, alg, "retired"));
        row(&rows, alg, "next");
        assert_eq!(
            retired.retired_at, active.activated_at,
            "the rotation retired the old key when it activated the new one"
        );
        assert_eq!(
            retired.remove_at.expect("remove_at") - retired.retired_at.expect("retired_at"),
            RETIRE_GRACE
        );
    }

    // `jwks` prints exactly what is served once the daemon picked up the rotation.
    let printed = sb.cli(&["jwks"]).ok().stdout;
    assert_eq!(printed, sb.cli(&["jwks", "default"]).ok().stdout);
    let status_kids: BTreeSet<String> = rows.iter().map(|r| r.kid.clone()).collect();
    let printed_kids: BTreeSet<String> = jwks_kids(printed.as_bytes()).into_iter().collect();
    assert_eq!(
        printed_kids, status_kids,
        "`jwks` lists every key `status` shows"
    );
    daemon.until(
        "HTTP to serve the bytes `keyroll jwks` prints",
        LONG,
        || {
            let served = get_ok(&sb.url("/.well-known/jwks.json"))?;
            if served.body == printed.as_bytes() {
                Ok(())
            } else {
                Err(format!("served {}", served.text()))
            }
        },
    );

    let human = sb.cli(&["status"]).ok();
    for r in &rows {
        human.stdout_has(&[&r.kid]);
    }
    let plan = sb.cli(&["plan", "--count", "2"]).ok();
    plan.stdout_has(&["activate", "ES256", "RS256"]);
    let unchanged = sb.status_json();
    assert_eq!(
        key_rows(&unchanged, "default").len(),
        6,
        "plan changes nothing"
    );

    sb.cli(&["status", "nope"]).exits(2).stderr_has(&["nope"]);
    sb.cli(&["jwks", "nope"]).exits(2).stderr_has(&["nope"]);
    sb.cli(&["rotate", "--alg", "HS256"]).exits(2);
    sb.cli(&["frobnicate"]).exits(2);
}

#[test]
fn validate_prints_derived_timings_and_bad_configs_exit_2_naming_key_and_line() {
    let sb = Sandbox::new();
    sb.write_config(&keyset_block("default", &ALGS, FAST, ""));
    let out = sb.cli(&["validate"]).ok();
    out.stdout_has(&["publish_lead", "retire_grace", "4s", "8s"]);
    for line in out
        .stdout
        .lines()
        .filter(|l| l.contains("publish_lead") || l.contains("retire_grace"))
    {
        let expected = if line.contains("publish_lead") {
            "4s"
        } else {
            "8s"
        };
        assert!(
            line.trim_end().ends_with(expected),
            "derived timing line {line:?} should end with {expected}"
        );
    }

    // KEYROLL_CONFIG names the config when --config is absent.
    let mut cmd = sb.command();
    cmd.env("KEYROLL_CONFIG", sb.config_path()).arg("validate");
    let via_env = run_to_end(cmd, sb.root(), "KEYROLL_CONFIG=… keyroll validate".into()).ok();
    assert_eq!(via_env.stdout, out.stdout);

    // Without a config: the embedded default (SPEC §6), unless the machine
    // has a system config this test must not depend on.
    if !Path::new("/etc/keyroll/keyroll.toml").exists() {
        let mut cmd = sb.command();
        cmd.arg("validate");
        let embedded = run_to_end(cmd, sb.root(), "keyroll validate (no config)".into()).ok();
        embedded.stdout_has(&[
            "keyroll-state/keysets",
            "127.0.0.1:8080",
            "keyset default",
            "ES256, RS256",
            // 5m + 2 × 30s and 1h + 1m + 2 × 30s
            "publish_lead = verifier_cache_ttl + propagation = 1h 1m",
            "retire_grace = token_ttl + clock_skew + propagation = 1h 2m",
        ]);
        let state_directory = sb.path("systemd-state");
        let mut cmd = sb.command();
        cmd.env("STATE_DIRECTORY", &state_directory).arg("validate");
        let under_systemd =
            run_to_end(cmd, sb.root(), "STATE_DIRECTORY=… keyroll validate".into()).ok();
        under_systemd.stdout_has(&[&state_directory.join("keysets").display().to_string()]);
    }
    sb.cli(&["--log-level", "no[such=filter", "validate"])
        .exits(2);

    // (what to add to a keyset, the key at fault, what the message must name)
    let cases: [(&str, &str, &str, &[&str]); 6] = [
        (
            "unknown key",
            "token_tll = \"1h\"\n",
            "token_tll",
            &["token_tll"],
        ),
        ("bad duration", "", "token_ttl", &["token_ttl", "soon"]),
        (
            "unsafe period",
            "",
            "rotate_every",
            &["rotate_every", "publish_lead", "3s", "4s"],
        ),
        (
            "unsafe cron",
            "",
            "rotate",
            &["rotate", "publish_lead", "2s", "4s"],
        ),
        (
            "small RSA",
            "rsa_bits = 1024\n",
            "rsa_bits",
            &["rsa_bits", "1024"],
        ),
        ("wrong type", "x5c = \"yes\"\n", "x5c", &["x5c"]),
    ];
    for (name, extra, key, needles) in cases {
        let timings = match name {
            "bad duration" => FAST.replace("token_ttl = \"5s\"", "token_ttl = \"soon\""),
            "unsafe period" => FAST.replace("rotate_every = \"10s\"", "rotate_every = \"3s\""),
            "unsafe cron" => FAST.replace("rotate_every = \"10s\"", "rotate = \"*/2 * * * * *\""),
            _ => FAST.to_string(),
        };
        let text = sb.write_config(&keyset_block("default", &ALGS, &timings, extra));
        let line = text
            .lines()
            .position(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("{key} not in the config"))
            + 1;
        let mut expected: Vec<String> = needles.iter().map(|s| s.to_string()).collect();
        expected.push(format!("line {line}"));
        let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        for command in ["validate", "run"] {
            let out = sb.cli(&[command]).exits(2);
            out.stderr_has(&expected);
            assert!(out.stdout.is_empty(), "{name}: nothing on stdout: {out}");
        }
    }
    assert!(
        !sb.store_dir().exists(),
        "an invalid config creates no store"
    );
}

// ---- 4. manual actions against a running daemon --------------------------------

#[test]
fn manual_rotate_and_revoke_against_a_running_daemon() {
    let sb = Sandbox::new();
    let quick_signing = sb.path("signing/quick");
    let guarded_signing = sb.path("signing/guarded");
    // "guarded": publish_lead = 58s + 2s = 60s, so its next key stays young.
    let guarded_timings = STEADY.replace(
        "jwks_cache_ttl = \"2s\"\nverifier_cache_ttl = \"2s\"",
        "jwks_cache_ttl = \"2s\"\nverifier_cache_ttl = \"58s\"",
    );
    sb.write_config(&format!(
        "{}{}",
        keyset_block("quick", &ALGS, STEADY, &outputs(None, Some(&quick_signing))),
        keyset_block(
            "guarded",
            &["ES256"],
            &guarded_timings,
            &outputs(None, Some(&guarded_signing))
        )
    ));
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    // Waits until `dir` holds `kid` as the ES256 signing key.
    let await_signer = |daemon: &mut Daemon, what: &str, dir: &Path, kid: &str| {
        daemon.until(what, LONG, || {
            let current = read_signer(dir, "ES256")?.kid;
            if current == kid {
                Ok(())
            } else {
                Err(format!("still {current}"))
            }
        });
    };
    // Two keysets, none called default: commands must name one.
    sb.cli(&["rotate"]).exits(2).stderr_has(&["keyset"]);
    sb.cli(&["jwks"]).exits(2).stderr_has(&["keyset"]);
    assert_eq!(
        get(&sb.url("/.well-known/jwks.json")).expect("GET").status,
        404,
        "no default keyset"
    );

    // `rotate` before publish_lead: only requested; nothing changes yet.
    let rows = key_rows(&sb.status_json(), "guarded");
    let (active, next) = (
        row(&rows, "ES256", "active").clone(),
        row(&rows, "ES256", "next").clone(),
    );
    let requested = sb.cli(&["rotate", "guarded"]).ok();
    requested.stdout_has(&["publish_lead"]);
    assert!(!requested.stdout.contains("is now active"), "{requested}");
    let status = sb.status_json();
    let rows = key_rows(&status, "guarded");
    assert_eq!(
        row(&rows, "ES256", "active").kid,
        active.kid,
        "a young next key is not activated by `rotate`"
    );
    // status says when (published_at + publish_lead) and why it waits.
    assert_eq!(
        timestamp(&keyset_status(&status, "guarded")["next_rotation"]),
        Some(next.published_at + 60),
        "the requested rotation waits for publish_lead: {status}"
    );
    sb.cli(&["status", "guarded"])
        .ok()
        .stdout_has(&["publish_lead"]);

    // `rotate --now`: at once, with a warning about cached JWKS.
    let forced = sb.cli(&["rotate", "guarded", "--now"]).ok();
    forced.stderr_has(&["warning", &next.kid, "verifier_cache_ttl"]);
    forced.stdout_has(&[&format!("{} is now active", next.kid)]);
    let rows = key_rows(&sb.status_json(), "guarded");
    assert_eq!(row(&rows, "ES256", "active").kid, next.kid);
    assert_eq!(row(&rows, "ES256", "retired").kid, active.kid);
    await_signer(
        &mut daemon,
        "guarded's signing_dir to switch to the forced key",
        &guarded_signing,
        &next.kid,
    );

    // `rotate` of a young key is carried out by the daemon once the key is
    // publish_lead old (or at once, if the machine was slow enough for it
    // to be old already).
    let rows = key_rows(&sb.status_json(), "quick");
    let (rsa_active, rsa_next) = (
        row(&rows, "RS256", "active").clone(),
        row(&rows, "RS256", "next").clone(),
    );
    let requested = sb.cli(&["rotate", "quick", "--alg", "RS256"]).ok();
    let activated = daemon.until("the requested RS256 rotation", LONG, || {
        let rows = key_rows(&sb.status_json(), "quick");
        let now_active = row(&rows, "RS256", "active");
        if now_active.kid == rsa_next.kid {
            Ok(now_active.clone())
        } else {
            Err(format!("{rows:?}"))
        }
    });
    let activated_at = activated.activated_at.expect("activated_at");
    assert!(
        activated_at >= rsa_next.published_at + PUBLISH_LEAD,
        "activated before publish_lead: {activated:?} ({requested})"
    );
    let rows = key_rows(&sb.status_json(), "quick");
    assert_eq!(row(&rows, "RS256", "retired").kid, rsa_active.kid);
    assert_eq!(
        row(&rows, "ES256", "active").retired_at,
        None,
        "--alg RS256 leaves ES256 alone"
    );

    // `rotate` once the next key is publish_lead old: activated at once.
    let rows = key_rows(&sb.status_json(), "quick");
    let (active, next) = (
        row(&rows, "ES256", "active").clone(),
        row(&rows, "ES256", "next").clone(),
    );
    let rsa_active = row(&rows, "RS256", "active").kid.clone();
    let ready_at = (next.published_at + PUBLISH_LEAD) as f64;
    daemon.until(
        "quick's next ES256 key to be publish_lead old",
        LONG,
        || {
            if now_unix() >= ready_at + 0.2 {
                Ok(())
            } else {
                Err("younger than publish_lead".into())
            }
        },
    );
    let rotated = sb.cli(&["rotate", "quick", "--alg", "ES256"]).ok();
    rotated.stdout_has(&[&format!("{} is now active", next.kid)]);
    assert!(
        !rotated.stderr.contains("warning"),
        "no warning once publish_lead has passed: {rotated}"
    );
    let rows = key_rows(&sb.status_json(), "quick");
    assert_eq!(row(&rows, "ES256", "active").kid, next.kid);
    assert_eq!(row(&rows, "ES256", "retired").kid, active.kid);
    assert_eq!(
        row(&rows, "RS256", "active").kid,
        rsa_active,
        "--alg ES256 leaves RS256 alone"
    );
    await_signer(
        &mut daemon,
        "quick's signing_dir to switch to the rotated key",
        &quick_signing,
        &next.kid,
    );

    // `revoke` of the active key: gone from the JWKS and the store, the
    // next key signs at once.
    let rows = key_rows(&sb.status_json(), "quick");
    let (victim, successor) = (
        row(&rows, "ES256", "active").clone(),
        row(&rows, "ES256", "next").clone(),
    );
    let victim_pem = read_signer(&quick_signing, "ES256")
        .expect("the active key")
        .pem;
    let victim_pem_lines: Vec<String> = String::from_utf8(victim_pem)
        .expect("PEM is text")
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 20)
        .map(str::to_string)
        .collect();
    let revoked = sb
        .cli(&[
            "revoke",
            "--reason",
            "key leaked in a test",
            "quick",
            "--",
            &victim.kid,
        ])
        .ok();
    revoked.stdout_has(&[
        "revoked",
        &victim.kid,
        &format!("{} is now active", successor.kid),
    ]);
    daemon.until("the revoked key to leave the served JWKS", LONG, || {
        let kids = jwks_kids(&get_ok(&jwks_url(&sb, "quick"))?.body);
        if kids.contains(&victim.kid) || !kids.contains(&successor.kid) {
            Err(format!("served {kids:?}"))
        } else {
            Ok(())
        }
    });
    await_signer(
        &mut daemon,
        "signing_dir to hold the successor",
        &quick_signing,
        &successor.kid,
    );
    let rows = key_rows(&sb.status_json(), "quick");
    assert!(
        rows.iter().all(|r| r.kid != victim.kid),
        "the revoked key is gone from status"
    );
    assert_eq!(row(&rows, "ES256", "active").kid, successor.kid);
    let fresh_next = row(&rows, "ES256", "next");
    assert!(
        fresh_next.kid != successor.kid && fresh_next.kid != victim.kid,
        "a new next key"
    );
    let doc = store_doc(&sb, "quick");
    let stored_kids: Vec<&str> = doc["keys"]
        .as_array()
        .expect("stored keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid"))
        .collect();
    assert!(
        !stored_kids.contains(&victim.kid.as_str()),
        "the revoked key is gone from the store: {stored_kids:?}"
    );
    let stored_text = fs::read_to_string(sb.store_file("quick")).expect("the store file");
    for line in &victim_pem_lines {
        assert!(
            !stored_text.contains(line),
            "the revoked private key is still in the store"
        );
    }
    // An audit record without key material remains (SPEC §1).
    let audit = doc["audit"].as_array().expect("an audit trail");
    let record = audit
        .iter()
        .find(|r| r["kid"] == victim.kid.as_str() && r.to_string().contains("revoke"))
        .unwrap_or_else(|| panic!("no revoke audit record for {}: {audit:?}", victim.kid));
    assert!(
        record.to_string().contains("key leaked in a test"),
        "the audit keeps the reason: {record}"
    );
    assert!(!record.to_string().contains("PRIVATE KEY"), "{record}");

    // Revoking a retired key: gone at once, the active key stays.
    let rows = key_rows(&sb.status_json(), "guarded");
    let (old_key, current) = (
        row(&rows, "ES256", "retired").clone(),
        row(&rows, "ES256", "active").clone(),
    );
    sb.cli(&["revoke", "guarded", "--", &old_key.kid]).ok();
    daemon.until("the revoked retired key to leave the JWKS", LONG, || {
        let kids = jwks_kids(&get_ok(&jwks_url(&sb, "guarded"))?.body);
        if kids.contains(&old_key.kid) {
            Err(format!("{kids:?}"))
        } else {
            Ok(())
        }
    });
    let rows = key_rows(&sb.status_json(), "guarded");
    assert_eq!(row(&rows, "ES256", "active").kid, current.kid);
    assert!(rows.iter().all(|r| r.state != "retired"), "{rows:?}");

    // The same revoke again (its first answer lost, say): already done, so
    // it succeeds and changes nothing.
    let before = fs::read(sb.store_file("guarded")).expect("the store file");
    sb.cli(&["revoke", "guarded", "--", &old_key.kid])
        .ok()
        .stdout_has(&["already revoked", &old_key.kid]);
    assert_eq!(
        fs::read(sb.store_file("guarded")).expect("the store file"),
        before
    );

    // Unknown kid or keyset: usage errors, nothing changes.
    let before = fs::read(sb.store_file("quick")).expect("the store file");
    sb.cli(&["revoke", "quick", "no-such-kid"])
        .exits(2)
        .stderr_has(&["no-such-kid"]);
    sb.cli(&["revoke", "nope", "--", &successor.kid])
        .exits(2)
        .stderr_has(&["nope"]);
    assert_eq!(
        fs::read(sb.store_file("quick")).expect("the store file"),
        before
    );
    daemon.assert_alive();
}

/// A kid is base64url: one in 64 starts with '-'. `revoke KEYSET KID`
/// (SPEC §6) must take it as the KID, not as an option, or an operator
/// cannot revoke such a key the way the docs say.
#[test]
fn revoke_takes_a_kid_that_starts_with_a_hyphen() {
    let sb = Sandbox::new();
    sb.write_config(&keyset_block("default", &["ES256"], STEADY, ""));
    sb.cli(&["rotate"]).ok();
    let before = fs::read(sb.store_file("default")).expect("the store document");
    // No such key: the answer must be about the kid, not about an option.
    let out = sb.cli(&["revoke", "default", "-no-such-kid"]).exits(2);
    out.stderr_has(&["-no-such-kid"]);
    assert_eq!(
        fs::read(sb.store_file("default")).expect("the store document"),
        before
    );
}

// ---- 5. a corrupted store document ----------------------------------------------

#[test]
fn corrupted_store_document_is_reported_never_overwritten_and_isolated() {
    let sb = Sandbox::new();
    sb.write_config(&format!(
        "{}{}{}",
        keyset_block("good", &["ES256"], STEADY, ""),
        keyset_block("bad", &["ES256"], STEADY, ""),
        keyset_block("future", &["ES256"], STEADY, "")
    ));
    fs::create_dir_all(sb.store_dir()).expect("create the store folder");
    fs::set_permissions(sb.store_dir(), fs::Permissions::from_mode(0o700)).expect("chmod");
    let garbage =
        b"{\"schema_version\": 1, \"keyset\": \"bad\", \"keys\": [ this is not JSON\n".to_vec();
    let future = b"{\"schema_version\": 99, \"keyset\": \"future\", \"keys\": []}\n".to_vec();
    fs::write(sb.store_file("bad"), &garbage).expect("write garbage");
    fs::write(sb.store_file("future"), &future).expect("write a future document");
    let bad_path = sb.store_file("bad").display().to_string();
    let future_path = sb.store_file("future").display().to_string();

    let mut daemon = sb.spawn(&[]);
    daemon.until("the good keyset to be served", LONG, || {
        get_ok(&jwks_url(&sb, "good")).map(drop)
    });
    // Several passes over the broken documents.
    daemon.until(
        "repeated reconcile errors for both broken keysets",
        LONG,
        || {
            assert_eq!(
                fs::read(sb.store_file("bad")).expect("bad.json"),
                garbage,
                "the corrupted document was overwritten"
            );
            assert_eq!(
                fs::read(sb.store_file("future")).expect("future.json"),
                future,
                "the future document was overwritten"
            );
            let text = get_ok(&sb.url("/metrics"))?.text();
            let errors = |k| {
                metric(&text, "keyroll_reconcile_errors_total", &[("keyset", k)]).unwrap_or(0.0)
            };
            if errors("bad") >= 2.0 && errors("future") >= 2.0 {
                Ok(())
            } else {
                Err(text)
            }
        },
    );
    let stderr = daemon.stderr();
    assert!(
        stderr.contains(&bad_path),
        "the log names {bad_path}:\n{}",
        tail(&stderr)
    );
    assert!(
        stderr.contains(&future_path),
        "the log names {future_path}:\n{}",
        tail(&stderr)
    );
    assert_eq!(
        fs::read(sb.store_file("bad")).expect("bad.json"),
        garbage,
        "the corrupted document is never overwritten"
    );
    assert_eq!(
        fs::read(sb.store_file("future")).expect("future.json"),
        future,
        "an unknown schema is never overwritten"
    );

    assert_eq!(get(&jwks_url(&sb, "bad")).expect("GET").status, 404);
    assert_eq!(get(&jwks_url(&sb, "future")).expect("GET").status, 404);
    let ready = get(&sb.url("/readyz")).expect("GET /readyz");
    assert_eq!(
        ready.status, 503,
        "not every keyset is published: {ready:?}"
    );
    assert!(ready.text().contains("bad"), "{ready:?}");
    let text = metrics_text(&sb);
    assert_eq!(
        metric(
            &text,
            "keyroll_reconcile_errors_total",
            &[("keyset", "good")]
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        jwks_kids(&get_ok(&jwks_url(&sb, "good")).expect("GET good").body).len(),
        2
    );

    // The CLI reports it the same way and writes nothing either.
    sb.cli(&["status"]).exits(1).stderr_has(&[&bad_path]);
    sb.cli(&["status", "--json"])
        .exits(1)
        .stderr_has(&[&bad_path]);
    sb.cli(&["status", "future"])
        .exits(1)
        .stderr_has(&[&future_path, "99"]);
    sb.cli(&["status", "good"]).ok();
    sb.cli(&["jwks", "bad"]).exits(1).stderr_has(&[&bad_path]);
    sb.cli(&["rotate", "bad", "--now"])
        .exits(1)
        .stderr_has(&[&bad_path]);
    assert_eq!(fs::read(sb.store_file("bad")).expect("bad.json"), garbage);
    assert_eq!(
        fs::read(sb.store_file("future")).expect("future.json"),
        future
    );
    let mut names: Vec<String> = fs::read_dir(sb.store_dir())
        .expect("list the store")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["bad.json", "future.json", "good.json"],
        "no stray files in the store"
    );
    daemon.assert_alive();
}

// ---- 5b. downtime: the store unreachable, the schedule missed ----------------

#[test]
fn unreachable_store_keeps_serving_the_last_jwks_and_removes_nothing() {
    let sb = Sandbox::new();
    sb.write_config(&keyset_block("default", &["ES256"], STEADY, ""));
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    let well_known = sb.url("/.well-known/jwks.json");
    let served_before = get_ok(&well_known).expect("GET the JWKS").body;
    let store_file = sb.store_file("default");
    let stored = fs::read(&store_file).expect("the store document");

    // The document becomes unreadable (a link to a folder), atomically.
    let elsewhere = sb.path("elsewhere");
    fs::create_dir(&elsewhere).expect("create a folder");
    let link = sb.store_dir().join("default.json.link");
    std::os::unix::fs::symlink(&elsewhere, &link).expect("make a symlink");
    fs::rename(&link, &store_file).expect("swap the document for the link");
    let errors = || {
        metric(
            &metrics_text(&sb),
            "keyroll_reconcile_errors_total",
            &[("keyset", "default")],
        )
        .unwrap_or(0.0)
    };
    daemon.until(
        "reconcile errors while the store is unreadable",
        LONG,
        || {
            let now = errors();
            if now >= 2.0 {
                Ok(())
            } else {
                Err(format!("{now} errors"))
            }
        },
    );
    let stderr = daemon.stderr();
    assert!(
        stderr.contains(&*store_file.to_string_lossy()),
        "the log names the document:\n{}",
        tail(&stderr)
    );
    assert_eq!(
        get_ok(&well_known).expect("GET the JWKS").body,
        served_before,
        "the last JWKS is still served"
    );
    assert_eq!(
        get(&sb.url("/readyz")).expect("readyz").status,
        200,
        "a valid JWKS is still served"
    );
    assert_eq!(get(&sb.url("/healthz")).expect("healthz").status, 200);

    // Back: the same keys, nothing regenerated or removed.
    let restored = sb.store_dir().join("default.json.restore");
    fs::write(&restored, &stored).expect("write the document back");
    fs::set_permissions(&restored, fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::rename(&restored, &store_file).expect("restore the document");
    let restored_at = now_unix();
    daemon.until(
        "a successful reconcile after the store is back",
        LONG,
        || {
            let last = metric(
                &metrics_text(&sb),
                "keyroll_last_reconcile_success_timestamp_seconds",
                &[("keyset", "default")],
            )
            .unwrap_or(0.0);
            if last >= restored_at.ceil() + 1.0 {
                Ok(())
            } else {
                Err(format!("last success {last}"))
            }
        },
    );
    assert_eq!(
        fs::read(&store_file).expect("the store document"),
        stored,
        "nothing changed in the store"
    );
    assert_eq!(
        get_ok(&well_known).expect("GET the JWKS").body,
        served_before
    );
    daemon.assert_alive();
}

#[test]
fn a_restart_after_missed_rotations_rotates_each_slot_once() {
    let sb = Sandbox::new();
    sb.write_config(&keyset_block("default", &ALGS, STEADY, ""));
    // Keys made five rotation periods ago, as if the daemon had been down.
    sb.cli(&["rotate"]).ok();
    let store_file = sb.store_file("default");
    let mut doc = store_doc(&sb, "default");
    let five_hours_ago = |value: &Value| -> Value {
        let t = chrono::DateTime::parse_from_rfc3339(value.as_str().expect("a timestamp"))
            .expect("RFC 3339");
        json!((t - chrono::Duration::hours(5))
            .to_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    };
    for key in doc["keys"].as_array_mut().expect("stored keys") {
        for field in ["created_at", "published_at", "activated_at"] {
            if !key[field].is_null() {
                key[field] = five_hours_ago(&key[field]);
            }
        }
    }
    fs::write(
        &store_file,
        serde_json::to_vec_pretty(&doc).expect("serialize"),
    )
    .expect("rewrite the document");
    let before = key_rows(&sb.status_json(), "default");

    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    let rows = daemon.until("the overdue rotation", LONG, || {
        let rows = key_rows(&sb.status_json(), "default");
        if rows.iter().filter(|r| r.state == "retired").count() == 2 {
            Ok(rows)
        } else {
            Err(format!("{rows:?}"))
        }
    });
    let rotated_at = ALGS
        .iter()
        .map(|alg| {
            row(&rows, alg, "active")
                .activated_at
                .expect("activated_at")
        })
        .max()
        .expect("two slots");
    // Long enough for a fresh next key to pass publish_lead, and then some
    // passes: a daemon catching up tick by tick would rotate again here.
    daemon.until(
        "publish_lead and a few passes after the rotation",
        LONG,
        || {
            if now_unix() >= (rotated_at + PUBLISH_LEAD + 3) as f64 {
                Ok(())
            } else {
                Err("waiting".into())
            }
        },
    );
    let rows = key_rows(&sb.status_json(), "default");
    for alg in ALGS {
        assert_eq!(
            row(&rows, alg, "active").kid,
            row(&before, alg, "next").kid,
            "the waiting next key took over"
        );
        assert_eq!(
            row(&rows, alg, "retired").kid,
            row(&before, alg, "active").kid,
            "one rotation, not one per missed tick: {rows:?}"
        );
        let rotations = metric(
            &metrics_text(&sb),
            "keyroll_rotations_total",
            &[("keyset", "default"), ("alg", alg), ("trigger", "schedule")],
        );
        assert_eq!(rotations, Some(1.0), "{alg}");
    }
    let next_rotation = timestamp(&keyset_status(&sb.status_json(), "default")["next_rotation"])
        .expect("next_rotation");
    assert!(
        next_rotation >= rotated_at + 3600 - 1,
        "the schedule restarts from the rotation: {next_rotation} vs {rotated_at}"
    );
    daemon.assert_alive();
}

// ---- 6. unwritable outputs ---------------------------------------------------------

#[test]
fn unwritable_outputs_are_refused_at_startup() {
    let sb = Sandbox::new();
    let blocker = sb.path("not-a-folder");
    fs::write(&blocker, "a regular file").expect("write a file");
    let existing_dir = sb.path("a-folder");
    fs::create_dir(&existing_dir).expect("create a folder");
    let cases = [
        (
            outputs(Some(&blocker.join("jwks.json")), None),
            "keysets[default].jwks_file",
        ),
        (
            outputs(None, Some(&blocker.join("signing"))),
            "keysets[default].signing_dir",
        ),
        (
            outputs(Some(&existing_dir), None),
            "keysets[default].jwks_file",
        ),
    ];
    for (extra, key) in cases {
        sb.write_config(&keyset_block("default", &["ES256"], STEADY, &extra));
        for command in ["validate", "run"] {
            sb.cli(&[command]).exits(2).stderr_has(&[key]);
        }
    }
    assert!(!sb.store_dir().exists(), "a refused run creates no store");
}

#[test]
fn outputs_that_would_overwrite_the_store_or_each_other_are_refused() {
    let sb = Sandbox::new();
    let mut daemon = {
        sb.write_config(&keyset_block("default", &["ES256"], STEADY, ""));
        sb.spawn(&[])
    };
    wait_ready(&mut daemon, &sb);
    let stored = fs::read(sb.store_file("default")).expect("the stored keyset");

    // A jwks_file over the keyset document would replace every private key
    // with the public JWKS; `..` in the path does not hide it.
    let sneaky = sb.store_dir().join("..").join("store").join("default.json");
    let over_store = keyset_block("default", &["ES256"], STEADY, &outputs(Some(&sneaky), None));
    sb.write_config(&over_store);
    for command in ["validate", "run"] {
        sb.cli(&[command])
            .exits(2)
            .stderr_has(&["keysets[default].jwks_file", "inside the store folder"]);
    }
    // The same config on SIGHUP is refused too, and the running one kept.
    daemon.signal("HUP");
    let log_path = daemon.log_path();
    daemon.until("the refused reload to be logged", LONG, || {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("config reload failed") && log.contains("inside the store folder") {
            Ok(())
        } else {
            Err("no reload error yet".to_string())
        }
    });
    daemon.assert_alive();
    get_ok(&jwks_url(&sb, "default")).expect("still serving");
    assert_eq!(
        fs::read(sb.store_file("default")).unwrap(),
        stored,
        "the keyset document is intact"
    );

    // Two keysets sharing one output would overwrite each other.
    let shared = sb.path("shared.jwks.json");
    let both = format!(
        "{}{}",
        keyset_block("a", &["ES256"], STEADY, &outputs(Some(&shared), None)),
        keyset_block("b", &["ES256"], STEADY, &outputs(Some(&shared), None)),
    );
    sb.write_config(&both);
    sb.cli(&["validate"])
        .exits(2)
        .stderr_has(&["keysets[b].jwks_file", "also keysets[a].jwks_file"]);
}

#[test]
fn unwritable_jwks_file_at_runtime_keeps_http_serving_and_counts_errors() {
    let sb = Sandbox::new();
    let public_dir = sb.path("public");
    let jwks_file = public_dir.join("default.jwks.json");
    sb.write_config(&keyset_block(
        "default",
        &["ES256"],
        STEADY,
        &outputs(Some(&jwks_file), None),
    ));
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    daemon.until("jwks_file to be written", LONG, || {
        fs::read(&jwks_file).map(drop).map_err(|e| e.to_string())
    });
    let errors = || -> f64 {
        metric(
            &metrics_text(&sb),
            "keyroll_reconcile_errors_total",
            &[("keyset", "default")],
        )
        .expect("the error counter")
    };
    assert_eq!(errors(), 0.0);
    let served_before = get_ok(&sb.url("/.well-known/jwks.json")).expect("GET the JWKS");

    // The folder of jwks_file becomes a regular file: every write fails.
    fs::remove_dir_all(&public_dir).expect("remove the output folder");
    fs::write(&public_dir, "in the way").expect("put a file in the way");
    daemon.until("reconcile errors to be counted", LONG, || {
        let now = errors();
        if now >= 2.0 {
            Ok(())
        } else {
            Err(format!("{now} errors"))
        }
    });
    let stderr = daemon.stderr();
    assert!(
        stderr.lines().any(|l| l.contains("ERROR")
            && l.contains("jwks_file")
            && l.contains(&*public_dir.to_string_lossy())),
        "an error naming jwks_file and the failing path is logged:\n{}",
        tail(&stderr)
    );
    let served = get_ok(&sb.url("/.well-known/jwks.json")).expect("GET the JWKS");
    assert_eq!(
        served.body, served_before.body,
        "HTTP keeps serving the JWKS"
    );
    assert_eq!(get(&sb.url("/healthz")).expect("healthz").status, 200);
    assert_eq!(
        get(&sb.url("/readyz")).expect("readyz").status,
        200,
        "a valid JWKS is still served"
    );

    // A rotation still reaches HTTP while the file cannot be written.
    let rotated = sb.cli(&["rotate", "--now"]).ok();
    let new_active = key_rows(&sb.status_json(), "default")
        .into_iter()
        .find(|r| r.state == "active")
        .expect("an active key")
        .kid;
    assert!(rotated.stdout.contains(&new_active), "{rotated}");
    daemon.until("HTTP to serve the rotated JWKS", LONG, || {
        let body = get_ok(&sb.url("/.well-known/jwks.json"))?.body;
        if jwks_kids(&body).first() == Some(&new_active) {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&body).into_owned())
        }
    });

    // Once the path is usable again, the file catches up.
    fs::remove_file(&public_dir).expect("remove the blocker");
    daemon.until(
        "jwks_file to be rewritten with the served bytes",
        LONG,
        || {
            let served = get_ok(&sb.url("/.well-known/jwks.json"))?.body;
            let file = fs::read(&jwks_file).map_err(|e| e.to_string())?;
            if file == served {
                Ok(())
            } else {
                Err("differs".into())
            }
        },
    );
    daemon.assert_alive();
}

// ---- 7. SIGHUP and SIGTERM ------------------------------------------------------

#[test]
fn sighup_reloads_the_config_and_keeps_the_old_one_when_invalid() {
    let sb = Sandbox::new();
    let signing_dir = sb.path("signing/default");
    let signing = outputs(None, Some(&signing_dir));
    sb.write_config(&keyset_block("default", &ALGS, STEADY, &signing));
    let mut daemon = sb.spawn(&[]);
    wait_ready(&mut daemon, &sb);
    daemon.until("the RS256 key in signing_dir", LONG, || {
        read_signer(&signing_dir, "RS256")
    });
    assert_eq!(get(&jwks_url(&sb, "second")).expect("GET").status, 404);
    let rows = key_rows(&sb.status_json(), "default");
    let rsa_kids: Vec<String> = rows
        .iter()
        .filter(|r| r.alg == "RS256")
        .map(|r| r.kid.clone())
        .collect();
    assert_eq!(rsa_kids.len(), 2);

    // Reload: a keyset is added, an algorithm is dropped.
    let reloaded = format!(
        "{}{}",
        keyset_block("default", &["ES256"], STEADY, &signing),
        keyset_block("second", &["ES256"], STEADY, "")
    );
    sb.write_config(&reloaded);
    let reload_sent = now_unix();
    daemon.signal("HUP");
    daemon.until("the added keyset to be served", LONG, || {
        get_ok(&jwks_url(&sb, "second")).map(drop)
    });
    daemon.until("/readyz to cover both keysets", LONG, || {
        get_ok(&sb.url("/readyz")).map(drop)
    });
    let second_kids = jwks_kids(&get_ok(&jwks_url(&sb, "second")).expect("GET second").body);

    // The dropped algorithm's keys retire now and stay published for
    // retire_grace; nothing vanishes abruptly (SPEC §1).
    let retired = daemon.until("the RS256 keys to retire", LONG, || {
        let rows = key_rows(&sb.status_json(), "default");
        let rsa: Vec<KeyRow> = rows.into_iter().filter(|r| r.alg == "RS256").collect();
        if rsa.len() == 2 && rsa.iter().all(|r| r.state == "retired") {
            Ok(rsa)
        } else {
            Err(format!("{rsa:?}"))
        }
    });
    for r in &retired {
        let retired_at = r.retired_at.expect("retired_at");
        assert!(
            retired_at as f64 >= reload_sent.floor(),
            "retired on reload: {r:?}"
        );
        assert_eq!(r.remove_at, Some(retired_at + RETIRE_GRACE), "{r:?}");
    }
    let remove_at = retired
        .iter()
        .filter_map(|r| r.remove_at)
        .min()
        .expect("remove_at") as f64;
    daemon.until("RS256 to leave signing_dir", LONG, || {
        let gone = ["RS256.pem", "RS256.kid"]
            .iter()
            .all(|f| !signing_dir.join(f).exists());
        let json = fs::read(signing_dir.join("signing.json")).map_err(|e| e.to_string())?;
        let kids = parse_json(&json, "signing.json")["keys"]
            .as_array()
            .map(Vec::len);
        if gone && kids == Some(1) {
            Ok(())
        } else {
            Err(format!("RS256 files still there or {kids:?} keys"))
        }
    });
    let removed_seen_at = daemon.until(
        "the RS256 keys to leave the JWKS after remove_at",
        LONG,
        || {
            let before = now_unix();
            let kids = jwks_kids(&get_ok(&sb.url("/.well-known/jwks.json"))?.body);
            let after = now_unix();
            let present = rsa_kids.iter().filter(|k| kids.contains(k)).count();
            if after < remove_at {
                assert_eq!(
                    present, 2,
                    "a retired RS256 key left the JWKS before its remove_at: {kids:?}"
                );
            }
            if present == 0 {
                Ok(before)
            } else {
                Err(format!("{present} RS256 keys still served"))
            }
        },
    );
    assert!(
        removed_seen_at + 1.0 >= remove_at,
        "removed at {removed_seen_at}, remove_at {remove_at}"
    );

    // An invalid config on SIGHUP: logged, the running config stays.
    let text = sb.write_config(&format!(
        "{reloaded}{}",
        keyset_block("third", &["ES256"], STEADY, "bogus_setting = 1\n")
    ));
    let line = text
        .lines()
        .position(|l| l.starts_with("bogus_setting"))
        .expect("the bad line")
        + 1;
    daemon.signal("HUP");
    let log = daemon.log_path();
    daemon.until("the failed reload to be logged", LONG, || {
        let stderr = fs::read_to_string(&log).map_err(|e| e.to_string())?;
        let logged = stderr
            .lines()
            .any(|l| l.contains("bogus_setting") && l.contains(&format!("line {line}")));
        if logged {
            Ok(())
        } else {
            Err("not logged yet".into())
        }
    });
    let last_success = || {
        metric(
            &metrics_text(&sb),
            "keyroll_last_reconcile_success_timestamp_seconds",
            &[("keyset", "second")],
        )
        .expect("last success of the second keyset")
    };
    let after_failed_reload = last_success();
    daemon.until("the old config to keep reconciling", LONG, || {
        if last_success() > after_failed_reload {
            Ok(())
        } else {
            Err("no reconcile since".into())
        }
    });
    assert_eq!(
        jwks_kids(&get_ok(&jwks_url(&sb, "second")).expect("GET second").body),
        second_kids
    );
    assert_eq!(get(&jwks_url(&sb, "third")).expect("GET third").status, 404);
    assert_eq!(get(&sb.url("/readyz")).expect("readyz").status, 200);

    // A keyset dropped from the config is no longer served.
    sb.write_config(&keyset_block("default", &["ES256"], STEADY, &signing));
    daemon.signal("HUP");
    daemon.until("the dropped keyset to be gone", LONG, || {
        match get(&jwks_url(&sb, "second"))?.status {
            404 => Ok(()),
            other => Err(format!("HTTP {other}")),
        }
    });
    assert_eq!(get(&sb.url("/readyz")).expect("readyz").status, 200);
    get_ok(&sb.url("/.well-known/jwks.json")).expect("the default keyset is still served");

    // SIGTERM stops it within 5s even with a client stuck mid-request.
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", sb.port)).expect("connect");
    std::io::Write::write_all(
        &mut stalled,
        b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n",
    )
    .expect("send half a request");
    daemon.stop_cleanly("TERM");
    drop(stalled);
    assert!(
        get(&sb.url("/healthz")).is_err(),
        "nothing listens after the exit"
    );
}

// ---- 8. secrets hygiene ---------------------------------------------------------

/// Private key material seen anywhere keyroll legitimately keeps it.
#[derive(Default)]
struct Secrets {
    /// Base64 lines of PEM bodies.
    pem_lines: BTreeSet<String>,
    /// Private JWK members (d, p, q, dp, dq, qi).
    jwk_values: BTreeSet<String>,
}

impl Secrets {
    fn add_pem(&mut self, pem: &str) {
        for line in pem.lines().map(str::trim) {
            if !line.starts_with("-----") && line.len() >= 20 {
                self.pem_lines.insert(line.to_string());
            }
        }
    }

    /// Everything in the store document, signing_dir and signing.json now.
    fn collect(&mut self, sb: &Sandbox, keyset: &str, signing_dir: &Path) {
        if let Ok(bytes) = fs::read(sb.store_file(keyset)) {
            let doc = parse_json(&bytes, "the store document");
            for key in doc["keys"].as_array().into_iter().flatten() {
                self.add_pem(
                    key["private_key_pem"]
                        .as_str()
                        .expect("stored keys have a PEM"),
                );
            }
        }
        for alg in ALGS {
            if let Ok(pem) = fs::read_to_string(signing_dir.join(format!("{alg}.pem"))) {
                self.add_pem(&pem);
            }
        }
        if let Ok(bytes) = fs::read(signing_dir.join("signing.json")) {
            let json = parse_json(&bytes, "signing.json");
            for key in json["keys"].as_array().into_iter().flatten() {
                for member in PRIVATE_MEMBERS {
                    if let Some(value) = key[member].as_str() {
                        self.jwk_values.insert(value.to_string());
                    }
                }
            }
        }
    }
}

#[test]
fn no_private_key_material_in_any_output_and_logs_are_structured() {
    let sb = Sandbox::new();
    let jwks_file = sb.path("public/default.jwks.json");
    let signing_dir = sb.path("signing/default");
    sb.write_config(&keyset_block(
        "default",
        &ALGS,
        FAST,
        &outputs(Some(&jwks_file), Some(&signing_dir)),
    ));
    let json_debug = ["--log-format", "json", "--log-level", "debug"];
    let mut daemon = sb.spawn(&json_debug);
    wait_ready(&mut daemon, &sb);
    let mut secrets = Secrets::default();
    let mut public_texts: Vec<String> = Vec::new();
    let first_kid = daemon
        .until("the first ES256 key in signing_dir", LONG, || {
            read_signer(&signing_dir, "ES256")
        })
        .kid;
    // Through one scheduled rotation, collecting the keys on the way.
    daemon.until("a scheduled rotation", LONG, || {
        secrets.collect(&sb, "default", &signing_dir);
        if let Ok(reply) = get_ok(&sb.url("/.well-known/jwks.json")) {
            public_texts.push(reply.text());
        }
        let kid = read_signer(&signing_dir, "ES256")?.kid;
        if kid != first_kid {
            Ok(())
        } else {
            Err("not rotated yet".into())
        }
    });

    // Every command, with debug logs.
    let mut outs: Vec<Out> = Vec::new();
    let mut run = |sb: &Sandbox, secrets: &mut Secrets, args: &[&str]| -> Out {
        secrets.collect(sb, "default", &signing_dir);
        let mut full: Vec<&str> = json_debug.to_vec();
        full.extend_from_slice(args);
        let out = sb.cli(&full);
        secrets.collect(sb, "default", &signing_dir);
        outs.push(out.clone());
        out
    };
    run(&sb, &mut secrets, &["validate"]).ok();
    run(&sb, &mut secrets, &["plan"]).ok();
    run(&sb, &mut secrets, &["status"]).ok();
    let status = run(&sb, &mut secrets, &["status", "--json"]).ok();
    let jwks_out = run(&sb, &mut secrets, &["jwks"]).ok();
    public_texts.push(jwks_out.stdout.clone());
    run(&sb, &mut secrets, &["rotate"]).ok();
    run(&sb, &mut secrets, &["rotate", "--now"]).ok();
    let rows = key_rows(
        &serde_json::from_str(&status.stdout).expect("status JSON"),
        "default",
    );
    let next_kid = {
        let now = key_rows(&sb.status_json(), "default");
        row(&now, "RS256", "next").kid.clone()
    };
    run(
        &sb,
        &mut secrets,
        &["revoke", "--reason", "hygiene", "default", "--", &next_kid],
    )
    .ok();
    run(&sb, &mut secrets, &["revoke", "default", "no-such-kid"]).exits(2);
    run(&sb, &mut secrets, &["rotate", "--alg", "ES256"]).ok();
    // Plain (human) logs too.
    outs.push(sb.cli(&["status"]).ok());
    outs.push(sb.cli(&["rotate", "--now"]).ok());
    secrets.collect(&sb, "default", &signing_dir);
    daemon.until("the daemon to publish the CLI's changes", LONG, || {
        let served = get_ok(&sb.url("/.well-known/jwks.json"))?;
        public_texts.push(served.text());
        let printed = sb.cli(&["jwks"]).ok().stdout;
        if served.body == printed.as_bytes() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    let (exit, _) = daemon.stop("TERM");
    assert_eq!(exit.code(), Some(0));

    public_texts.push(fs::read_to_string(&jwks_file).expect("jwks_file"));
    // A PEM line that happens to lie wholly inside a public certificate
    // (RSA moduli are in both) is public, not a leak.
    let public_blob = public_texts.join("\n");
    let secret_lines: Vec<&String> = secrets
        .pem_lines
        .iter()
        .filter(|l| !public_blob.contains(l.as_str()))
        .collect();
    assert!(
        secret_lines.len() >= 8,
        "too few secrets collected to make the check meaningful: {}",
        secret_lines.len()
    );
    assert!(
        secrets.jwk_values.len() >= 8,
        "private JWK members collected: {}",
        secrets.jwk_values.len()
    );

    let mut texts: Vec<(String, String)> = vec![
        ("daemon stderr".into(), daemon.stderr()),
        ("daemon stdout".into(), daemon.stdout()),
    ];
    for out in &outs {
        texts.push((format!("stdout of `{}`", out.label), out.stdout.clone()));
        texts.push((format!("stderr of `{}`", out.label), out.stderr.clone()));
    }
    for text in &public_texts {
        texts.push(("a published JWKS".into(), text.clone()));
    }
    for (what, text) in &texts {
        assert!(
            !text.contains("PRIVATE KEY"),
            "{what} contains a PEM header:\n{text}"
        );
        for line in &secret_lines {
            assert!(
                !text.contains(line.as_str()),
                "{what} contains a line of a private key PEM"
            );
        }
        for value in &secrets.jwk_values {
            assert!(
                !text.contains(value.as_str()),
                "{what} contains a private JWK member"
            );
        }
    }
    for text in &public_texts {
        for jwk in jwks_keys(text.as_bytes()) {
            for member in PRIVATE_MEMBERS {
                assert!(
                    jwk.get(member).is_none(),
                    "the JWKS has private member {member}: {jwk}"
                );
            }
        }
    }

    // --log-format json: every line of the daemon's log is a JSON object, and
    // each key transition is one event with keyset, alg and kid.
    let mut events: Vec<Value> = Vec::new();
    for line in daemon.stderr().lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
        assert!(value.is_object(), "{line}");
        if value["event"]
            .as_str()
            .is_some_and(|e| e.starts_with("key."))
        {
            events.push(value);
        }
    }
    let activated: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "key.activated")
        .collect();
    for event in &activated {
        assert_eq!(event["keyset"], "default", "{event}");
        assert!(
            ALGS.contains(&event["alg"].as_str().expect("alg")),
            "{event}"
        );
        assert!(
            event["kid"].as_str().is_some_and(|k| k.len() == 43),
            "a kid: {event}"
        );
    }
    let activated_kids: BTreeSet<&str> = activated
        .iter()
        .map(|e| e["kid"].as_str().expect("kid"))
        .collect();
    assert!(
        activated_kids.contains(first_kid.as_str()),
        "bootstrap activation of {first_kid} logged: {activated_kids:?}"
    );
    let bootstrap_rows: Vec<&KeyRow> = rows.iter().filter(|r| r.state == "active").collect();
    for r in bootstrap_rows {
        assert!(
            activated_kids.contains(r.kid.as_str()),
            "activation of {} logged",
            r.kid
        );
    }
    for name in ["key.created", "key.retired"] {
        assert!(
            events.iter().any(|e| e["event"] == name),
            "a {name} event is logged"
        );
    }
    // The CLI logs its own transitions the same way.
    let revoke_log = &outs
        .iter()
        .find(|o| o.label.contains("hygiene"))
        .expect("the revoke run")
        .stderr;
    let revoked_event = revoke_log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "key.revoked")
        .unwrap_or_else(|| panic!("no key.revoked event in:\n{revoke_log}"));
    assert_eq!(
        (
            revoked_event["keyset"].as_str(),
            revoked_event["kid"].as_str()
        ),
        (Some("default"), Some(next_kid.as_str()))
    );
    assert_eq!(revoked_event["alg"], "RS256");
}

// ---- 9. file modes ---------------------------------------------------------------

#[test]
fn files_get_their_modes_whatever_the_umask() {
    let sb = Sandbox::new();
    let jwks_file = sb.path("public/default.jwks.json");
    let signing_dir = sb.path("run/signing");
    sb.write_config(&keyset_block(
        "default",
        &["ES256"],
        STEADY,
        &outputs(Some(&jwks_file), Some(&signing_dir)),
    ));

    // The CLI bootstraps the store under a wide-open umask.
    sb.cli_with_umask("000", &["rotate"]).ok();
    assert_eq!(mode(&sb.store_dir()), 0o700, "the store folder");
    assert_eq!(mode(&sb.store_file("default")), 0o600, "the store document");

    let mut daemon = sb.spawn_with_umask("000");
    wait_ready(&mut daemon, &sb);
    daemon.until("the outputs to be written", LONG, || {
        for path in [jwks_file.clone(), signing_dir.join("signing.json")] {
            fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    });
    for name in ["ES256.pem", "ES256.kid", "signing.json"] {
        assert_eq!(mode(&signing_dir.join(name)), 0o600, "signing_dir/{name}");
    }
    assert!(
        !signing_dir.join("RS256.pem").exists(),
        "no files for an unconfigured algorithm"
    );
    assert_eq!(mode(&signing_dir), 0o700, "signing_dir itself");
    assert_eq!(mode(&jwks_file), 0o644, "jwks_file");

    // Outputs are rewritten only when their content changes: a watcher sees
    // no churn while the keys stay the same.
    let identity = |path: &Path| {
        let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        (meta.ino(), meta.mtime(), meta.mtime_nsec())
    };
    let watched = [
        jwks_file.clone(),
        signing_dir.join("ES256.pem"),
        signing_dir.join("signing.json"),
    ];
    let before: Vec<_> = watched.iter().map(|p| identity(p)).collect();
    let last_success = || {
        metric(
            &metrics_text(&sb),
            "keyroll_last_reconcile_success_timestamp_seconds",
            &[("keyset", "default")],
        )
        .expect("last success")
    };
    let start = last_success();
    daemon.until("a few more reconcile passes", LONG, || {
        if last_success() >= start + 2.0 {
            Ok(())
        } else {
            Err("waiting".into())
        }
    });
    let after: Vec<_> = watched.iter().map(|p| identity(p)).collect();
    assert_eq!(
        before, after,
        "unchanged outputs were rewritten: {watched:?}"
    );

    // A rotation through the CLI (same umask) rewrites the store and the daemon the outputs.
    let before = read_signer(&signing_dir, "ES256")
        .expect("the active key")
        .kid;
    sb.cli_with_umask("000", &["rotate", "--now"]).ok();
    daemon.until("the rotated key in signing_dir", LONG, || {
        let kid = read_signer(&signing_dir, "ES256")?.kid;
        if kid != before {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert_eq!(mode(&sb.store_file("default")), 0o600);
    for name in ["ES256.pem", "ES256.kid", "signing.json"] {
        assert_eq!(
            mode(&signing_dir.join(name)),
            0o600,
            "signing_dir/{name} after a rotation"
        );
    }
    assert_eq!(mode(&jwks_file), 0o644);
    for entry in fs::read_dir(sb.store_dir()).expect("list the store") {
        let path = entry.expect("an entry").path();
        assert_eq!(mode(&path) & 0o077, 0, "{} is private", path.display());
    }
    daemon.assert_alive();
}
