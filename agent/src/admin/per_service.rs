//! The per-service counter families of `/metrics`, written as OpenMetrics text
//! directly: one series per service and counter is 200,000 series at 100,000
//! services, which through prometheus-client's label families (a hashed, boxed
//! label set and a counter per series) took most of a scrape.

use std::fmt::Write as _;

use crate::dataplane::ServiceCounts;

use crate::model::ServiceAddr;

/// A counter family of one `service` label: name, help, and the value read.
struct Family {
    name: &'static str,
    help: &'static str,
    value: fn(&ServiceCounts) -> u64,
}

const FAMILIES: [Family; 2] = [
    Family {
        name: "sockmesh_service_redirects",
        help: "Connections (and unconnected UDP sends) sent to one of the service's backends, from the kernel's per-CPU counters",
        value: |s| s.redirects,
    },
    Family {
        name: "sockmesh_service_no_backend",
        help: "Calls to the service refused (ECONNREFUSED) because it had no active backend",
        value: |s| s.no_backend,
    },
];

/// Appends the `sockmesh_service_redirects` and `sockmesh_service_no_backend`
/// families (descriptor, then one `_total` series per service) to `out`, as
/// prometheus-client renders a registered counter family: nothing without a
/// service.
pub fn write_counters(out: &mut String, services: &[(ServiceAddr, ServiceCounts)]) {
    if services.is_empty() {
        return;
    }
    // Each service's label text, formatted once for both families.
    let mut labels = String::with_capacity(services.len() * 24);
    let mut ends = Vec::with_capacity(services.len());
    for (service, _) in services {
        push_service(&mut labels, service);
        ends.push(labels.len());
    }
    let longest = FAMILIES.iter().map(|f| f.name.len()).max().unwrap_or(0);
    out.reserve(2 * (labels.len() + services.len() * (longest + 40)));
    for family in &FAMILIES {
        let _ = writeln!(out, "# HELP {} {}.", family.name, family.help);
        let _ = writeln!(out, "# TYPE {} counter", family.name);
        let mut start = 0;
        for ((_, stats), &end) in services.iter().zip(&ends) {
            out.push_str(family.name);
            out.push_str("_total{service=\"");
            out.push_str(&labels[start..end]);
            out.push_str("\"} ");
            push_u64(out, (family.value)(stats));
            out.push('\n');
            start = end;
        }
    }
}

/// `service` in its display form (`10.96.0.20:443/tcp`), an IPv4 one without
/// the formatting machinery.
fn push_service(out: &mut String, service: &ServiceAddr) {
    match service.vip {
        std::net::IpAddr::V4(ip) => {
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, u64::from(octet));
            }
            out.push(':');
            push_u64(out, u64::from(service.port));
            out.push('/');
            out.push_str(match service.protocol {
                crate::model::Protocol::Tcp => "tcp",
                crate::model::Protocol::Udp => "udp",
            });
        }
        std::net::IpAddr::V6(_) => {
            let _ = write!(out, "{service}");
        }
    }
}

/// `n` in decimal.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        // n % 10 < 10: the cast keeps it.
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits: one append, not a UTF-8 encoding per digit.
    out.push_str(std::str::from_utf8(&digits[i..]).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        encoding::text::encode,
        metrics::{counter::Counter, family::Family},
        registry::Registry,
    };

    use super::*;

    /// The families as prometheus-client renders them (the library is the
    /// oracle of the format).
    fn rendered_by_the_library(services: &[(ServiceAddr, ServiceCounts)]) -> String {
        type Labels = Vec<(String, String)>;
        let mut r = Registry::default();
        for family in &FAMILIES {
            let f: Family<Labels, Counter> = Family::default();
            for (service, stats) in services {
                f.get_or_create(&vec![("service".to_owned(), service.to_string())])
                    .inc_by((family.value)(stats));
            }
            r.register(family.name, family.help, f);
        }
        let mut out = String::new();
        encode(&mut out, &r).expect("encode");
        out
    }

    /// The lines of `text` but the `# EOF`, each family's series sorted.
    fn normalized(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut series = Vec::new();
        for line in text.lines().filter(|l| *l != "# EOF") {
            if line.starts_with('#') {
                series.sort();
                out.append(&mut series);
                out.push(line.to_owned());
            } else {
                series.push(line.to_owned());
            }
        }
        series.sort();
        out.append(&mut series);
        out
    }

    #[test]
    fn the_families_read_as_prometheus_client_renders_them() {
        let services = [
            (
                ServiceAddr {
                    vip: "10.96.0.20".parse().expect("ip"),
                    port: 443,
                    protocol: crate::model::Protocol::Tcp,
                },
                ServiceCounts {
                    redirects: 7,
                    no_backend: 0,
                },
            ),
            (
                ServiceAddr {
                    vip: "fd00::53".parse().expect("ip"),
                    port: 53,
                    protocol: crate::model::Protocol::Udp,
                },
                ServiceCounts {
                    redirects: 0,
                    no_backend: 12_345_678_901,
                },
            ),
        ];
        let mut ours = String::new();
        write_counters(&mut ours, &services);
        assert_eq!(
            normalized(&ours),
            normalized(&rendered_by_the_library(&services))
        );
        assert!(
            ours.lines().any(|l| l
                == "sockmesh_service_no_backend_total{service=\"[fd00::53]:53/udp\"} 12345678901"),
            "{ours}"
        );
        for n in [0, 7, 10, 255, 65_535, u64::MAX] {
            let mut s = String::new();
            push_u64(&mut s, n);
            assert_eq!(s, n.to_string());
        }
        for (service, _) in &services {
            let mut s = String::new();
            push_service(&mut s, service);
            assert_eq!(s, service.to_string());
        }
        let mut empty = String::new();
        write_counters(&mut empty, &[]);
        assert_eq!(
            normalized(&empty),
            normalized(&rendered_by_the_library(&[]))
        );
    }
}
