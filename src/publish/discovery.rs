//! OpenID discovery (SPEC §4): the `openid-configuration` document of each
//! keyset with an `issuer`, and the HTTP routes it adds. The document
//! depends on the config alone, so every replica renders the same bytes and
//! the same ETag.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use super::jwks::rendered;
use super::JwksDocument;
use crate::config::{Config, DiscoverySettings, KeysetPolicy};

pub const DISCOVERY_CONTENT_TYPE: &str = "application/json";

/// The fields relying parties read: enough for Kubernetes service-account
/// issuer discovery, AWS IAM OIDC providers and GCP workload identity
/// federation. Field order is fixed by the struct, so the bytes are too.
#[derive(Serialize)]
struct OpenIdConfiguration<'a> {
    issuer: &'a str,
    jwks_uri: &'a str,
    response_types_supported: [&'static str; 1],
    subject_types_supported: [&'static str; 1],
    id_token_signing_alg_values_supported: Vec<&'static str>,
    claims_supported: [&'static str; 2],
}

/// The discovery document of `policy`, if it has an issuer.
pub fn render(policy: &KeysetPolicy) -> Option<JwksDocument> {
    let discovery = policy.discovery.as_ref()?;
    Some(render_for(discovery, policy))
}

fn render_for(discovery: &DiscoverySettings, policy: &KeysetPolicy) -> JwksDocument {
    let document = OpenIdConfiguration {
        issuer: &discovery.issuer,
        jwks_uri: &discovery.jwks_uri,
        response_types_supported: ["id_token"],
        subject_types_supported: ["public"],
        // Sorted and without duplicates (config.rs).
        id_token_signing_alg_values_supported: policy
            .algorithms
            .iter()
            .map(|a| a.as_str())
            .collect(),
        claims_supported: ["sub", "iss"],
    };
    let body = serde_json::to_vec(&document).expect("a discovery document always serializes");
    rendered(body, policy.timings.jwks_cache_ttl.as_secs())
}

/// What an extra HTTP route answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `<issuer path>/.well-known/openid-configuration`.
    Discovery {
        keyset: String,
        document: Arc<JwksDocument>,
    },
    /// The path of a `jwks_uri` on the issuer's origin: the keyset's JWKS.
    Jwks { keyset: String },
}

impl Route {
    pub fn keyset(&self) -> &str {
        match self {
            Route::Discovery { keyset, .. } | Route::Jwks { keyset } => keyset,
        }
    }
}

/// Request path → what it answers, beyond the built-in JWKS routes.
/// `config::check_shared_routes` guarantees no path is claimed twice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    by_path: HashMap<String, Route>,
}

impl Routes {
    /// The routes every keyset with an issuer adds.
    pub fn of(config: &Config) -> Routes {
        let mut by_path = HashMap::new();
        for policy in &config.keysets {
            let Some(discovery) = &policy.discovery else {
                continue;
            };
            let document = Arc::new(render_for(discovery, policy));
            let keyset = policy.name.clone();
            if let Some(path) = &discovery.jwks_route {
                by_path.insert(
                    path.clone(),
                    Route::Jwks {
                        keyset: keyset.clone(),
                    },
                );
            }
            by_path.insert(
                discovery.route.clone(),
                Route::Discovery { keyset, document },
            );
        }
        Routes { by_path }
    }

    pub fn get(&self, path: &str) -> Option<&Route> {
        self.by_path.get(path)
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigSource, ParseContext};

    fn config(keysets: &str) -> Config {
        let context = ParseContext {
            state_directory: None,
            now: chrono::Utc::now(),
        };
        Config::parse(keysets, ConfigSource::File("k.toml".into()), &context).unwrap()
    }

    #[test]
    fn the_document_has_exactly_the_spec_fields_in_a_fixed_order() {
        let config = config(
            "[[keysets]]\nname = \"a\"\nalgorithms = [\"RS256\", \"ES256\"]\nissuer = \"https://id.example.com/a\"\n",
        );
        let document = render(&config.keysets[0]).unwrap();
        assert_eq!(
            std::str::from_utf8(&document.body).unwrap(),
            r#"{"issuer":"https://id.example.com/a","jwks_uri":"https://id.example.com/a/.well-known/jwks.json","response_types_supported":["id_token"],"subject_types_supported":["public"],"id_token_signing_alg_values_supported":["ES256","RS256"],"claims_supported":["sub","iss"]}"#
        );
        assert_eq!(document.max_age_seconds, 300);
        assert_eq!(
            render(&config.keysets[0]).unwrap(),
            document,
            "same config, same bytes"
        );
    }

    #[test]
    fn routes_follow_the_issuer_path_and_a_same_origin_jwks_uri() {
        let config = config(
            "[[keysets]]\nname = \"a\"\nissuer = \"https://id.example.com/tenants/a/\"\n\
             [[keysets]]\nname = \"b\"\nissuer = \"https://id.example.com/b\"\njwks_uri = \"https://id.example.com/keys/b.json\"\n\
             [[keysets]]\nname = \"c\"\nissuer = \"https://id.example.com/c\"\njwks_uri = \"https://bucket.s3.amazonaws.com/c.json\"\n",
        );
        let routes = Routes::of(&config);
        let keyset = |path: &str| routes.get(path).map(|r| r.keyset().to_string());
        assert_eq!(
            keyset("/tenants/a/.well-known/openid-configuration").as_deref(),
            Some("a")
        );
        assert_eq!(
            keyset("/tenants/a/.well-known/jwks.json").as_deref(),
            Some("a")
        );
        assert_eq!(keyset("/keys/b.json").as_deref(), Some("b"));
        assert_eq!(
            keyset("/c/.well-known/openid-configuration").as_deref(),
            Some("c")
        );
        assert_eq!(keyset("/c.json"), None, "another origin's path is not ours");
        assert_eq!(routes.by_path.len(), 5);
    }
}
