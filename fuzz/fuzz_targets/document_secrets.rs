//! Feeds the stored-document parser documents that hold key material in
//! every field, and fails if any refusal (Display or Debug) shows a piece of
//! it: the property `tests/document_secrets.rs` checks field by field, here
//! in any combination. The first byte picks the mode:
//!
//! - even: the rest is a list of mutations of a valid document with real
//!   keys, three bytes each (position, mutation, secret), applied in turn;
//! - odd: the rest is free text in which `{{PEM}}`, `{{D}}`, `{{MARKER}}`
//!   and `{{NUMBER}}` become a real private key (JSON-escaped), its JWK
//!   `d`, a marker and a number marker.
#![no_main]

#[path = "../../tests/support/secret_documents.rs"]
mod secret_documents;

use libfuzzer_sys::fuzz_target;
use secret_documents::{fixture, mutated, positions, Mutation, MUTATIONS, NUMBER_MARKER};

/// Mutations applied to one document at most.
const MOST: usize = 4;

fn mutations(rest: &[u8]) {
    let fixture = fixture();
    let mut value = fixture.value.clone();
    let mut text = fixture.doc.to_json().to_string();
    for step in rest.chunks_exact(3).take(MOST) {
        let places = positions(&value);
        let at = &places[step[0] as usize % places.len()];
        let how = MUTATIONS[step[1] as usize % MUTATIONS.len()];
        let plant = &fixture.plants[step[2] as usize % fixture.plants.len()];
        let Some(next) = mutated(&value, at, how, plant) else {
            continue;
        };
        text = next;
        if matches!(how, Mutation::AsBareText) {
            break; // no longer JSON: nothing more to mutate
        }
        value = serde_json::from_str(&text).expect("a mutated document is JSON");
    }
    fixture.check(&text, "mutated document");
}

fn template(rest: &[u8]) {
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let fixture = fixture();
    let pem = serde_json::to_string(fixture.plants[0].as_str()).unwrap();
    let text = text
        .replace("{{PEM}}", &pem[1..pem.len() - 1])
        .replace("{{D}}", &fixture.plants[1])
        .replace("{{MARKER}}", &fixture.plants[2])
        .replace("{{NUMBER}}", &NUMBER_MARKER.to_string());
    fixture.check(&text, "document from a template");
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => mutations(rest),
        Some((_, rest)) => template(rest),
        None => {}
    }
});
