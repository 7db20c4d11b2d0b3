//! The churn soak at CI size (`sockmesh_tests::soak`): 1,200 services with
//! outlier detection and a circuit breaker pass through a node whose maps hold
//! 256, in six waves of 200, each connected to once; after every wave the maps
//! and the agent's state hold that wave alone, and at the end a new service's
//! circuit breaker and outlier detection still work. The agent's memory after
//! the last wave is within 10 % of after the first. `cargo xtask bench` runs the
//! same soak with 200,000 services (`SMBENCH_ONLY=soak`).

use std::path::Path;

use sockmesh_tests::soak::{self, Soak};

const PROBE: &str = env!("CARGO_BIN_EXE_smprobe");

#[test]
fn services_come_and_go_far_past_the_maps_capacity_and_leave_nothing() {
    let out = soak::run(
        &sockmesh_tests::sockmesh_bin(),
        Path::new(PROBE),
        Soak {
            waves: 6,
            per_wave: 200,
            max_services: 256,
        },
    );
    let rss: Vec<u64> = out.waves.iter().map(|w| w.rss_kib).collect();
    eprintln!("soak: RSS per wave (KiB) {rss:?}; {:?}", out.waves);
    let (first, last) = (rss[0], rss[rss.len() - 1]);
    assert!(
        first > 0 && last * 10 <= first * 11,
        "the agent's RSS after the last wave ({last} KiB) is within 10 % of after the first ({first} KiB): {rss:?}"
    );
}
