//! The per-service counter families of `/metrics`, written as OpenMetrics text
//! directly: one series per service and counter is 200,000 series at 100,000
//! services, which through prometheus-client's label families (a hashed, boxed
//! label set and a counter per series) took most of a scrape.
//!
//! A scrape streams them ([`stream`]): the series are written as the counter
//! array is walked, into chunks of [`CHUNK`] bytes sent as each fills, and
//! the chunks' buffers are kept for the next ones. A page of 12 MiB at 100,000
//! services was a fresh allocation at every scrape, and faulting its pages in
//! (the allocator returns freed pages at once) was a third of the scrape.

use std::{
    io::Write as _,
    sync::{Mutex, PoisonError},
};

use hyper::body::Bytes;

use crate::{dataplane::ServiceCounts, model::ServiceAddr};

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

/// Bytes of series a chunk holds before it is sent.
pub const CHUNK: usize = 64 * 1024;

/// Chunk buffers kept for the next chunks (the channel a scrape sends into
/// holds two; one more is being written): 256 KiB at most.
const KEPT: usize = 4;

/// Buffers of sent chunks, back from the response once written out.
static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A chunk's buffer, given back to [`SPARE`] when the response drops it.
struct Chunk(Vec<u8>);

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let mut spare = SPARE.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.len() < KEPT {
            let mut buf = std::mem::take(&mut self.0);
            buf.clear();
            spare.push(buf);
        }
    }
}

/// A buffer for the next chunk, a kept one if there is one.
fn buffer() -> Vec<u8> {
    SPARE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop()
        .unwrap_or_else(|| Vec::with_capacity(CHUNK + 256))
}

/// Writes the `sockmesh_service_redirects` and `sockmesh_service_no_backend`
/// families (descriptor, then one `_total` series per service; nothing without
/// a service, as prometheus-client renders a registered family) in chunks,
/// handing each to `send` (false: the reader is gone, stop). `services` hands
/// every service and its counts to the function it is given; it is called once
/// per family.
pub fn stream(
    services: impl Fn(&mut dyn FnMut(&ServiceAddr, &ServiceCounts)),
    send: &mut dyn FnMut(Bytes) -> bool,
) {
    let mut buf = buffer();
    let mut gone = false;
    for family in &FAMILIES {
        let mut first = true;
        services(&mut |service, counts| {
            if gone {
                return;
            }
            if first {
                write_descriptor(&mut buf, family);
                first = false;
            }
            write_series(&mut buf, family, service, counts);
            if buf.len() >= CHUNK {
                gone = !send(Bytes::from_owner(Chunk(std::mem::replace(
                    &mut buf,
                    buffer(),
                ))));
            }
        });
    }
    if !gone && !buf.is_empty() {
        send(Bytes::from_owner(Chunk(buf)));
    }
}

/// [`stream`] of `services` into one string.
pub fn write_counters(out: &mut String, services: &[(ServiceAddr, ServiceCounts)]) {
    stream(
        |f| {
            for (service, counts) in services {
                f(service, counts);
            }
        },
        &mut |chunk| {
            out.push_str(&String::from_utf8_lossy(&chunk));
            true
        },
    );
}

fn write_descriptor(out: &mut Vec<u8>, family: &Family) {
    let _ = writeln!(out, "# HELP {} {}.", family.name, family.help);
    let _ = writeln!(out, "# TYPE {} counter", family.name);
}

fn write_series(out: &mut Vec<u8>, family: &Family, service: &ServiceAddr, counts: &ServiceCounts) {
    // The line is put together on the stack and appended at once: appending its
    // dozen short pieces one by one was a third of a scrape (a copy call each).
    let mut line = Line::default();
    line.put(family.name.as_bytes());
    line.put(b"_total{service=\"");
    push_service(&mut line, service);
    line.put(b"\"} ");
    push_u64(&mut line, (family.value)(counts));
    line.put(b"\n");
    out.extend_from_slice(line.as_bytes());
}

/// One series line, built in place. Its longest is under 160 bytes: a family
/// name, an IPv6 service (`[8 groups]:65535/udp`, 51) and a 20-digit count.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Line {
    /// Appends `bytes` (dropped whole if they would not fit, which no line
    /// reaches).
    fn put(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        if let Some(dst) = self.buf.get_mut(self.len..end) {
            dst.copy_from_slice(bytes);
            self.len = end;
        }
    }

    fn byte(&mut self, b: u8) {
        if let Some(dst) = self.buf.get_mut(self.len) {
            *dst = b;
            self.len += 1;
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// `service` in its display form (`10.96.0.20:443/tcp`), an IPv4 one without
/// the formatting machinery.
fn push_service(out: &mut Line, service: &ServiceAddr) {
    match service.vip {
        std::net::IpAddr::V4(ip) => {
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    out.byte(b'.');
                }
                push_u64(out, u64::from(octet));
            }
            out.byte(b':');
            push_u64(out, u64::from(service.port));
            out.put(match service.protocol {
                crate::model::Protocol::Tcp => b"/tcp",
                crate::model::Protocol::Udp => b"/udp",
            });
        }
        std::net::IpAddr::V6(_) => out.put(service.to_string().as_bytes()),
    }
}

/// `n` in decimal.
fn push_u64(out: &mut Line, mut n: u64) {
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
    for &d in &digits[i..] {
        out.byte(d);
    }
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
            let mut s = Line::default();
            push_u64(&mut s, n);
            assert_eq!(s.as_bytes(), n.to_string().as_bytes());
        }
        for (service, _) in &services {
            let mut s = Line::default();
            push_service(&mut s, service);
            assert_eq!(s.as_bytes(), service.to_string().as_bytes());
        }
        // The longest line fits.
        let widest = ServiceAddr {
            vip: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                .parse()
                .expect("ip"),
            port: 65_535,
            protocol: crate::model::Protocol::Udp,
        };
        let mut out = Vec::new();
        let max = ServiceCounts {
            redirects: u64::MAX,
            no_backend: u64::MAX,
        };
        write_series(&mut out, &FAMILIES[0], &widest, &max);
        assert_eq!(
            String::from_utf8(out).expect("ASCII"),
            format!(
                "sockmesh_service_redirects_total{{service=\"{widest}\"}} {}\n",
                u64::MAX
            )
        );
        let mut empty = String::new();
        write_counters(&mut empty, &[]);
        assert_eq!(
            normalized(&empty),
            normalized(&rendered_by_the_library(&[]))
        );
    }

    #[test]
    fn a_long_page_is_sent_in_chunks_that_add_up_to_it() {
        let services: Vec<(ServiceAddr, ServiceCounts)> = (0..5_000u32)
            .map(|i| {
                (
                    ServiceAddr {
                        vip: std::net::Ipv4Addr::from(0x0a60_0000 + i).into(),
                        port: 80,
                        protocol: crate::model::Protocol::Tcp,
                    },
                    ServiceCounts {
                        redirects: u64::from(i),
                        no_backend: 1,
                    },
                )
            })
            .collect();
        let mut whole = String::new();
        write_counters(&mut whole, &services);
        assert_eq!(
            normalized(&whole),
            normalized(&rendered_by_the_library(&services))
        );
        let mut chunks = Vec::new();
        stream(
            |f| services.iter().for_each(|(s, c)| f(s, c)),
            &mut |chunk| {
                chunks.push(chunk);
                true
            },
        );
        assert!(chunks.len() > 2, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.len() < CHUNK + 256));
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(String::from_utf8(joined).expect("ASCII"), whole);
        // A reader that goes away stops the writing at once.
        let mut sent = 0;
        stream(|f| services.iter().for_each(|(s, c)| f(s, c)), &mut |_| {
            sent += 1;
            false
        });
        assert_eq!(sent, 1);
    }
}
