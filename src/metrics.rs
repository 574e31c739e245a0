//! Prometheus metrics (SPEC §5), encoded by `prometheus-client`.
//!
//! Every family that can be at zero is emitted at zero from the moment a
//! keyset is configured ([`Metrics::register_keyset`]): `increase()`,
//! `rate()` and `== 1` alerts need a series before the first event, and a
//! dashboard shows 0 rather than "no data". Timestamps and ages are the
//! exception: 0 would mean 1970, so they appear once they are known.
//! `deploy/monitoring/` holds the alert rules and the dashboard over these
//! names; `scripts/check-deploy` checks both against a running keyroll.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::clock::{Clock, Timestamp};
use crate::document::{KeyState, KeysetDoc, Trigger};
use crate::key::Alg;
use crate::planner::SlotOutlook;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeysetLabels {
    keyset: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    keyset: String,
    alg: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    keyset: String,
    alg: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RotationLabels {
    keyset: String,
    alg: String,
    trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutputLabels {
    keyset: String,
    output: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    keyset: String,
    reason: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The `output` label values of `keyroll_publish_errors_total`, registered
/// at zero for every keyset (whether or not that output is configured, so
/// the series set does not depend on the config). Outputs added later (S3,
/// discovery files) add their name here.
pub const PUBLISH_OUTPUTS: [&str; 3] = ["jwks_file", "signing_dir", "s3"];

/// The triggers `keyroll_rotations_total` counts (the daemon counts an
/// activation as a rotation for exactly these).
const ROTATION_TRIGGERS: [Trigger; 4] = [
    Trigger::Schedule,
    Trigger::Manual,
    Trigger::Forced,
    Trigger::Revoke,
];

pub struct Metrics {
    registry: Registry,
    keys: Family<KeyLabels, Gauge>,
    active_key_age: Family<SlotLabels, FloatGauge>,
    next_rotation: Family<SlotLabels, FloatGauge>,
    rotations: Family<RotationLabels, Counter>,
    reconcile_errors: Family<KeysetLabels, Counter>,
    last_success: Family<KeysetLabels, FloatGauge>,
    store_conflicts: Family<KeysetLabels, Counter>,
    publish_errors: Family<OutputLabels, Counter>,
    document_missing: Family<KeysetLabels, Gauge>,
    failed_closed: Family<KeysetLabels, Gauge>,
    clock_offset: Family<KeysetLabels, FloatGauge>,
    destruction_pending: Family<KeysetLabels, Gauge>,
    ready: Gauge,
    tokens_signed: Family<SlotLabels, Counter>,
    sign_refused: Family<RefusalLabels, Counter>,
    /// HTTP connections closed at accept because their client already held
    /// `[http] max_connections_per_client`.
    http_refused: Counter,
    /// Activation instants, so the age is computed when scraped, not when
    /// the last reconcile happened to run.
    activations: Mutex<HashMap<(String, Alg), Timestamp>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keyroll");
        let keys = Family::default();
        let active_key_age = Family::default();
        let next_rotation = Family::default();
        let rotations = Family::default();
        let reconcile_errors = Family::default();
        let last_success = Family::default();
        let store_conflicts = Family::default();
        let publish_errors = Family::default();
        let document_missing = Family::default();
        let failed_closed = Family::default();
        let clock_offset = Family::default();
        let destruction_pending = Family::default();
        let ready = Gauge::default();
        registry.register("keys", "Keys per keyset, algorithm and state", keys.clone());
        registry.register(
            "active_key_age_seconds",
            "Seconds since the active key was activated",
            active_key_age.clone(),
        );
        registry.register(
            "next_rotation_timestamp_seconds",
            "When the next key will be activated (Unix time)",
            next_rotation.clone(),
        );
        registry.register(
            "rotations",
            "Key activations, by trigger",
            rotations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles (store, document or publish errors)",
            reconcile_errors.clone(),
        );
        registry.register(
            "last_reconcile_success_timestamp_seconds",
            "When the keyset was last reconciled and published (Unix time)",
            last_success.clone(),
        );
        registry.register(
            "store_conflicts",
            "Compare-and-swap conflicts met (another writer was first)",
            store_conflicts.clone(),
        );
        registry.register(
            "publish_errors",
            "Failed writes of jwks_file, signing_dir, discovery_file or S3 uploads",
            publish_errors.clone(),
        );
        registry.register(
            "document_missing",
            "1 while the stored document of a keyset this process published is missing (SPEC C2)",
            document_missing.clone(),
        );
        registry.register(
            "failed_closed",
            "1 while no store load succeeded for max_stale and signing keys are withheld (SPEC C5)",
            failed_closed.clone(),
        );
        registry.register(
            "clock_offset_seconds",
            "The document's newest timestamp minus the local clock when that exceeds clock_skew, else 0 (SPEC C6)",
            clock_offset.clone(),
        );
        registry.register(
            "key_destruction_pending",
            "Private keys of revoked or removed keys still readable in the store because deleting them failed (retried every pass)",
            destruction_pending.clone(),
        );
        registry.register(
            "ready",
            "1 when every keyset has been loaded and published (as /readyz), else 0",
            ready.clone(),
        );
        let tokens_signed = Family::default();
        let sign_refused = Family::default();
        registry.register(
            "tokens_signed",
            "Tokens the signer signed (sign API and Kubernetes)",
            tokens_signed.clone(),
        );
        registry.register(
            "sign_refused",
            "Sign requests the signer refused, by reason",
            sign_refused.clone(),
        );
        let http_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "HTTP connections closed at once because their client held max_connections_per_client",
            http_refused.clone(),
        );
        Metrics {
            registry,
            http_refused,
            tokens_signed,
            sign_refused,
            keys,
            active_key_age,
            next_rotation,
            rotations,
            reconcile_errors,
            last_success,
            store_conflicts,
            publish_errors,
            document_missing,
            failed_closed,
            clock_offset,
            destruction_pending,
            ready,
            activations: Mutex::new(HashMap::new()),
        }
    }

    fn slot(keyset: &str, alg: Alg) -> SlotLabels {
        SlotLabels {
            keyset: keyset.to_string(),
            alg: alg.to_string(),
        }
    }

    fn keyset(keyset: &str) -> KeysetLabels {
        KeysetLabels {
            keyset: keyset.to_string(),
        }
    }

    /// Records the state of a keyset after a successful reconcile.
    pub fn observe_keyset(&self, doc: &KeysetDoc, outlook: &[SlotOutlook], now: Timestamp) {
        let name = &doc.keyset;
        let mut activations = self.activations.lock().unwrap_or_else(|e| e.into_inner());
        for alg in Alg::ALL {
            for state in [KeyState::Next, KeyState::Active, KeyState::Retired] {
                let count = doc
                    .keys
                    .iter()
                    .filter(|k| k.alg == alg && k.state == state)
                    .count();
                let labels = KeyLabels {
                    keyset: name.clone(),
                    alg: alg.to_string(),
                    state: state.to_string(),
                };
                self.keys.get_or_create(&labels).set(count as i64);
            }
            match doc.key(alg, KeyState::Active).and_then(|k| k.activated_at) {
                Some(at) => {
                    activations.insert((name.clone(), alg), at);
                }
                None => {
                    activations.remove(&(name.clone(), alg));
                    self.active_key_age.remove(&Self::slot(name, alg));
                }
            }
        }
        for slot in outlook {
            let gauge = self
                .next_rotation
                .get_or_create(&Self::slot(name, slot.alg));
            gauge.set(
                slot.next_rotation
                    .map(|t| t.timestamp() as f64)
                    .unwrap_or(f64::NAN),
            );
        }
        self.reconciled(name, now);
    }

    /// A successful reconcile of `keyset` at `now`, read from the store or
    /// vouched for by its watch (daemon.rs).
    pub fn reconciled(&self, keyset: &str, now: Timestamp) {
        self.last_success
            .get_or_create(&Self::keyset(keyset))
            .set(now.timestamp() as f64);
    }

    pub fn rotation(&self, keyset: &str, alg: Alg, trigger: Trigger) {
        let labels = RotationLabels {
            keyset: keyset.to_string(),
            alg: alg.to_string(),
            trigger: trigger.as_str().to_string(),
        };
        self.rotations.get_or_create(&labels).inc();
    }

    pub fn reconcile_error(&self, keyset: &str) {
        self.reconcile_errors
            .get_or_create(&Self::keyset(keyset))
            .inc();
    }

    pub fn store_conflicts(&self, keyset: &str, count: u32) {
        self.store_conflicts
            .get_or_create(&Self::keyset(keyset))
            .inc_by(count as u64);
    }

    pub fn publish_error(&self, keyset: &str, output: &str) {
        let labels = OutputLabels {
            keyset: keyset.to_string(),
            output: output.to_string(),
        };
        self.publish_errors.get_or_create(&labels).inc();
    }

    /// One token signed by the signer.
    pub fn token_signed(&self, keyset: &str, alg: Alg) {
        self.tokens_signed
            .get_or_create(&Self::slot(keyset, alg))
            .inc();
    }

    /// One sign request refused; `reason` is one of a fixed set of labels.
    pub fn sign_refused(&self, keyset: &str, reason: &str) {
        let labels = RefusalLabels {
            keyset: keyset.to_string(),
            reason: reason.to_string(),
        };
        self.sign_refused.get_or_create(&labels).inc();
    }

    /// One HTTP connection refused: its client held its share of connections.
    pub fn http_connection_refused(&self) {
        self.http_refused.inc();
    }

    /// SPEC C2: `missing` while a keyset's stored document is gone although
    /// this process (or its `jwks_file`) published keys for it.
    pub fn set_document_missing(&self, keyset: &str, missing: bool) {
        self.document_missing
            .get_or_create(&Self::keyset(keyset))
            .set(i64::from(missing));
    }

    /// SPEC C5: `failed_closed` while no store load has succeeded for
    /// `max_stale` and the signing keys are withheld.
    pub fn set_failed_closed(&self, keyset: &str, failed_closed: bool) {
        self.failed_closed
            .get_or_create(&Self::keyset(keyset))
            .set(i64::from(failed_closed));
    }

    /// SPEC C6: the newest stored timestamp minus the local clock, in
    /// seconds, when it is ahead by more than `clock_skew`; 0 otherwise.
    pub fn set_clock_offset(&self, keyset: &str, seconds: f64) {
        self.clock_offset
            .get_or_create(&Self::keyset(keyset))
            .set(seconds);
    }

    /// How many dropped keys' private keys the store has not destroyed yet.
    pub fn set_destruction_pending(&self, keyset: &str, count: usize) {
        self.destruction_pending
            .get_or_create(&Self::keyset(keyset))
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The served snapshot's readiness, set just before each encoding.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Makes every series of a keyset that can be zero exist, at zero,
    /// before anything happens (see the module header). Called for each
    /// configured keyset at start and on reload; values already counted are
    /// kept.
    pub fn register_keyset(&self, keyset: &str) {
        let labels = Self::keyset(keyset);
        let _ = self.reconcile_errors.get_or_create(&labels);
        let _ = self.store_conflicts.get_or_create(&labels);
        let _ = self.document_missing.get_or_create(&labels);
        let _ = self.failed_closed.get_or_create(&labels);
        let _ = self.clock_offset.get_or_create(&labels);
        let _ = self.destruction_pending.get_or_create(&labels);
        for output in PUBLISH_OUTPUTS {
            let _ = self.publish_errors.get_or_create(&OutputLabels {
                keyset: keyset.to_string(),
                output: output.to_string(),
            });
        }
        for alg in Alg::ALL {
            for state in [KeyState::Next, KeyState::Active, KeyState::Retired] {
                let _ = self.keys.get_or_create(&KeyLabels {
                    keyset: keyset.to_string(),
                    alg: alg.to_string(),
                    state: state.to_string(),
                });
            }
            for trigger in ROTATION_TRIGGERS {
                let _ = self.rotations.get_or_create(&RotationLabels {
                    keyset: keyset.to_string(),
                    alg: alg.to_string(),
                    trigger: trigger.as_str().to_string(),
                });
            }
        }
    }

    /// Makes sure an output's error counter exists (at zero) once the
    /// output is configured, so alerts on its increase work from the start.
    pub fn register_output(&self, keyset: &str, output: &str) {
        let labels = OutputLabels {
            keyset: keyset.to_string(),
            output: output.to_string(),
        };
        let _ = self.publish_errors.get_or_create(&labels);
    }

    /// The Prometheus/OpenMetrics text of every metric.
    pub fn encode(&self, clock: &dyn Clock) -> String {
        let now = clock.now();
        {
            let activations = self.activations.lock().unwrap_or_else(|e| e.into_inner());
            for ((keyset, alg), at) in activations.iter() {
                let age = (now - *at).num_seconds().max(0) as f64;
                self.active_key_age
                    .get_or_create(&Self::slot(keyset, *alg))
                    .set(age);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    /// The value of `name{labels}` in the encoded text, labels in the order
    /// the families declare them.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_registered_keyset_has_every_zero_series_before_any_event() {
        let metrics = Metrics::new();
        metrics.register_keyset("ks");
        let text = metrics.encode(&SystemClock);
        let mut expected = vec![
            r#"keyroll_reconcile_errors_total{keyset="ks"}"#.to_string(),
            r#"keyroll_store_conflicts_total{keyset="ks"}"#.to_string(),
            r#"keyroll_document_missing{keyset="ks"}"#.to_string(),
            r#"keyroll_failed_closed{keyset="ks"}"#.to_string(),
            r#"keyroll_clock_offset_seconds{keyset="ks"}"#.to_string(),
            r#"keyroll_key_destruction_pending{keyset="ks"}"#.to_string(),
            "keyroll_ready".to_string(),
        ];
        for output in PUBLISH_OUTPUTS {
            expected.push(format!(
                r#"keyroll_publish_errors_total{{keyset="ks",output="{output}"}}"#
            ));
        }
        for alg in ["ES256", "RS256"] {
            for state in ["next", "active", "retired"] {
                expected.push(format!(
                    r#"keyroll_keys{{keyset="ks",alg="{alg}",state="{state}"}}"#
                ));
            }
            for trigger in ["schedule", "manual", "forced", "revoke"] {
                expected.push(format!(
                    r#"keyroll_rotations_total{{keyset="ks",alg="{alg}",trigger="{trigger}"}}"#
                ));
            }
        }
        for series in &expected {
            assert_eq!(sample(&text, series), Some(0.0), "{series} in:\n{text}");
        }
        // A timestamp at 0 would read as 1970 (a rotation 56 years overdue).
        assert!(!text.contains("keyroll_next_rotation_timestamp_seconds{"));
        assert!(!text.contains("keyroll_last_reconcile_success_timestamp_seconds{"));
    }

    #[test]
    fn registering_again_keeps_what_was_counted() {
        let metrics = Metrics::new();
        metrics.register_keyset("ks");
        metrics.publish_error("ks", "s3");
        metrics.reconcile_error("ks");
        metrics.register_keyset("ks");
        let text = metrics.encode(&SystemClock);
        assert_eq!(
            sample(
                &text,
                r#"keyroll_publish_errors_total{keyset="ks",output="s3"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"keyroll_reconcile_errors_total{keyset="ks"}"#),
            Some(1.0)
        );
    }

    #[test]
    fn the_c2_c5_c6_and_ready_setters_show_in_the_text() {
        let metrics = Metrics::new();
        metrics.register_keyset("ks");
        metrics.set_document_missing("ks", true);
        metrics.set_failed_closed("ks", true);
        metrics.set_clock_offset("ks", 95.5);
        metrics.set_ready(true);
        let text = metrics.encode(&SystemClock);
        assert_eq!(
            sample(&text, r#"keyroll_document_missing{keyset="ks"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"keyroll_failed_closed{keyset="ks"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"keyroll_clock_offset_seconds{keyset="ks"}"#),
            Some(95.5)
        );
        assert_eq!(sample(&text, "keyroll_ready"), Some(1.0));

        metrics.set_document_missing("ks", false);
        metrics.set_failed_closed("ks", false);
        metrics.set_clock_offset("ks", 0.0);
        metrics.set_ready(false);
        let text = metrics.encode(&SystemClock);
        assert_eq!(
            sample(&text, r#"keyroll_document_missing{keyset="ks"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"keyroll_failed_closed{keyset="ks"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"keyroll_clock_offset_seconds{keyset="ks"}"#),
            Some(0.0)
        );
        assert_eq!(sample(&text, "keyroll_ready"), Some(0.0));
    }
}
