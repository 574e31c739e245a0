//! No refusal of a stored document shows key material (SPEC §7): a document
//! holding a real private key's PEM, its JWK `d` or a marker in every field,
//! as every field's name, as a number, as bare text and in a list, is
//! parsed and checked as a load does, and no error text (Display or Debug)
//! holds any 12-character piece of any secret. The fuzz target
//! `document_secrets` mixes the same mutations at random.

#[path = "support/secret_documents.rs"]
mod secret_documents;

use secret_documents::{fixture, mutated, positions, MUTATIONS};

#[test]
fn no_error_shows_a_secret_planted_anywhere() {
    let fixture = fixture();
    let places = positions(&fixture.value);
    assert!(
        places.len() > 60,
        "the fixture covers every field: {places:?}"
    );
    let mut checked = 0;
    for at in &places {
        for how in MUTATIONS {
            for plant in &fixture.plants {
                let Some(text) = mutated(&fixture.value, at, how, plant) else {
                    continue;
                };
                fixture.check(&text, &format!("{how:?} at {at:?}"));
                checked += 1;
            }
        }
    }
    assert!(checked > 3000, "{checked} documents checked");
}

#[test]
fn the_check_catches_a_leak() {
    let fixture = fixture();
    for plant in &fixture.plants {
        let secret = plant.trim_matches(['`', '"', '\'', '\n']);
        let shown = format!("{}: unknown variant `{secret}`", secret_documents::LOCATION);
        assert!(fixture.leaked(&shown).is_some(), "{shown}");
    }
    assert!(fixture
        .leaked(&secret_documents::NUMBER_MARKER.to_string())
        .is_some());
    let valid = fixture.doc.to_json();
    fixture.check(&valid, "the valid fixture");
}
