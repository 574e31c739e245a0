//! The AWS store's stored form, schema 3: the keyset document with each
//! private key replaced by the name of the secret that holds it, plus the
//! keys whose secrets still have to be destroyed. Pure: no I/O. The rest of
//! keyroll only ever sees the document with its keys inline (schema 2);
//! [`split`] and [`join`] convert between the two.

use std::collections::{BTreeMap, BTreeSet};

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

/// The schema of a document whose private keys live in secrets of their own.
pub const STORED_SCHEMA: u64 = 3;
/// The schema every other part of keyroll reads and writes.
const INLINE_SCHEMA: u64 = crate::document::SCHEMA_VERSION as u64;
/// A key's field holding its private key, inline.
const PEM_FIELD: &str = "private_key_pem";
/// A key's field naming the secret that holds its private key (schema 3).
pub const REF_FIELD: &str = "private_key_secret";
/// Kids whose key secrets are dropped from the document but not yet
/// confirmed deleted (schema 3).
pub const DESTROYING_FIELD: &str = "destroying";

/// A private key taken out of a document, to be stored in its own secret.
pub struct KeyMaterial {
    pub kid: String,
    pub pem: Zeroizing<String>,
}

/// A document as it is to be stored: references only.
pub struct Split {
    /// The schema 3 object, without `destroying` (the store adds it).
    stored: Map<String, Value>,
    /// Every key's private key, in document order.
    pub keys: Vec<KeyMaterial>,
}

impl Split {
    pub fn kids(&self) -> BTreeSet<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
    }

    /// The text to store, with the keys still to destroy. Holds no key
    /// material.
    pub fn stored_text(&self, destroying: &BTreeSet<String>) -> String {
        let mut stored = self.stored.clone();
        if !destroying.is_empty() {
            stored.insert(
                DESTROYING_FIELD.to_string(),
                Value::Array(destroying.iter().cloned().map(Value::String).collect()),
            );
        }
        serde_json::to_string_pretty(&Value::Object(stored))
            .expect("a JSON object always serializes")
    }
}

/// Takes the private keys out of a schema 1 or 2 document, leaving each
/// key's secret name (`secret_of(kid)`) in their place. `None`: the text
/// is no schema 1 or 2 document with a `keys` list (tests store any text)
/// and is stored as it is.
///
/// The key material is moved out of the parsed tree into zeroizing
/// buffers. (serde_json's own scratch buffer, used for strings with escapes
/// while parsing, is freed without being zeroized.)
pub fn split(text: &str, secret_of: impl Fn(&str) -> String) -> Result<Option<Split>, FormError> {
    let Ok(Value::Object(mut doc)) = serde_json::from_str::<Value>(text) else {
        return Ok(None);
    };
    let inline_schema = doc
        .get("schema_version")
        .and_then(Value::as_u64)
        .is_some_and(|v| (1..=INLINE_SCHEMA).contains(&v));
    if !inline_schema || !doc.get("keys").is_some_and(Value::is_array) {
        scrub(&mut Value::Object(doc));
        return Ok(None);
    }
    let mut keys = Vec::new();
    let mut result = Ok(());
    if let Some(Value::Array(entries)) = doc.get_mut("keys") {
        for entry in entries.iter_mut() {
            match take_key(entry, &secret_of) {
                Ok(key) => keys.push(key),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
    }
    if let Err(e) = result {
        scrub(&mut Value::Object(doc));
        drop(keys);
        return Err(e);
    }
    doc.insert("schema_version".into(), Value::from(STORED_SCHEMA));
    Ok(Some(Split { stored: doc, keys }))
}

fn take_key(
    entry: &mut Value,
    secret_of: &impl Fn(&str) -> String,
) -> Result<KeyMaterial, FormError> {
    let Value::Object(key) = entry else {
        return Err(FormError::KeyNotAnObject);
    };
    let kid = match key.get("kid") {
        Some(Value::String(kid)) if is_kid(kid) => kid.clone(),
        _ => return Err(FormError::BadKid),
    };
    let pem = match key.remove(PEM_FIELD) {
        Some(Value::String(pem)) => Zeroizing::new(pem),
        Some(mut other) => {
            scrub(&mut other);
            return Err(FormError::BadPem { kid });
        }
        None => return Err(FormError::BadPem { kid }),
    };
    key.insert(REF_FIELD.to_string(), Value::String(secret_of(&kid)));
    Ok(KeyMaterial { kid, pem })
}

/// A kid as keyroll makes them: an RFC 7638 thumbprint, 43 base64url
/// characters. Anything else never names a secret.
pub fn is_kid(kid: &str) -> bool {
    kid.len() == 43
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Zeroizes every string of a tree before it is dropped: a document that is
/// stored as it is may still hold key material.
fn scrub(value: &mut Value) {
    match value {
        Value::String(s) => zeroize::Zeroize::zeroize(s),
        Value::Array(items) => items.iter_mut().for_each(scrub),
        Value::Object(map) => map.values_mut().for_each(scrub),
        _ => {}
    }
}

/// A schema 3 document as loaded: its references and pending destructions.
pub struct Referencing {
    doc: Map<String, Value>,
    /// kid → the secret holding its private key, in document order.
    pub refs: Vec<(String, String)>,
    pub destroying: BTreeSet<String>,
}

impl Referencing {
    pub fn kids(&self) -> BTreeSet<String> {
        self.refs.iter().map(|(kid, _)| kid.clone()).collect()
    }
}

/// Why a stored document cannot be read. Never quotes the document.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormError {
    #[error("a key entry is not a JSON object")]
    KeyNotAnObject,
    #[error("a key has no kid, or one keyroll never makes")]
    BadKid,
    #[error("key {kid}: its private key is missing or not a string")]
    BadPem { kid: String },
    #[error("key {kid}: it names no key secret, or a secret other than {expected}")]
    BadRef { kid: String, expected: String },
    #[error("{DESTROYING_FIELD} is not a list of kids")]
    BadDestroying,
}

/// Reads a stored text: `Some` for a schema 3 document (its references
/// checked against `secret_of`, so a tampered document can never make
/// keyroll read or delete any other secret), `None` for anything else,
/// which is handed on as it is.
pub fn referencing(
    text: &str,
    secret_of: impl Fn(&str) -> String,
) -> Result<Option<Referencing>, FormError> {
    let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(text) else {
        return Ok(None);
    };
    if doc.get("schema_version").and_then(Value::as_u64) != Some(STORED_SCHEMA) {
        return Ok(None);
    }
    let mut refs = Vec::new();
    for entry in doc
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Value::Object(key) = entry else {
            return Err(FormError::KeyNotAnObject);
        };
        let kid = match key.get("kid") {
            Some(Value::String(kid)) if is_kid(kid) => kid.clone(),
            _ => return Err(FormError::BadKid),
        };
        let expected = secret_of(&kid);
        if key.contains_key(PEM_FIELD)
            || key.get(REF_FIELD).and_then(Value::as_str) != Some(expected.as_str())
        {
            return Err(FormError::BadRef { kid, expected });
        }
        refs.push((kid, expected));
    }
    let destroying = match doc.get(DESTROYING_FIELD) {
        None => BTreeSet::new(),
        Some(Value::Array(kids)) => kids
            .iter()
            .map(|kid| match kid {
                Value::String(kid) if is_kid(kid) => Ok(kid.clone()),
                _ => Err(FormError::BadDestroying),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(FormError::BadDestroying),
    };
    Ok(Some(Referencing {
        doc,
        refs,
        destroying,
    }))
}

/// The document as the rest of keyroll reads it (schema 2, keys inline),
/// given each referenced key's private key. Written straight into one
/// zeroizing buffer sized beforehand, so no reallocation leaves a copy
/// behind.
pub fn join(doc: &Referencing, pems: &BTreeMap<String, Zeroizing<String>>) -> Zeroizing<String> {
    let view = Inline {
        doc: &doc.doc,
        pems,
    };
    // Pretty printing adds little; a PEM's line breaks double when escaped.
    let estimate = serde_json::to_string(&doc.doc).map_or(0, |s| s.len() * 2)
        + pems.values().map(|pem| pem.len() * 2).sum::<usize>()
        + 4096;
    let mut buffer = Zeroizing::new(Vec::with_capacity(estimate));
    serde_json::to_writer_pretty(&mut *buffer, &view).expect("a document always serializes");
    let bytes = std::mem::take(&mut *buffer);
    Zeroizing::new(String::from_utf8(bytes).expect("serde_json writes UTF-8"))
}

struct Inline<'a> {
    doc: &'a Map<String, Value>,
    pems: &'a BTreeMap<String, Zeroizing<String>>,
}

impl Serialize for Inline<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (field, value) in self.doc {
            match field.as_str() {
                "schema_version" => map.serialize_entry(field, &INLINE_SCHEMA)?,
                DESTROYING_FIELD => {}
                "keys" => map.serialize_entry(
                    field,
                    &InlineKeys {
                        keys: value.as_array().map(Vec::as_slice).unwrap_or_default(),
                        pems: self.pems,
                    },
                )?,
                _ => map.serialize_entry(field, value)?,
            }
        }
        map.end()
    }
}

struct InlineKeys<'a> {
    keys: &'a [Value],
    pems: &'a BTreeMap<String, Zeroizing<String>>,
}

impl Serialize for InlineKeys<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.keys.len()))?;
        for key in self.keys {
            seq.serialize_element(&InlineKey {
                key: key.as_object(),
                pems: self.pems,
            })?;
        }
        seq.end()
    }
}

struct InlineKey<'a> {
    key: Option<&'a Map<String, Value>>,
    pems: &'a BTreeMap<String, Zeroizing<String>>,
}

impl Serialize for InlineKey<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (field, value) in self.key.into_iter().flatten() {
            if field == REF_FIELD {
                let pem = self
                    .key
                    .and_then(|key| key.get("kid"))
                    .and_then(Value::as_str)
                    .and_then(|kid| self.pems.get(kid));
                if let Some(pem) = pem {
                    map.serialize_entry(PEM_FIELD, pem.as_str())?;
                }
            } else {
                map.serialize_entry(field, value)?;
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KID_A: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    const KID_B: &str = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";

    fn name(kid: &str) -> String {
        format!("p/ks/keys/{kid}")
    }

    fn inline_doc() -> String {
        format!(
            r#"{{"schema_version": 2, "keyset": "ks", "keys": [
                {{"kid": "{KID_A}", "alg": "ES256", "private_key_pem": "-----A-----\nline\n"}},
                {{"kid": "{KID_B}", "alg": "RS256", "private_key_pem": "-----B-----\n"}}
            ], "audit": []}}"#
        )
    }

    #[test]
    fn split_then_join_gives_the_same_document() {
        let split = split(&inline_doc(), name).unwrap().expect("split");
        let pems: BTreeMap<_, _> = split
            .keys
            .iter()
            .map(|k| (k.kid.clone(), k.pem.clone()))
            .collect();
        assert_eq!(pems[KID_A].as_str(), "-----A-----\nline\n");
        let stored = split.stored_text(&[KID_B.to_string()].into());
        assert!(!stored.contains("-----A"), "{stored}");
        assert!(stored.contains(&name(KID_A)) && stored.contains("\"schema_version\": 3"));

        let loaded = referencing(&stored, name).unwrap().expect("schema 3");
        assert_eq!(loaded.kids(), split.kids());
        assert_eq!(loaded.destroying, [KID_B.to_string()].into());
        let joined = join(&loaded, &pems);
        let original: Value = serde_json::from_str(&inline_doc()).unwrap();
        let back: Value = serde_json::from_str(&joined).unwrap();
        assert_eq!(back, original);
    }

    #[test]
    fn other_texts_are_left_as_they_are() {
        for text in [
            "not json",
            r#"{"schema_version": 1}"#,
            r#"{"schema_version": 99, "keys": [{"private_key_pem": "x"}]}"#,
        ] {
            assert!(split(text, name).unwrap().is_none(), "{text}");
            assert!(referencing(text, name).unwrap().is_none(), "{text}");
        }
    }

    #[test]
    fn a_reference_to_any_other_secret_is_refused() {
        let doc = format!(
            r#"{{"schema_version": 3, "keys": [{{"kid": "{KID_A}", "private_key_secret": "p/other"}}]}}"#
        );
        assert!(matches!(
            referencing(&doc, name),
            Err(FormError::BadRef { .. })
        ));
        let doc = r#"{"schema_version": 3, "keys": [{"kid": "../../x"}]}"#;
        assert!(matches!(referencing(doc, name), Err(FormError::BadKid)));
        let doc = r#"{"schema_version": 3, "keys": [], "destroying": ["x"]}"#;
        assert!(matches!(
            referencing(doc, name),
            Err(FormError::BadDestroying)
        ));
    }
}
