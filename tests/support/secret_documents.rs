//! Stored documents with key material planted in every field, and the check
//! that no refusal shows any of it (SPEC §7: private keys never in errors).
//! Shared by `tests/document_secrets.rs` (every field, every mutation, in
//! `cargo test`) and the fuzz target `document_secrets` (any mix of them,
//! or free text with the secrets spliced in).

use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;

use chrono::TimeZone;
use keyroll::clock::Timestamp;
use keyroll::document::{
    AuditEvent, AuditRecord, KeyState, KeysetDoc, LossRecord, OrphanKey, StoredKey, Trigger,
};
use keyroll::key::{self, Alg, CryptoKeys, KeyFactory, PrivateJwk, PrivateKey};
use serde_json::Value;

pub const KEYSET: &str = "default";
pub const LOCATION: &str = "/store/default.json";
/// A recognisable secret of no key format.
pub const MARKER: &str = "KEYROLL-SECRET-MARKER-5f0c1a9e";
/// The same, for number positions: fits a u64, not the u32 of a schema version.
pub const NUMBER_MARKER: u64 = 7_300_418_259_331_187_451;
/// A secret window this long in an error is a leak; no word keyroll writes
/// (field names, thumbprints aside) is one.
const WINDOW: usize = 12;

fn t0() -> Timestamp {
    chrono::Utc.with_ymd_and_hms(2030, 1, 7, 12, 0, 0).unwrap()
}

/// A valid document with real keys, and every secret it holds.
pub struct Fixture {
    pub doc: KeysetDoc,
    pub value: Value,
    /// Texts to plant: a private key's PEM, its JWK `d`, the marker, and
    /// the same wrapped in the quote characters serde uses in messages.
    pub plants: Vec<String>,
    windows: HashSet<String>,
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(Fixture::new)
}

fn stored(alg: Alg, state: KeyState, at: Timestamp) -> StoredKey {
    let new = key::generate(alg, 2048, KEYSET, at).expect("key generation");
    let later = at + chrono::Duration::hours(1);
    StoredKey {
        kid: new.kid,
        alg,
        state,
        created_at: at,
        published_at: at,
        activated_at: (state != KeyState::Next).then_some(later),
        retired_at: (state == KeyState::Retired).then_some(later),
        remove_at: (state == KeyState::Retired).then_some(later + chrono::Duration::days(1)),
        ready_at: Some(later),
        longest_grace_seconds: Some(86_400),
        certificate: new.certificate,
        private_key_pem: new.private_key_pem,
    }
}

/// The JWK `d` of a stored key.
fn jwk_d(key: &StoredKey) -> String {
    let parsed = PrivateKey::from_pem(key.alg, &key.private_key_pem).unwrap();
    let jwk = serde_json::to_value(PrivateJwk::from_private(&parsed)).unwrap();
    jwk["d"].as_str().unwrap().to_string()
}

impl Fixture {
    fn new() -> Self {
        let at = t0();
        let keys = vec![
            stored(Alg::ES256, KeyState::Active, at),
            stored(Alg::ES256, KeyState::Next, at),
            stored(Alg::ES256, KeyState::Retired, at),
            stored(Alg::RS256, KeyState::Active, at),
        ];
        let gone = stored(Alg::ES256, KeyState::Retired, at);
        let gone_jwk = CryptoKeys
            .public_jwk(gone.alg, &gone.private_key_pem)
            .unwrap()
            .with_certificate(&gone.certificate);
        let mut doc = KeysetDoc::new(KEYSET);
        doc.orphans.push(OrphanKey::from_public(
            &gone_jwk,
            at,
            at + chrono::Duration::days(1),
        ));
        doc.pending_rotations = BTreeMap::from([(Alg::ES256, at)]);
        doc.lost = Some(LossRecord {
            detected_at: at,
            orphaned_keys: 1,
        });
        let (kid, alg, times) = keys[2].identity();
        let record = AuditRecord {
            at,
            event: AuditEvent::Retired,
            kid: kid.to_string(),
            alg,
            trigger: Trigger::Manual,
            reason: "by hand".into(),
            key: times,
        };
        doc.push_audit(record);
        doc.keys = keys;
        let value: Value = serde_json::from_str(&doc.to_json()).unwrap();
        let parsed = KeysetDoc::parse(&doc.to_json(), KEYSET, LOCATION).expect("valid");
        parsed
            .public_jwks(&CryptoKeys, LOCATION)
            .expect("valid keys");

        let pem = doc.keys[0].private_key_pem.expose().to_string();
        let d = jwk_d(&doc.keys[0]);
        let mut plants = vec![pem.clone(), d.clone(), MARKER.to_string()];
        for quote in ["`", "\"", "'", "\n"] {
            plants.push(format!("{quote}{d}"));
            plants.push(format!("{d}{quote}"));
            plants.push(format!("{quote}{MARKER}{quote}"));
        }
        // Every secret the document holds, cut into windows.
        let mut secrets = vec![MARKER.to_string(), NUMBER_MARKER.to_string()];
        for key in doc.keys.iter().chain([&gone]) {
            secrets.push(jwk_d(key));
            secrets.extend(
                key.private_key_pem
                    .expose()
                    .lines()
                    .filter(|line| !line.starts_with("-----"))
                    .map(str::to_string),
            );
        }
        let windows = secrets
            .iter()
            .flat_map(|secret| {
                let chars: Vec<char> = secret.chars().collect();
                chars
                    .windows(WINDOW)
                    .map(|w| w.iter().collect::<String>())
                    .collect::<Vec<_>>()
            })
            .collect();
        Fixture {
            doc: parsed,
            value,
            plants,
            windows,
        }
    }

    /// A piece of a secret that `text` shows, if any.
    pub fn leaked(&self, text: &str) -> Option<String> {
        let chars: Vec<char> = text.chars().collect();
        chars
            .windows(WINDOW)
            .map(|w| w.iter().collect::<String>())
            .find(|w| self.windows.contains(w))
    }

    /// Parses `text` as the store would, then checks its keys as a load
    /// does; panics if any error (Display or Debug) shows a secret.
    pub fn check(&self, text: &str, what: &str) {
        let location = LOCATION;
        let shown = match KeysetDoc::parse(text, KEYSET, location) {
            Err(e) => vec![e.to_string(), format!("{e:?}")],
            Ok(doc) => {
                let mut shown = Vec::new();
                if let Err(e) = doc.public_jwks(&CryptoKeys, location) {
                    shown.extend([e.to_string(), format!("{e:?}")]);
                }
                for orphan in &doc.orphans {
                    if let Err(e) = orphan.public_jwk() {
                        shown.extend([e.to_string(), format!("{e:?}")]);
                    }
                }
                shown
            }
        };
        for shown in shown {
            if let Some(piece) = self.leaked(&shown) {
                panic!("{what}: the error shows {piece:?} of a secret:\n{shown}");
            }
        }
    }
}

/// Where a value sits in the fixture's JSON (a JSON pointer).
pub fn positions(value: &Value) -> Vec<String> {
    fn walk(value: &Value, at: String, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    walk(child, format!("{at}/{key}"), out);
                }
            }
            Value::Array(list) => {
                for (i, child) in list.iter().enumerate() {
                    walk(child, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
        out.push(at);
    }
    let mut out = Vec::new();
    walk(value, String::new(), &mut out);
    out
}

/// One way to plant a secret at a position.
#[derive(Clone, Copy, Debug)]
pub enum Mutation {
    /// The value becomes the secret, as a string (a wrong type for a
    /// number, an object or a list; an unknown name for an enum).
    AsString,
    /// The value becomes the number marker.
    AsNumber,
    /// The value becomes the secret as bare text: not JSON at all.
    AsBareText,
    /// An object gains a field named by the secret (value: the secret).
    AsFieldName,
    /// The value's field name is replaced by the secret.
    Renamed,
    /// The value becomes a list holding the secret.
    InList,
}

pub const MUTATIONS: [Mutation; 6] = [
    Mutation::AsString,
    Mutation::AsNumber,
    Mutation::AsBareText,
    Mutation::AsFieldName,
    Mutation::Renamed,
    Mutation::InList,
];

const BARE: &str = "\u{1}bare-text\u{1}";

/// The fixture's text with `plant` put at `at` by `how`; `None` when the
/// mutation does not apply there (a field name at the top of a list).
pub fn mutated(value: &Value, at: &str, how: Mutation, plant: &str) -> Option<String> {
    let mut value = value.clone();
    let target = value.pointer_mut(at)?;
    match how {
        Mutation::AsString => *target = Value::String(plant.to_string()),
        Mutation::AsNumber => *target = Value::from(NUMBER_MARKER),
        Mutation::InList => *target = Value::Array(vec![Value::String(plant.to_string())]),
        Mutation::AsBareText => *target = Value::String(BARE.to_string()),
        Mutation::AsFieldName => {
            target
                .as_object_mut()?
                .insert(plant.to_string(), Value::String(plant.to_string()));
        }
        Mutation::Renamed => {
            let (parent, name) = at.rsplit_once('/')?;
            let object = value.pointer_mut(parent)?.as_object_mut()?;
            let moved = object.remove(name)?;
            object.insert(plant.to_string(), moved);
        }
    }
    let text = serde_json::to_string_pretty(&value).unwrap();
    Some(match how {
        Mutation::AsBareText => {
            let quoted = serde_json::to_string(BARE).unwrap();
            text.replace(&quoted, plant)
        }
        _ => text,
    })
}
