//! Fuzzes the stored-document parser (`KeysetDoc::parse`) with arbitrary
//! text. Beyond "never panics", it checks what keeps the store safe:
//! an accepted document survives a save/load round trip unchanged, the
//! planner never fails or panics on it, and whatever the planner does to it
//! still passes the structure check a load enforces (otherwise the next load
//! would refuse the keyset). A refusal never quotes a long base64 run of the
//! input (it could be private key material); `document_secrets` checks that
//! property with real keys planted in every field.
#![no_main]

use std::sync::OnceLock;

use chrono::TimeZone;
use keyroll::clock::Timestamp;
use keyroll::config::{Config, ConfigSource, KeysetPolicy, ParseContext};
use keyroll::document::KeysetDoc;
use keyroll::key::{Alg, NewKey, SecretPem};
use keyroll::planner::{self, Action};
use libfuzzer_sys::fuzz_target;

const KEYSET: &str = "default";
const LOCATION: &str = "/store/default.json";
/// Longer than any base64 word an error may show: a thumbprint keyroll
/// computed is 43 characters; errors quote nothing from the input.
const SECRET_RUN: usize = 44;

fn t0() -> Timestamp {
    chrono::Utc.with_ymd_and_hms(2030, 1, 7, 12, 0, 0).unwrap()
}

fn policy() -> &'static KeysetPolicy {
    static POLICY: OnceLock<KeysetPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let text = "[[keysets]]\nname = \"default\"\nalgorithms = [\"ES256\", \"RS256\"]\n\
                    rotate_every = \"1d\"\ntoken_ttl = \"1h\"\njwks_cache_ttl = \"5m\"\npropagation = \"1m\"\n";
        let context = ParseContext {
            state_directory: None,
            now: t0(),
        };
        Config::parse(text, ConfigSource::Embedded, &context)
            .expect("the fuzz policy is valid")
            .keysets
            .remove(0)
    })
}

fn is_base64ish(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
}

/// Long base64 runs of `message` that also occur in `input`.
fn quotes_secret(message: &str, input: &str) -> Option<String> {
    message
        .split(|c: char| !c.is_ascii() || !is_base64ish(c as u8))
        .filter(|run| run.len() >= SECRET_RUN)
        .find(|run| input.contains(*run))
        .map(str::to_string)
}

/// Fake keys for `apply`: the planner only needs distinct kids.
fn new_key(counter: &mut u32, alg: Alg) -> Result<NewKey, std::convert::Infallible> {
    *counter += 1;
    Ok(NewKey {
        kid: format!("fuzz-new-{counter}"),
        alg,
        private_key_pem: SecretPem::new(zeroize::Zeroizing::new(String::new())),
        certificate: String::new(),
    })
}

fn plan_and_apply(doc: &KeysetDoc, now: Timestamp, action: Option<&Action>) {
    let policy = policy();
    let plan = match planner::plan(now, doc, policy, action) {
        Ok(plan) => plan,
        Err(e) => {
            assert!(action.is_some(), "the daemon's plan failed: {e}");
            return;
        }
    };
    let mut after = doc.clone();
    let mut counter = 0;
    let _ = planner::apply(&mut after, &plan, policy, &mut |alg| {
        new_key(&mut counter, alg)
    });
    if let Err(detail) = after.check_structure(KEYSET) {
        panic!(
            "the planner made a document a load refuses: {detail}\nplan: {:?}",
            plan.steps
        );
    }
}

fuzz_target!(|data: &[u8]| {
    // The file store refuses bytes that are not UTF-8 before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match KeysetDoc::parse(text, KEYSET, LOCATION) {
        Err(error) => {
            let shown = error.to_string();
            assert!(shown.contains(LOCATION), "{shown}");
            if let Some(run) = quotes_secret(&shown, text) {
                panic!("the error quotes {run:?} from the input: {shown}");
            }
        }
        Ok(doc) => {
            let saved = doc.to_json();
            let again = KeysetDoc::parse(&saved, KEYSET, LOCATION)
                .unwrap_or_else(|e| panic!("a saved document does not load again: {e}"));
            assert_eq!(again, doc, "the round trip changed the document");
            let first_kid = doc.keys.first().map(|k| k.kid.clone()).unwrap_or_default();
            let actions = [
                None,
                Some(Action::Rotate {
                    alg: None,
                    force: true,
                }),
                Some(Action::Revoke {
                    kid: first_kid,
                    reason: String::new(),
                }),
            ];
            for now in [t0(), t0() + chrono::Duration::days(365 * 50)] {
                for action in &actions {
                    plan_and_apply(&doc, now, action.as_ref());
                }
            }
        }
    }
});
