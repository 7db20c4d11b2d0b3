//! A DNS server the tests control, on loopback: it answers A and AAAA questions
//! for the names it is given (RFC 1035 wire format, written here from the RFC
//! so the agent's resolver library is not checked against itself), answers
//! NXDOMAIN for other names, and can be switched to SERVFAIL.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

/// How the server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Answer,
    /// RCODE 2 to every question.
    ServFail,
}

#[derive(Debug)]
struct Zone {
    names: BTreeMap<String, Vec<IpAddr>>,
    ttl: u32,
    mode: Mode,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    queries: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DnsServer {
    /// Listens on 127.0.0.1, a port the kernel picks; answers with `ttl`.
    pub fn start(ttl: u32) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), ttl)
    }

    /// Listens on `at` (a resolver named in a `resolv.conf`, which has no port,
    /// listens on 53 of a loopback address of its own); answers with `ttl`.
    pub fn start_on(at: SocketAddr, ttl: u32) -> Self {
        let socket = UdpSocket::bind(at).expect("bind the test DNS server");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("local address");
        let zone = Arc::new(Mutex::new(Zone {
            names: BTreeMap::new(),
            ttl,
            mode: Mode::Answer,
        }));
        let queries = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (zone, queries, stop) = (zone.clone(), queries.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    queries.fetch_add(1, Ordering::Relaxed);
                    let reply = match zone.lock() {
                        Ok(z) => reply(&buf[..n], &z),
                        Err(_) => None,
                    };
                    if let Some(reply) = reply {
                        let _ = socket.send_to(&reply, from);
                    }
                }
            })
        };
        Self {
            addr,
            zone,
            queries,
            stop,
            thread: Some(thread),
        }
    }

    /// `name` (no trailing dot, any case) answers `addrs` from now on; an empty
    /// list: the name exists with no address of either family.
    pub fn set(&self, name: &str, addrs: &[&str]) {
        let addrs = addrs.iter().map(|a| a.parse().expect("ip")).collect();
        if let Ok(mut z) = self.zone.lock() {
            z.names.insert(name.to_ascii_lowercase(), addrs);
        }
    }

    /// `name` no longer exists (NXDOMAIN).
    pub fn remove(&self, name: &str) {
        if let Ok(mut z) = self.zone.lock() {
            z.names.remove(&name.to_ascii_lowercase());
        }
    }

    pub fn mode(&self, mode: Mode) {
        if let Ok(mut z) = self.zone.lock() {
            z.mode = mode;
        }
    }

    /// Questions received so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// The reply to one query message, `None` for something that is not a query.
fn reply(query: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let id = [query[0], query[1]];
    let flags = u16::from_be_bytes([query[2], query[3]]);
    if flags & 0x8000 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None; // a response, or not exactly one question
    }
    // The question: labels up to the root, then QTYPE and QCLASS.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question = query.get(12..at + 4)?;
    let name = labels.join(".");
    let addrs = zone.names.get(&name);
    let rcode: u16 = match (zone.mode, addrs) {
        (Mode::ServFail, _) => 2,
        (_, None) => 3, // NXDOMAIN
        _ => 0,
    };
    let answers: Vec<&IpAddr> = addrs
        .into_iter()
        .flatten()
        .filter(|ip| {
            rcode == 0
                && matches!(
                    (ip, qtype),
                    (IpAddr::V4(_), TYPE_A) | (IpAddr::V6(_), TYPE_AAAA)
                )
        })
        .collect();
    // QR, the query's opcode and RD, RA, the RCODE.
    let reply_flags = 0x8000 | (flags & 0x7900) | 0x0080 | rcode;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&id);
    out.extend_from_slice(&reply_flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::try_from(answers.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for ip in answers {
        out.extend_from_slice(&0xc00cu16.to_be_bytes()); // the question's name
        let rdata: Vec<u8> = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes()); // IN
        out.extend_from_slice(&zone.ttl.to_be_bytes());
        out.extend_from_slice(&u16::try_from(rdata.len()).ok()?.to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    Some(out)
}
