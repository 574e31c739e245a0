//! Prometheus metrics (SPEC §5), encoded by `prometheus-client`.

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
    tokens_signed: Family<SlotLabels, Counter>,
    sign_refused: Family<RefusalLabels, Counter>,
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
            "Failed writes of jwks_file or signing_dir",
            publish_errors.clone(),
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
        Metrics {
            registry,
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
        self.last_success
            .get_or_create(&Self::keyset(name))
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

    /// Makes sure a keyset's counters exist (at zero) before anything happens.
    pub fn register_keyset(&self, keyset: &str) {
        let _ = self.reconcile_errors.get_or_create(&Self::keyset(keyset));
        let _ = self.store_conflicts.get_or_create(&Self::keyset(keyset));
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
