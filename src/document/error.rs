//! Why a stored document was refused, built so that no error can hold text
//! from the document: a tampered or misplaced field may be key material.
//! Every value here is a number, a name compiled into keyroll, or something
//! keyroll computed (a thumbprint); serde_json's own message, which quotes
//! the input, is only classified into a fixed category and dropped.

use std::fmt;

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_path_to_error::Segment;
use zeroize::Zeroize;

use super::{
    AuditEvent, AuditRecord, KeyState, KeyTimes, KeysetDoc, LossRecord, OrphanKey, StoredKey,
    Trigger, SCHEMA_VERSION,
};
use crate::key::{Alg, KeyError};

#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("{location}: not a keyroll keyset document ({problem}); it is left untouched")]
    Malformed {
        location: String,
        problem: ParseProblem,
    },
    #[error("{location}: schema version {found} is unknown to this keyroll (it knows {SCHEMA_VERSION}); it is left untouched")]
    UnknownSchema {
        location: String,
        found: SchemaFound,
    },
    #[error("{location}: {problem}; it is left untouched")]
    Inconsistent {
        location: String,
        problem: StructureError,
    },
}

/// An unknown schema version as shown: a number large enough to carry
/// anything (a key's bytes read as digits) is not shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaFound {
    Small(u16),
    Large,
}

impl SchemaFound {
    /// The largest version shown as it is.
    const SHOWN: u64 = 999;

    pub fn of(found: u64) -> Self {
        match u16::try_from(found) {
            Ok(small) if found <= Self::SHOWN => SchemaFound::Small(small),
            _ => SchemaFound::Large,
        }
    }
}

impl fmt::Display for SchemaFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchemaFound::Small(version) => write!(f, "{version}"),
            SchemaFound::Large => write!(f, "(a number over {}, not shown)", Self::SHOWN),
        }
    }
}

/// A place in a document, named only by the schema's own field names and
/// list indexes. A name read from the document is never kept: a field
/// keyroll does not know shows as `?`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<PathSegment>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathSegment {
    Field(&'static str),
    Index(usize),
    /// A field name this keyroll does not know (not shown).
    Unknown,
}

impl FieldPath {
    fn tracked(path: &serde_path_to_error::Path) -> Self {
        let name = |text: &str| known_name(text).map_or(PathSegment::Unknown, PathSegment::Field);
        FieldPath(
            path.iter()
                .map(|segment| match segment {
                    Segment::Seq { index } => PathSegment::Index(*index),
                    Segment::Map { key } => name(key),
                    Segment::Enum { variant } => name(variant),
                    Segment::Unknown => PathSegment::Unknown,
                })
                .collect(),
        )
    }

    fn segments(&self) -> &[PathSegment] {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("the top level");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                PathSegment::Index(index) => write!(f, "[{index}]")?,
                PathSegment::Field(name) if i == 0 => f.write_str(name)?,
                PathSegment::Field(name) => write!(f, ".{name}")?,
                PathSegment::Unknown if i == 0 => f.write_str("?")?,
                PathSegment::Unknown => f.write_str(".?")?,
            }
        }
        Ok(())
    }
}

/// A JSON value's kind, as serde names it in "invalid type" errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonKind {
    String,
    Number,
    Boolean,
    Null,
    Object,
    List,
}

impl fmt::Display for JsonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JsonKind::String => "a string",
            JsonKind::Number => "a number",
            JsonKind::Boolean => "true or false",
            JsonKind::Null => "null",
            JsonKind::Object => "an object",
            JsonKind::List => "a list",
        })
    }
}

/// What kind of mistake, in categories fixed in keyroll's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// Not JSON (or cut short): serde_json's own fixed description.
    Syntax(&'static str),
    /// A required field is absent (named when keyroll knows the name).
    MissingField(Option<&'static str>),
    /// A field this keyroll does not know; its name is not shown.
    UnknownField,
    DuplicateField(Option<&'static str>),
    /// A value of the wrong JSON kind.
    WrongType(Option<JsonKind>),
    /// A value of the right kind that is not allowed here: an unknown
    /// name, a number out of range, a timestamp that does not parse.
    BadValue,
}

/// Why the text is not a document: what, where (line, column and field
/// path) and what was expected there. Never any of the text itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseProblem {
    pub kind: ProblemKind,
    pub line: usize,
    pub column: usize,
    pub path: FieldPath,
}

impl ParseProblem {
    fn of(error: &serde_json::Error, path: FieldPath) -> Self {
        let kind = match error.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                ProblemKind::Syntax(syntax_phrase(error))
            }
            serde_json::error::Category::Data | serde_json::error::Category::Io => data_kind(error),
        };
        ParseProblem {
            kind,
            line: error.line(),
            column: error.column(),
            path,
        }
    }

    /// What this place in a document holds, if keyroll can say.
    pub fn expected(&self) -> Option<Expected> {
        expectation(self.path.segments())
    }
}

impl fmt::Display for ParseProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (line, column, path) = (self.line, self.column, &self.path);
        let expected = self.expected();
        match self.kind {
            ProblemKind::Syntax(what) => return write!(f, "{what} at line {line} column {column}"),
            ProblemKind::MissingField(Some(name)) => {
                write!(f, "missing field `{name}` in {path}")?;
            }
            ProblemKind::MissingField(None) => write!(f, "a required field is missing in {path}")?,
            ProblemKind::DuplicateField(Some(name)) => {
                write!(f, "duplicate field `{name}` in {path}")?;
            }
            ProblemKind::DuplicateField(None) => write!(f, "a field appears twice in {path}")?,
            ProblemKind::UnknownField => {
                let parent = FieldPath(
                    path.segments()
                        .split_last()
                        .map_or(&[][..], |(_, p)| p)
                        .to_vec(),
                );
                write!(f, "unknown field in {parent} (its name is not shown)")?;
                if let Some(fields) = struct_fields(parent.segments()) {
                    write!(f, ", expected one of: {}", fields.join(", "))?;
                }
                return write!(f, ", at line {line} column {column}");
            }
            ProblemKind::WrongType(found) => {
                f.write_str("invalid type at ")?;
                write!(f, "{path}")?;
                if let Some(found) = found {
                    write!(f, ": found {found}")?;
                }
            }
            ProblemKind::BadValue => write!(f, "invalid value at {path}")?,
        }
        if let Some(expected) = expected {
            write!(f, ", expected {expected}")?;
        }
        // serde_json's line 0: no position (a field missing from the whole).
        if line > 0 {
            write!(f, ", at line {line} column {column}")?;
        }
        Ok(())
    }
}

/// What a place in the document holds, from the schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    Text(&'static str),
    OneOf(&'static [&'static str]),
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Text(text) => f.write_str(text),
            Expected::OneOf(names) => {
                f.write_str("one of ")?;
                for (i, name) in names.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}\"{name}\"")?;
                }
                Ok(())
            }
        }
    }
}

const TIMESTAMP: Expected =
    Expected::Text("an RFC 3339 timestamp such as \"2030-01-07T12:00:00Z\"");

fn expectation(path: &[PathSegment]) -> Option<Expected> {
    use PathSegment::{Field, Index, Unknown};
    Some(match path {
        [] | [Field("lost")] | [Field("audit"), Index(_), Field("key")] => {
            Expected::Text("a JSON object")
        }
        [Field("keys" | "audit" | "orphans"), Index(_)] => Expected::Text("a JSON object"),
        [Field("pending_rotations"), Field(_)] => TIMESTAMP,
        [Field("pending_rotations"), Unknown] => Expected::OneOf(variants_of::<Alg>()),
        [.., Field(name)] => field_expectation(name)?,
        _ => return None,
    })
}

fn field_expectation(name: &str) -> Option<Expected> {
    Some(match name {
        "schema_version" => Expected::Text("a whole number (the schema version)"),
        "keyset" | "kid" | "certificate" | "reason" | "n" | "e" | "x" | "y" => {
            Expected::Text("a string")
        }
        "alg" => Expected::OneOf(variants_of::<Alg>()),
        "state" => Expected::OneOf(variants_of::<KeyState>()),
        "event" => Expected::OneOf(variants_of::<AuditEvent>()),
        "trigger" => Expected::OneOf(variants_of::<Trigger>()),
        "created_at" | "published_at" | "activated_at" | "retired_at" | "remove_at"
        | "ready_at" | "at" | "detected_at" => TIMESTAMP,
        "longest_grace_seconds" | "orphaned_keys" => Expected::Text("a whole number"),
        "private_key_pem" => Expected::Text("a PKCS#8 PEM private key, as a string"),
        "keys" | "audit" | "orphans" => Expected::Text("a list"),
        "pending_rotations" => Expected::Text("an object from algorithm to timestamp"),
        "key" | "lost" => Expected::Text("a JSON object"),
        _ => return None,
    })
}

/// The fields of the object at `path`, from the serde definitions.
fn struct_fields(path: &[PathSegment]) -> Option<&'static [&'static str]> {
    use PathSegment::{Field, Index};
    Some(match path {
        [] => shape_of::<KeysetDoc>().fields,
        [Field("keys"), Index(_)] => shape_of::<StoredKey>().fields,
        [Field("orphans"), Index(_)] => shape_of::<OrphanKey>().fields,
        [Field("audit"), Index(_)] => shape_of::<AuditRecord>().fields,
        [Field("audit"), Index(_), Field("key")] => shape_of::<KeyTimes>().fields,
        [Field("lost")] => shape_of::<LossRecord>().fields,
        _ => return None,
    })
}

/// Every name a document may use as a field or a map key: the only names
/// a [`FieldPath`] or a problem may show.
fn known_names() -> Vec<&'static str> {
    [
        shape_of::<KeysetDoc>().fields,
        shape_of::<StoredKey>().fields,
        shape_of::<OrphanKey>().fields,
        shape_of::<AuditRecord>().fields,
        shape_of::<KeyTimes>().fields,
        shape_of::<LossRecord>().fields,
        variants_of::<Alg>(),
    ]
    .concat()
}

/// A known name equal to `text`, as keyroll's own `&'static str`.
fn known_name(text: &str) -> Option<&'static str> {
    known_names().into_iter().find(|known| *known == text)
}

fn variants_of<T: DeserializeOwned>() -> &'static [&'static str] {
    shape_of::<T>().variants
}

/// The field or variant names serde derived for `T`, read from its
/// `Deserialize` impl (which hands them to the deserializer), so the names
/// errors may show can never drift from the schema.
#[derive(Default)]
struct Shape {
    fields: &'static [&'static str],
    variants: &'static [&'static str],
}

fn shape_of<T: DeserializeOwned>() -> Shape {
    let mut shape = Shape::default();
    let _ = T::deserialize(ShapeProbe(&mut shape));
    shape
}

struct ShapeProbe<'a>(&'a mut Shape);

impl<'de> de::Deserializer<'de> for ShapeProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("shape read"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.fields = fields;
        Err(de::Error::custom("shape read"))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.variants = variants;
        Err(de::Error::custom("shape read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
        identifier ignored_any
    }
}

/// serde_json's descriptions of broken JSON: fixed words, no input.
const SYNTAX_PHRASES: &[&str] = &[
    "EOF while parsing a list",
    "EOF while parsing an object",
    "EOF while parsing a string",
    "EOF while parsing a value",
    "expected `:`",
    "expected `,` or `]`",
    "expected `,` or `}`",
    "expected ident",
    "expected value",
    "expected `\"`",
    "invalid escape",
    "invalid number",
    "number out of range",
    "invalid unicode code point",
    "control character (\\u0000-\\u001F) found while parsing a string",
    "key must be a string",
    "lone leading surrogate in hex escape",
    "trailing comma",
    "trailing characters",
    "unexpected end of hex escape",
    "recursion limit exceeded",
];

/// The start of serde_json's message, long enough to classify it, in a
/// stack buffer wiped after use: the rest (which may quote the input) is
/// never copied.
struct MessageStart {
    bytes: [u8; 64],
    len: usize,
}

impl MessageStart {
    fn of(error: &serde_json::Error) -> Self {
        use std::fmt::Write;
        let mut start = MessageStart {
            bytes: [0; 64],
            len: 0,
        };
        // The writer stops taking bytes when full; the error that makes
        // `write!` return is expected and ignored.
        let _ = write!(start, "{error}");
        start
    }

    fn text(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn starts_with(&self, prefix: &str) -> bool {
        self.text().starts_with(prefix.as_bytes())
    }

    /// The known name quoted after `prefix` (as in "missing field `kid`").
    fn quoted_name_after(&self, prefix: &str) -> Option<&'static str> {
        let rest = self.text().strip_prefix(prefix.as_bytes())?;
        let end = rest.iter().position(|b| *b == b'`')?;
        known_name(std::str::from_utf8(&rest[..end]).ok()?)
    }
}

impl fmt::Write for MessageStart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.bytes.len() - self.len;
        let take = s.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        if take < s.len() {
            Err(fmt::Error)
        } else {
            Ok(())
        }
    }
}

impl Drop for MessageStart {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

fn syntax_phrase(error: &serde_json::Error) -> &'static str {
    let start = MessageStart::of(error);
    SYNTAX_PHRASES
        .iter()
        .copied()
        .find(|phrase| start.starts_with(phrase))
        .unwrap_or("invalid JSON")
}

fn data_kind(error: &serde_json::Error) -> ProblemKind {
    let start = MessageStart::of(error);
    if start.starts_with("missing field `") {
        return ProblemKind::MissingField(start.quoted_name_after("missing field `"));
    }
    if start.starts_with("duplicate field `") {
        return ProblemKind::DuplicateField(start.quoted_name_after("duplicate field `"));
    }
    if start.starts_with("unknown field") {
        return ProblemKind::UnknownField;
    }
    if let Some(rest) = start.text().strip_prefix(b"invalid type: ".as_slice()) {
        let kinds: [(&str, JsonKind); 9] = [
            ("string", JsonKind::String),
            ("integer", JsonKind::Number),
            ("number", JsonKind::Number),
            ("floating point", JsonKind::Number),
            ("boolean", JsonKind::Boolean),
            ("null", JsonKind::Null),
            ("unit", JsonKind::Null),
            ("map", JsonKind::Object),
            ("sequence", JsonKind::List),
        ];
        let found = kinds
            .iter()
            .find(|(word, _)| rest.starts_with(word.as_bytes()))
            .map(|(_, kind)| *kind);
        return ProblemKind::WrongType(found);
    }
    ProblemKind::BadValue
}

/// Parses `text` as `T` from the text itself (not through a
/// `serde_json::Value`, which would keep another copy of every private key),
/// reporting where it failed without quoting it.
pub(super) fn read<T: DeserializeOwned>(text: &str) -> Result<T, ParseProblem> {
    let mut json = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut json)
        .map_err(|e| ParseProblem::of(e.inner(), FieldPath::tracked(e.path())))?;
    json.end()
        .map_err(|e| ParseProblem::of(&e, FieldPath::default()))?;
    Ok(value)
}

/// Just the schema version, read before the shape so that a future schema
/// is reported as such, not as a confusing field error. Every other value
/// is skipped without being copied.
pub(super) struct SchemaVersion(pub Option<u64>);

impl<'de> Deserialize<'de> for SchemaVersion {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Field {
            SchemaVersion,
            #[serde(other)]
            Other,
        }
        struct Probe;
        impl<'de> Visitor<'de> for Probe {
            type Value = SchemaVersion;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a keyroll keyset document (a JSON object)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SchemaVersion, A::Error> {
                let mut version = None;
                while let Some(field) = map.next_key::<Field>()? {
                    match field {
                        Field::SchemaVersion => version = Some(map.next_value::<u64>()?),
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(SchemaVersion(version))
            }
        }
        deserializer.deserialize_map(Probe)
    }
}

impl SchemaVersion {
    /// The problem of a document without one, at its top level.
    pub(super) fn missing() -> ParseProblem {
        ParseProblem {
            kind: ProblemKind::MissingField(Some("schema_version")),
            line: 0,
            column: 0,
            path: FieldPath::default(),
        }
    }
}

/// Names a key by its place in the document, never by its kid (a kid read
/// from a tampered document may be key material).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyAt {
    /// `None` for an orphan (a public key kept after the document was lost).
    pub state: Option<KeyState>,
    pub index: usize,
    pub alg: Alg,
}

impl fmt::Display for KeyAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            Some(state) => write!(f, "keys[{}] ({} {state})", self.index, self.alg),
            None => write!(f, "orphans[{}] ({})", self.index, self.alg),
        }
    }
}

/// Why an orphaned public key cannot be published again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrphanError {
    #[error("its parameters do not fit {alg}")]
    Shape { alg: Alg },
    #[error("it does not match its kid (its thumbprint is {thumbprint})")]
    KidMismatch { thumbprint: String },
}

/// A rule of SPEC §1 that a document breaks.
#[derive(Debug, thiserror::Error)]
pub enum StructureError {
    #[error("the document's `keyset` field names another keyset than {expected:?} (not shown)")]
    OtherKeyset { expected: String },
    #[error("{at} has an empty kid")]
    EmptyKid { at: KeyAt },
    #[error("{at} has the same kid as {first}")]
    DuplicateKid { at: KeyAt, first: KeyAt },
    #[error("{at} is {state} but its timestamps do not fit that state", state = at.state.map_or("an orphan", KeyState::as_str))]
    StateTimes { at: KeyAt },
    #[error("slot {alg} has {count} {state} keys")]
    CrowdedSlot {
        alg: Alg,
        state: KeyState,
        count: usize,
    },
    #[error("{at}: {problem}")]
    Orphan { at: KeyAt, problem: OrphanError },
    #[error("{at} does not match its kid (its thumbprint is {thumbprint})")]
    KidMismatch { at: KeyAt, thumbprint: String },
    #[error("{at}: {source}")]
    Key { at: KeyAt, source: KeyError },
}
