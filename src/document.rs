//! The stored keyset document (SPEC §3): every key of one keyset with its
//! private key, timestamps and state, pending manual rotations, the audit
//! trail, and a schema version. Parsing is strict: a document that does not
//! parse, has an unknown schema, or breaks a structural rule is refused, so
//! that nothing ever plans on (and overwrites) a document it misread.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::key::{Alg, KeyFactory, PublicJwk, SecretPem};

mod error;
pub use error::{
    DocumentError, Expected, FieldPath, JsonKind, KeyAt, OrphanError, ParseProblem, PathSegment,
    ProblemKind, SchemaFound, StructureError,
};

/// Schema 2 added `ready_at` and `longest_grace_seconds` per key, `orphans`
/// and `lost` (SPEC C2, C3).
/// A schema 1 document is read as schema 2 in memory (the new fields start
/// empty) and written as 2 only at its next real change.
pub const SCHEMA_VERSION: u32 = 2;
const SCHEMAS_READ: [u64; 2] = [1, 2];

/// Audit records kept per keyset, newest last. Bounded because a document
/// must stay small (an AWS secret holds at most 64 KiB); at the default
/// weekly rotation of two algorithms this is about a year of history.
pub const AUDIT_LIMIT: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Next,
    Active,
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Next => "next",
            KeyState::Active => "active",
            KeyState::Retired => "retired",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a transition happened; also the `trigger` label of the rotation metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// An empty slot got its first keys.
    Bootstrap,
    /// A new `next` key after the previous one was activated or revoked.
    Replenish,
    /// The schedule fell due.
    Schedule,
    /// `keyroll rotate`.
    Manual,
    /// `keyroll rotate --now`, ignoring `publish_lead`.
    Forced,
    /// `keyroll revoke`.
    Revoke,
    /// The algorithm (or the whole keyset) was removed from the config.
    ConfigRemoved,
    /// The stored document went missing after it was published (SPEC C2).
    DocumentLost,
    /// A retired key's `remove_at` passed.
    GraceEnded,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Bootstrap => "bootstrap",
            Trigger::Replenish => "replenish",
            Trigger::Schedule => "schedule",
            Trigger::Manual => "manual",
            Trigger::Forced => "forced",
            Trigger::Revoke => "revoke",
            Trigger::ConfigRemoved => "config-removed",
            Trigger::DocumentLost => "document-lost",
            Trigger::GraceEnded => "grace-ended",
        }
    }
}

/// The lifecycle timestamps of one key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyTimes {
    pub created_at: Option<Timestamp>,
    pub published_at: Option<Timestamp>,
    pub activated_at: Option<Timestamp>,
    pub retired_at: Option<Timestamp>,
    pub remove_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    pub kid: String,
    pub alg: Alg,
    pub state: KeyState,
    pub created_at: Timestamp,
    pub published_at: Timestamp,
    pub activated_at: Option<Timestamp>,
    pub retired_at: Option<Timestamp>,
    pub remove_at: Option<Timestamp>,
    /// The earliest activation: `published_at` plus the longest
    /// `publish_lead` in effect since publication (SPEC C3). `None` in
    /// documents written before schema 2: then the current lead applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Timestamp>,
    /// The longest `retire_grace` (seconds) in effect while the key was
    /// active (SPEC C3): a token signed under a longer `token_ttl` outlives
    /// a later, shorter one, so the key's grace may not shrink with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longest_grace_seconds: Option<u64>,
    /// The self-signed certificate (DER, base64), published as `x5c`.
    pub certificate: String,
    #[serde(deserialize_with = "secret_pem")]
    pub private_key_pem: SecretPem,
}

/// Reads a PEM straight from the document text into its zeroizing buffer.
fn secret_pem<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<SecretPem, D::Error> {
    crate::secret_json::secret_string(deserializer).map(SecretPem::new)
}

/// A public key that verifiers were shown before the stored document went
/// missing (SPEC C2). Its private key is gone with the document; the public
/// key stays in the JWKS until `remove_at`, so tokens already signed with
/// it keep verifying.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrphanKey {
    pub kid: String,
    pub alg: Alg,
    /// RSA modulus and exponent, or P-256 coordinates (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// The certificate it was published with, if any (base64 DER).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    pub retired_at: Timestamp,
    pub remove_at: Timestamp,
}

impl OrphanKey {
    /// What an audit record keeps of the key.
    pub fn identity(&self) -> (&str, Alg, KeyTimes) {
        let times = KeyTimes {
            retired_at: Some(self.retired_at),
            remove_at: Some(self.remove_at),
            ..KeyTimes::default()
        };
        (&self.kid, self.alg, times)
    }

    /// Keeps a published public key. Its kid is checked when the JWK is
    /// rebuilt ([`OrphanKey::public_jwk`]).
    pub fn from_public(jwk: &PublicJwk, retired_at: Timestamp, remove_at: Timestamp) -> Self {
        OrphanKey {
            kid: jwk.kid.clone(),
            alg: jwk.alg,
            n: jwk.n.clone(),
            e: jwk.e.clone(),
            x: jwk.x.clone(),
            y: jwk.y.clone(),
            certificate: jwk.x5c.as_ref().and_then(|chain| chain.first().cloned()),
            retired_at,
            remove_at,
        }
    }

    /// The JWK as it is published again, or why it cannot be: its kid
    /// must be the thumbprint of its parameters.
    pub fn public_jwk(&self) -> Result<PublicJwk, OrphanError> {
        let jwk = match (self.alg, &self.n, &self.e, &self.x, &self.y) {
            (Alg::RS256, Some(n), Some(e), None, None) => PublicJwk::rsa(n.clone(), e.clone()),
            (Alg::ES256, None, None, Some(x), Some(y)) => PublicJwk::ec(x.clone(), y.clone()),
            _ => return Err(OrphanError::Shape { alg: self.alg }),
        };
        if jwk.kid != self.kid {
            return Err(OrphanError::KidMismatch {
                thumbprint: jwk.kid,
            });
        }
        Ok(jwk)
    }
}

/// SPEC C2: the document was found missing for a keyset that had been
/// published. Kept until an operator acts on the keyset (`rotate` or
/// `revoke`), so the condition stays visible in `status` and the metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossRecord {
    pub detected_at: Timestamp,
    /// How many published public keys were kept as orphans.
    pub orphaned_keys: usize,
}

impl StoredKey {
    /// What an audit record keeps of the key: no key material.
    pub fn identity(&self) -> (&str, Alg, KeyTimes) {
        (&self.kid, self.alg, self.times())
    }

    pub fn times(&self) -> KeyTimes {
        KeyTimes {
            created_at: Some(self.created_at),
            published_at: Some(self.published_at),
            activated_at: self.activated_at,
            retired_at: self.retired_at,
            remove_at: self.remove_at,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditEvent {
    Created,
    Activated,
    Retired,
    Removed,
    Revoked,
}

impl AuditEvent {
    /// The structured log event name (SPEC §5).
    pub fn log_name(self) -> &'static str {
        match self {
            AuditEvent::Created => "key.created",
            AuditEvent::Activated => "key.activated",
            AuditEvent::Retired => "key.retired",
            AuditEvent::Removed => "key.removed",
            AuditEvent::Revoked => "key.revoked",
        }
    }
}

/// One key transition. Holds no key material, so it outlives the key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub at: Timestamp,
    pub event: AuditEvent,
    pub kid: String,
    pub alg: Alg,
    pub trigger: Trigger,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The key's timestamps as they were at this event.
    pub key: KeyTimes,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysetDoc {
    pub schema_version: u32,
    pub keyset: String,
    pub keys: Vec<StoredKey>,
    /// `keyroll rotate` requests waiting for the next key's `publish_lead`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pending_rotations: BTreeMap<Alg, Timestamp>,
    #[serde(default)]
    pub audit: Vec<AuditRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphans: Vec<OrphanKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<LossRecord>,
}

impl KeysetDoc {
    pub fn new(keyset: &str) -> Self {
        KeysetDoc {
            schema_version: SCHEMA_VERSION,
            keyset: keyset.to_string(),
            keys: Vec::new(),
            pending_rotations: BTreeMap::new(),
            audit: Vec::new(),
            orphans: Vec::new(),
            lost: None,
        }
    }

    /// Parses and checks the structure of a stored document. `location`
    /// (a path, a secret name) names it in every error; no error holds any
    /// of `text` (see [`DocumentError`]).
    pub fn parse(text: &str, keyset: &str, location: &str) -> Result<Self, DocumentError> {
        let malformed = |problem| DocumentError::Malformed {
            location: location.to_string(),
            problem,
        };
        // The schema version is checked before the shape: a future schema
        // must be reported as such, not as a confusing field error.
        match error::read::<error::SchemaVersion>(text)
            .map_err(malformed)?
            .0
        {
            Some(version) if SCHEMAS_READ.contains(&version) => {}
            Some(found) => {
                return Err(DocumentError::UnknownSchema {
                    location: location.to_string(),
                    found: error::SchemaFound::of(found),
                })
            }
            None => return Err(malformed(error::SchemaVersion::missing())),
        }
        let mut doc: KeysetDoc = error::read(text).map_err(malformed)?;
        // Schema 1 is schema 2 without its additions, which default to empty.
        doc.schema_version = SCHEMA_VERSION;
        doc.check_structure(keyset)
            .map_err(|problem| DocumentError::Inconsistent {
                location: location.to_string(),
                problem,
            })?;
        Ok(doc)
    }

    /// The rules every stored document obeys (SPEC §1, I1 and the states).
    pub fn check_structure(&self, keyset: &str) -> Result<(), StructureError> {
        if self.keyset != keyset {
            return Err(StructureError::OtherKeyset {
                expected: keyset.to_string(),
            });
        }
        let mut kids: HashMap<&str, KeyAt> = HashMap::new();
        let mut slots: BTreeMap<(Alg, KeyState), usize> = BTreeMap::new();
        let keys = self.keys.iter().enumerate().map(|(index, key)| {
            let at = KeyAt {
                state: Some(key.state),
                index,
                alg: key.alg,
            };
            (at, key.kid.as_str())
        });
        let orphans = self.orphans.iter().enumerate().map(|(index, orphan)| {
            let at = KeyAt {
                state: None,
                index,
                alg: orphan.alg,
            };
            (at, orphan.kid.as_str())
        });
        for (at, kid) in keys.chain(orphans) {
            if kid.is_empty() {
                return Err(StructureError::EmptyKid { at });
            }
            if let Some(first) = kids.insert(kid, at) {
                return Err(StructureError::DuplicateKid { at, first });
            }
        }
        for (index, key) in self.keys.iter().enumerate() {
            *slots.entry((key.alg, key.state)).or_default() += 1;
            let shape_ok = match key.state {
                KeyState::Next => key.activated_at.is_none() && key.retired_at.is_none(),
                KeyState::Active => key.activated_at.is_some() && key.retired_at.is_none(),
                KeyState::Retired => key.retired_at.is_some() && key.remove_at.is_some(),
            };
            if !shape_ok {
                return Err(StructureError::StateTimes {
                    at: KeyAt {
                        state: Some(key.state),
                        index,
                        alg: key.alg,
                    },
                });
            }
        }
        for (index, orphan) in self.orphans.iter().enumerate() {
            orphan
                .public_jwk()
                .map_err(|problem| StructureError::Orphan {
                    at: KeyAt {
                        state: None,
                        index,
                        alg: orphan.alg,
                    },
                    problem,
                })?;
        }
        for ((alg, state), count) in slots {
            if count > 1 && state != KeyState::Retired {
                return Err(StructureError::CrowdedSlot { alg, state, count });
            }
        }
        Ok(())
    }

    /// Checks every private key against its kid and returns the public JWKs,
    /// in the order of `keys`.
    pub fn public_jwks(
        &self,
        keys: &dyn KeyFactory,
        location: &str,
    ) -> Result<Vec<PublicJwk>, DocumentError> {
        self.keys
            .iter()
            .enumerate()
            .map(|(index, key)| {
                let at = KeyAt {
                    state: Some(key.state),
                    index,
                    alg: key.alg,
                };
                let inconsistent = |problem| DocumentError::Inconsistent {
                    location: location.to_string(),
                    problem,
                };
                let jwk = keys
                    .public_jwk(key.alg, &key.private_key_pem)
                    .map_err(|source| inconsistent(StructureError::Key { at, source }))?;
                if jwk.kid != key.kid {
                    return Err(inconsistent(StructureError::KidMismatch {
                        at,
                        thumbprint: jwk.kid,
                    }));
                }
                Ok(jwk)
            })
            .collect()
    }

    /// The stored form. It holds private keys, so it is written once into a
    /// buffer of its exact size (never grown, so no copy is left behind in
    /// a freed allocation) and zeroized on drop.
    pub fn to_json(&self) -> zeroize::Zeroizing<String> {
        crate::secret_json::to_string_pretty(self)
    }

    /// The stored form, within `limit` bytes when one is given: the oldest
    /// audit records are dropped until it fits (an AWS secret holds 64 KiB,
    /// and 200 records of RSA-4096 keysets would not). Keys are never
    /// dropped; `Err` gives the size without any audit record, when even
    /// that does not fit.
    pub fn to_json_within(
        &mut self,
        limit: Option<usize>,
    ) -> Result<zeroize::Zeroizing<String>, usize> {
        let Some(limit) = limit else {
            return Ok(self.to_json());
        };
        loop {
            let text = self.to_json();
            if text.len() <= limit {
                return Ok(text);
            }
            if self.audit.is_empty() {
                return Err(text.len());
            }
            // A pretty-printed record is a few hundred bytes: drop about as
            // many as the excess needs, at least one, oldest first.
            let excess = text.len() - limit;
            let drop = (excess / 256).clamp(1, self.audit.len());
            self.audit.drain(..drop);
        }
    }

    /// The latest instant any writer recorded in this document: a local
    /// clock further behind it than `clock_skew` is wrong (SPEC C6).
    pub fn newest_timestamp(&self) -> Option<Timestamp> {
        let key_times = self.keys.iter().flat_map(|key| {
            [
                Some(key.created_at),
                Some(key.published_at),
                key.activated_at,
                key.retired_at,
            ]
        });
        let orphan_times = self.orphans.iter().map(|orphan| Some(orphan.retired_at));
        let others = self
            .audit
            .iter()
            .map(|record| Some(record.at))
            .chain(self.pending_rotations.values().map(|at| Some(*at)))
            .chain(std::iter::once(self.lost.as_ref().map(|l| l.detected_at)));
        key_times.chain(orphan_times).chain(others).flatten().max()
    }

    /// Whether verifiers may have seen this keyset: it holds keys or
    /// orphans, or its audit trail shows keys it once held. Only a keyset
    /// never published may bootstrap with a key active at once (SPEC §1).
    pub fn ever_published(&self) -> bool {
        !self.keys.is_empty() || !self.orphans.is_empty() || !self.audit.is_empty()
    }

    pub fn key(&self, alg: Alg, state: KeyState) -> Option<&StoredKey> {
        self.keys.iter().find(|k| k.alg == alg && k.state == state)
    }

    pub fn push_audit(&mut self, record: AuditRecord) {
        self.audit.push(record);
        if self.audit.len() > AUDIT_LIMIT {
            let excess = self.audit.len() - AUDIT_LIMIT;
            self.audit.drain(..excess);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(text: &str) -> DocumentError {
        KeysetDoc::parse(text, "default", "/x/default.json").unwrap_err()
    }

    fn malformed(text: &str) -> ParseProblem {
        match refusal(text) {
            DocumentError::Malformed { problem, .. } => problem,
            other => panic!("not a parse problem: {other}"),
        }
    }

    #[test]
    fn parse_errors_give_the_place_and_what_was_expected() {
        let secret = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg";
        let doc = format!(
            "{{\"schema_version\": 2, \"keyset\": \"default\",\n \"keys\": [{{\"kid\": \"k\", \"alg\": \"ES256\", \"state\": \"{secret}\"}}]}}"
        );
        let problem = malformed(&doc);
        assert_eq!(problem.kind, ProblemKind::BadValue);
        assert_eq!(problem.line, 2);
        assert_eq!(problem.path.to_string(), "keys[0].state");
        let text = refusal(&doc).to_string();
        assert!(
            text.contains("invalid value at keys[0].state, expected one of \"next\", \"active\", \"retired\", at line 2"),
            "{text}"
        );
        assert!(!text.contains(secret), "{text}");
    }

    #[test]
    fn an_unknown_field_is_located_and_never_named() {
        let secret = "`MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg";
        let doc =
            format!(r#"{{"schema_version": 2, "keyset": "default", "keys": [], "{secret}": 1}}"#);
        let problem = malformed(&doc);
        assert_eq!(problem.kind, ProblemKind::UnknownField);
        assert_eq!(problem.path.0, [PathSegment::Unknown]);
        let text = refusal(&doc).to_string();
        assert!(!text.contains("MIGH"), "{text}");
        assert!(
            text.contains("unknown field in the top level (its name is not shown), expected one of: schema_version, keyset, keys"),
            "{text}"
        );
    }

    #[test]
    fn wrong_types_missing_fields_and_syntax_are_told_apart() {
        let problem = malformed(r#"{"schema_version": 2, "keyset": "default", "keys": {}}"#);
        assert_eq!(problem.kind, ProblemKind::WrongType(Some(JsonKind::Object)));
        assert_eq!(problem.expected(), Some(Expected::Text("a list")));
        let problem = malformed(r#"{"schema_version": "2"}"#);
        assert_eq!(problem.kind, ProblemKind::WrongType(Some(JsonKind::String)));
        assert_eq!(problem.path.to_string(), "schema_version");
        let problem = malformed(r#"{"schema_version": 2, "keys": []}"#);
        assert_eq!(problem.kind, ProblemKind::MissingField(Some("keyset")));
        let problem = malformed(r#"{"schema_version": 2} x"#);
        assert_eq!(problem.kind, ProblemKind::Syntax("trailing characters"));
        let problem = malformed("[1]");
        assert_eq!(problem.kind, ProblemKind::WrongType(Some(JsonKind::List)));
        let problem = malformed(r#"{"keyset": "default"}"#);
        assert_eq!(
            problem.kind,
            ProblemKind::MissingField(Some("schema_version"))
        );
        // A PEM is read by keyroll's own decoder; its errors look the same.
        let problem = malformed(
            r#"{"schema_version": 2, "keyset": "default", "keys": [{"private_key_pem": 5}]}"#,
        );
        assert_eq!(problem.kind, ProblemKind::WrongType(Some(JsonKind::Number)));
        assert_eq!(problem.path.to_string(), "keys[0].private_key_pem");
        assert_eq!(
            problem.expected(),
            Some(Expected::Text("a PKCS#8 PEM private key, as a string"))
        );
    }

    #[test]
    fn structure_errors_name_keys_by_place_not_by_kid() {
        let long = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJaMRBqs0";
        let doc = format!(r#"{{"schema_version": 1, "keyset": "{long}", "keys": []}}"#);
        let text = refusal(&doc).to_string();
        assert!(!text.contains(long), "{text}");
        assert!(text.contains("another keyset than \"default\""), "{text}");
        let doc = KeysetDoc::new("default");
        assert!(doc.check_structure("default").is_ok());
    }

    #[test]
    fn unknown_schema_is_named() {
        let err =
            KeysetDoc::parse(r#"{"schema_version": 7}"#, "default", "/x/default.json").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/x/default.json") && text.contains("schema version 7"),
            "{text}"
        );
    }

    #[test]
    fn to_json_within_drops_the_oldest_audit_records_only() {
        let mut doc = KeysetDoc::new("default");
        let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        for i in 0..150 {
            doc.push_audit(AuditRecord {
                at: at + chrono::Duration::seconds(i),
                event: AuditEvent::Created,
                kid: format!("kid-{i:03}"),
                alg: Alg::ES256,
                trigger: Trigger::Schedule,
                reason: String::new(),
                key: KeyTimes::default(),
            });
        }
        let full = doc.to_json().len();
        assert_eq!(doc.clone().to_json_within(None).unwrap().len(), full);

        let limit = full / 2;
        let mut trimmed = doc.clone();
        let text = trimmed.to_json_within(Some(limit)).unwrap();
        assert!(
            text.len() <= limit && text.len() > limit / 2,
            "{} of {limit}",
            text.len()
        );
        assert_eq!(
            *text,
            *trimmed.to_json(),
            "the returned text is the trimmed document"
        );
        assert_eq!(
            trimmed.audit.last(),
            doc.audit.last(),
            "the newest record stays"
        );
        assert!(trimmed.audit.len() < doc.audit.len());

        // Nothing left to drop: the size without any record.
        let bare = KeysetDoc::new("default").to_json().len();
        assert_eq!(doc.clone().to_json_within(Some(bare - 1)), Err(bare));
    }
}
