//! A cluster's outlier detection and circuit breaking, as the kernel honours them
//! for connections (see the translation table, docs/xds.md).
//!
//! - `outlier_detection` ejects a backend after failed connects in a row. A connect
//!   failure is a locally originated error: with `split_external_local_origin_errors`
//!   it counts toward `consecutive_local_origin_failure`; without, Envoy maps it to
//!   a 503, which counts toward `consecutive_5xx` and `consecutive_gateway_failure`.
//!   The detector that ejects first (lowest threshold among those enforced) is the
//!   kernel's. No `outlier_detection`: no ejection.
//! - `circuit_breakers.thresholds` (priority DEFAULT) `max_connections` caps the
//!   service's open connections on this node; Istio's 4294967295 is unlimited.
//! - `common_lb_config.healthy_panic_threshold` (default 50 %) is the panic threshold.

use std::time::Duration;

use sockmesh_proto::pb::envoy::config::{
    cluster::v3::{Cluster, OutlierDetection},
    core::v3::RoutingPriority,
};

use crate::model::{Health, Outlier};

/// Envoy's defaults (`outlier_detection.proto`, `cluster.proto`).
const DEFAULT_CONSECUTIVE: u32 = 5;
const DEFAULT_ENFORCING_5XX: u32 = 100;
const DEFAULT_ENFORCING_GATEWAY: u32 = 0;
const DEFAULT_ENFORCING_LOCAL_ORIGIN: u32 = 100;
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
const DEFAULT_PANIC_PERCENT: f64 = 50.0;

/// What a cluster's fields ask for that no cluster may: (field, problem).
pub type Invalid = (&'static str, String);

/// The cluster's outlier detection and circuit breaking, or the first field out
/// of the range Envoy accepts.
pub fn cluster_health(c: &Cluster) -> Result<Health, Invalid> {
    let outlier = match &c.outlier_detection {
        Some(o) => outlier(o, panic_percent(c)?)?,
        None => None,
    };
    Ok(Health {
        outlier,
        max_connections: max_connections(c),
    })
}

fn outlier(o: &OutlierDetection, panic_percent: u8) -> Result<Option<Outlier>, Invalid> {
    let value = |v: Option<u32>, default: u32| v.unwrap_or(default);
    let percent = |field: &'static str, v: Option<u32>, default: u32| -> Result<u8, Invalid> {
        let v = value(v, default);
        u8::try_from(v)
            .ok()
            .filter(|p| *p <= 100)
            .ok_or_else(|| (field, format!("{v} is above 100 (percent)")))
    };
    let enforcing_5xx = percent(
        "outlier_detection.enforcing_consecutive_5xx",
        o.enforcing_consecutive_5xx.map(|v| v.value),
        DEFAULT_ENFORCING_5XX,
    )?;
    let enforcing_gateway = percent(
        "outlier_detection.enforcing_consecutive_gateway_failure",
        o.enforcing_consecutive_gateway_failure.map(|v| v.value),
        DEFAULT_ENFORCING_GATEWAY,
    )?;
    let enforcing_local = percent(
        "outlier_detection.enforcing_consecutive_local_origin_failure",
        o.enforcing_consecutive_local_origin_failure
            .map(|v| v.value),
        DEFAULT_ENFORCING_LOCAL_ORIGIN,
    )?;
    let max_ejection_percent = percent(
        "outlier_detection.max_ejection_percent",
        o.max_ejection_percent.map(|v| v.value),
        DEFAULT_MAX_EJECTION_PERCENT,
    )?;
    let threshold = |v: Option<u32>| value(v, DEFAULT_CONSECUTIVE);
    let detectors = if o.split_external_local_origin_errors {
        vec![(
            threshold(o.consecutive_local_origin_failure.map(|v| v.value)),
            enforcing_local,
        )]
    } else {
        vec![
            (threshold(o.consecutive_5xx.map(|v| v.value)), enforcing_5xx),
            (
                threshold(o.consecutive_gateway_failure.map(|v| v.value)),
                enforcing_gateway,
            ),
        ]
    };
    // The detector that ejects first; a threshold of 0 or enforcing 0 never does.
    let Some((consecutive, enforcing)) = detectors
        .into_iter()
        .filter(|&(t, e)| t > 0 && e > 0)
        .min_by_key(|&(t, e)| (t, std::cmp::Reverse(e)))
    else {
        return Ok(None);
    };
    let interval = millis(
        "outlier_detection.interval",
        o.interval.as_ref(),
        DEFAULT_INTERVAL,
    )?;
    let base = millis(
        "outlier_detection.base_ejection_time",
        o.base_ejection_time.as_ref(),
        DEFAULT_BASE_EJECTION,
    )?;
    let max = millis(
        "outlier_detection.max_ejection_time",
        o.max_ejection_time.as_ref(),
        DEFAULT_MAX_EJECTION,
    )?;
    Ok(Some(Outlier {
        consecutive,
        enforcing,
        base_ejection_ms: base,
        // Envoy: the longest ejection is never shorter than the first.
        max_ejection_ms: max.max(base),
        interval_ms: interval,
        max_ejection_percent,
        panic_percent,
    }))
}

/// A positive duration in milliseconds (within u32: 49 days).
fn millis(
    field: &'static str,
    d: Option<&sockmesh_proto::pb::google::protobuf::Duration>,
    default: Duration,
) -> Result<u32, Invalid> {
    let Some(d) = d else {
        return Ok(u32::try_from(default.as_millis()).unwrap_or(u32::MAX));
    };
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return Err((
            field,
            format!("{}s{}ns is not positive", d.seconds, d.nanos),
        ));
    }
    let ms = u64::try_from(d.seconds)
        .unwrap_or(0)
        .saturating_mul(1000)
        .saturating_add(u64::try_from(d.nanos).unwrap_or(0) / 1_000_000)
        .max(1);
    u32::try_from(ms).map_err(|_| (field, format!("{ms} ms is more than {} ms", u32::MAX)))
}

/// `common_lb_config.healthy_panic_threshold`, percent (Envoy's default 50), as
/// Envoy's `convertPercent` makes it an integer: `100 × (value / 100)`
/// truncated (so 29 becomes 28, as in Envoy).
pub(crate) fn panic_percent(c: &Cluster) -> Result<u8, Invalid> {
    let v = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.healthy_panic_threshold.as_ref())
        .map_or(DEFAULT_PANIC_PERCENT, |p| p.value);
    if !(0.0..=100.0).contains(&v) {
        return Err((
            "common_lb_config.healthy_panic_threshold",
            format!("{v} is not a percentage (0 to 100)"),
        ));
    }
    // Whole percents: the kernel compares integers, as Envoy's arithmetic does.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "within 0..=100, truncated as Envoy truncates"
    )]
    Ok((100.0 * (v / 100.0)) as u8)
}

/// The DEFAULT priority's `max_connections`; unset, or Istio's u32::MAX, is
/// unlimited (Envoy's default of 1,024 is per client proxy, and sockmesh counts
/// for the whole node: applying it would cap a node at what one sidecar gets).
fn max_connections(c: &Cluster) -> Option<u32> {
    c.circuit_breakers
        .as_ref()?
        .thresholds
        .iter()
        .find(|t| t.priority == RoutingPriority::Default as i32)?
        .max_connections
        .map(|v| v.value)
        .filter(|&v| v != u32::MAX)
}

#[cfg(test)]
mod tests {
    use sockmesh_proto::pb::{
        envoy::{
            config::cluster::v3::{CircuitBreakers, circuit_breakers::Thresholds, cluster},
            r#type::v3::Percent,
        },
        google::protobuf::{Duration as PbDuration, UInt32Value},
    };

    use super::*;

    fn u32v(value: u32) -> Option<UInt32Value> {
        Some(UInt32Value { value })
    }

    fn secs(seconds: i64) -> Option<PbDuration> {
        Some(PbDuration { seconds, nanos: 0 })
    }

    fn cluster(o: Option<OutlierDetection>) -> Cluster {
        Cluster {
            name: "outbound|80||web".into(),
            outlier_detection: o,
            ..Default::default()
        }
    }

    #[test]
    fn no_outlier_detection_is_no_ejection() {
        assert_eq!(cluster_health(&cluster(None)), Ok(Health::default()));
    }

    #[test]
    fn envoy_defaults_fill_an_empty_outlier_detection() {
        let h = cluster_health(&cluster(Some(OutlierDetection::default())));
        assert_eq!(
            h.map(|h| h.outlier),
            Ok(Some(Outlier {
                consecutive: 5,
                enforcing: 100,
                base_ejection_ms: 30_000,
                max_ejection_ms: 300_000,
                interval_ms: 10_000,
                max_ejection_percent: 10,
                panic_percent: 50,
            }))
        );
    }

    #[test]
    fn istio_shapes_translate() {
        // A DestinationRule outlierDetection {consecutive5xxErrors: 3, interval: 1s,
        // baseEjectionTime: 30s, maxEjectionPercent: 100}, as istiod writes it.
        let o = OutlierDetection {
            consecutive_5xx: u32v(3),
            enforcing_consecutive_5xx: u32v(100),
            consecutive_gateway_failure: u32v(0),
            enforcing_consecutive_gateway_failure: u32v(0),
            interval: secs(1),
            base_ejection_time: secs(30),
            max_ejection_percent: u32v(100),
            ..Default::default()
        };
        let mut c = cluster(Some(o));
        c.common_lb_config = Some(cluster::CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: 0.0 }),
            ..Default::default()
        });
        c.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: u32v(u32::MAX),
                ..Default::default()
            }],
            ..Default::default()
        });
        let h = cluster_health(&c);
        assert_eq!(
            h,
            Ok(Health {
                outlier: Some(Outlier {
                    consecutive: 3,
                    enforcing: 100,
                    base_ejection_ms: 30_000,
                    max_ejection_ms: 300_000,
                    interval_ms: 1_000,
                    max_ejection_percent: 100,
                    panic_percent: 0,
                }),
                // Istio's default circuit breaker is unlimited.
                max_connections: None,
            })
        );
    }

    #[test]
    fn the_detector_that_ejects_first_is_the_kernels() {
        // Gateway failures enforced at a lower threshold than 5xx.
        let o = OutlierDetection {
            consecutive_5xx: u32v(7),
            consecutive_gateway_failure: u32v(2),
            enforcing_consecutive_gateway_failure: u32v(40),
            ..Default::default()
        };
        let h = cluster_health(&cluster(Some(o.clone()))).map(|h| h.outlier);
        assert_eq!(
            h.map(|o| o.map(|o| (o.consecutive, o.enforcing))),
            Ok(Some((2, 40)))
        );
        // Split: only the local-origin detector counts connect failures.
        let split = OutlierDetection {
            split_external_local_origin_errors: true,
            consecutive_local_origin_failure: u32v(4),
            ..o
        };
        let h = cluster_health(&cluster(Some(split))).map(|h| h.outlier);
        assert_eq!(
            h.map(|o| o.map(|o| (o.consecutive, o.enforcing))),
            Ok(Some((4, 100)))
        );
        // Nothing enforced: nothing ejects.
        let none = OutlierDetection {
            enforcing_consecutive_5xx: u32v(0),
            ..Default::default()
        };
        assert_eq!(
            cluster_health(&cluster(Some(none))).map(|h| h.outlier),
            Ok(None)
        );
    }

    #[test]
    fn the_default_priority_circuit_breaker_caps_connections() {
        let mut c = cluster(None);
        c.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![
                Thresholds {
                    priority: RoutingPriority::High as i32,
                    max_connections: u32v(7),
                    ..Default::default()
                },
                Thresholds {
                    max_connections: u32v(50),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        assert_eq!(cluster_health(&c).map(|h| h.max_connections), Ok(Some(50)));
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let bad = OutlierDetection {
            max_ejection_percent: u32v(150),
            ..Default::default()
        };
        assert_eq!(
            cluster_health(&cluster(Some(bad))),
            Err((
                "outlier_detection.max_ejection_percent",
                "150 is above 100 (percent)".to_owned()
            ))
        );
        let zero = OutlierDetection {
            base_ejection_time: secs(0),
            ..Default::default()
        };
        assert!(matches!(
            cluster_health(&cluster(Some(zero))),
            Err(("outlier_detection.base_ejection_time", _))
        ));
        let mut panic = cluster(Some(OutlierDetection::default()));
        panic.common_lb_config = Some(cluster::CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: 120.0 }),
            ..Default::default()
        });
        assert!(matches!(
            cluster_health(&panic),
            Err(("common_lb_config.healthy_panic_threshold", _))
        ));
    }
}
