//! Closing sockets still connected to removed endpoints (`--terminate-removed-connections`).
//!
//! The kernel's inet_diag `SOCK_DESTROY` (what `ss -K` uses; `CONFIG_INET_DIAG_DESTROY`)
//! aborts a socket by its id: the application sees ECONNABORTED on its next call. In
//! every network namespace on the node (`/proc/*/ns/net`, each once), sockets are
//! dumped per family and protocol, and one is destroyed only if its destination is a
//! removed endpoint *and* sockmesh redirected it: its (cookie, destination) is in the
//! reverse-translation map SM_REVERSE. Sockets that connected to the endpoint's
//! address directly are left alone. UDP clients of a removed endpoint are the main
//! users: a connected UDP socket has no handshake that would ever fail by itself.
//! The socket's SM_REVERSE entry is deleted here, once it is destroyed: an aborted
//! UDP socket is disconnected, so sock_release, which keys the entry by the
//! socket's peer, no longer finds it when the socket closes.
//!
//! `bpf_sock_destroy()` from a socket iterator (6.5+) would do the same from a BPF
//! program; aya-ebpf 0.3 has no kfunc call support, so the netlink path is used.

use std::{
    collections::BTreeSet,
    fs,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use sockmesh_common::{ReverseKey, ReverseValue, map_names};

use super::keys::{ip_to_words, port_to_map};
use crate::model::{Endpoint, Protocol};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// TCP states worth aborting (everything but LISTEN, TIME_WAIT, CLOSE); a connected
/// UDP socket reports ESTABLISHED.
const STATES: u32 =
    (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);
const HDR: usize = 16;
const REQ: usize = 56;
const MSG_MIN: usize = 72;

/// Why sockets could not be destroyed.
#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "this kernel cannot destroy sockets: inet_diag SOCK_DESTROY answered {0} (needs CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN)"
    )]
    Unsupported(std::io::Error),
    /// The kernel refused a socket dump, e.g. ENOENT when no inet_diag handler for
    /// the protocol is built in or loadable (`udp_diag`, `tcp_diag`).
    #[error("inet_diag dump of family {family} protocol {protocol} answered {source}")]
    Dump {
        family: u8,
        protocol: u8,
        #[source]
        source: std::io::Error,
    },
    /// The probe's own socket was not aborted by SOCK_DESTROY.
    #[error(
        "inet_diag SOCK_DESTROY of a {0} socket did not abort it (socket error afterwards: {1:?})"
    )]
    NotAborted(&'static str, Option<std::io::Error>),
    /// sock_diag has no handler for the protocol: its module is neither built in
    /// nor loaded, and the kernel could not autoload it.
    #[error(
        "the kernel has no inet_diag handler for {protocol} sockets: module {modules} not loaded (modprobe it, or build it in)"
    )]
    NoHandler {
        protocol: &'static str,
        modules: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DestroyError {
    let what = what.into();
    move |source| DestroyError::Io { what, source }
}

/// What a sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestroyReport {
    pub namespaces: usize,
    pub destroyed: usize,
    /// Matching sockets not redirected by sockmesh (left alone).
    pub skipped: usize,
    /// Namespaces whose sweep failed (each logged); the others were still swept.
    pub failed: usize,
}

fn netlink() -> Result<OwnedFd, DestroyError> {
    // SAFETY: plain socket(2); the result is checked before it is wrapped.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io("netlink sock_diag socket")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a new, valid descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, msg: &[u8]) -> Result<(), DestroyError> {
    // SAFETY: `msg` is a valid buffer of its length; the kernel address is implied
    // by the netlink socket (a zeroed sockaddr_nl is the kernel).
    let n = unsafe {
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io("netlink send")(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, DestroyError> {
    // SAFETY: `buf` is a valid writable buffer of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| io("netlink recv")(std::io::Error::last_os_error()))
}

fn request(kind: u16, flags: u16, family: u8, protocol: u8, states: u32, id: &[u8; 48]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR + REQ);
    m.extend_from_slice(&((HDR + REQ) as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    m.extend_from_slice(&[family, protocol, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

/// Reads the NLMSG_ERROR answer of a non-dump request: Ok for 0, the errno otherwise.
fn ack(fd: &OwnedFd) -> Result<Result<(), std::io::Error>, DestroyError> {
    let mut buf = [0u8; 512];
    let n = recv(fd, &mut buf)?;
    if n >= HDR + 4 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
        let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return Ok(if err == 0 {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(-err))
        });
    }
    Ok(Ok(()))
}

/// Checks that SOCK_DESTROY works here, for both protocols the sweep dumps: a
/// connected socket of the agent's own on loopback, TCP and UDP, is destroyed by
/// its id and must report ECONNABORTED afterwards. A request for a socket that does
/// not exist would prove little: sock_diag answers ENOENT both for a missing socket
/// and for a protocol whose handler is neither built in nor loaded (`tcp_diag`,
/// `udp_diag`: modules on Debian's kernels, autoloaded on first use when modprobe
/// works), so the probe names the module in that case.
pub fn probe() -> Result<(), DestroyError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("probe: TCP bind"))?;
    let server = listener
        .local_addr()
        .map_err(io("probe: TCP local address"))?;
    let client = std::net::TcpStream::connect(server).map_err(io("probe: TCP connect"))?;
    let _accepted = listener.accept().map_err(io("probe: TCP accept"))?;
    probe_socket(client.as_fd(), Proto::Tcp, || client.take_error())?;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io("probe: UDP bind"))?;
    let local = sock.local_addr().map_err(io("probe: UDP local address"))?;
    sock.connect(local).map_err(io("probe: UDP connect"))?;
    probe_socket(sock.as_fd(), Proto::Udp, || sock.take_error())
}

/// Sends SOCK_DESTROY for the socket `id` (an `inet_diag_sockid`) and returns the
/// kernel's answer: `Err(DestroyError)` if netlink itself failed, the inner
/// result for what the kernel said about the socket.
fn destroy_one(
    fd: &OwnedFd,
    family: u8,
    protocol: u8,
    id: &[u8; 48],
) -> Result<Result<(), std::io::Error>, DestroyError> {
    send(
        fd,
        &request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            family,
            protocol,
            STATES,
            id,
        ),
    )?;
    ack(fd)
}

/// A protocol the sweep dumps, with the modules sock_diag needs for it.
#[derive(Clone, Copy)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }

    fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    /// inet_diag itself, then the protocol's handler.
    fn modules(self) -> [&'static str; 2] {
        match self {
            Proto::Tcp => ["inet_diag", "tcp_diag"],
            Proto::Udp => ["inet_diag", "udp_diag"],
        }
    }
}

/// An IPv4 address of `sock`, from getsockname(2) or getpeername(2).
fn sock_addr_of(
    sock: BorrowedFd<'_>,
    get: unsafe extern "C" fn(
        libc::c_int,
        *mut libc::sockaddr,
        *mut libc::socklen_t,
    ) -> libc::c_int,
) -> Result<libc::sockaddr_in, DestroyError> {
    // SAFETY: a zeroed sockaddr_in is a valid value of the type.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `get` is getsockname or getpeername, which write at most `len` bytes
    // into `sa`; `sock` is a valid descriptor for the call's duration.
    let rc = unsafe { get(sock.as_raw_fd(), (&raw mut sa).cast(), &raw mut len) };
    if rc == 0 {
        Ok(sa)
    } else {
        Err(io("probe: socket address")(std::io::Error::last_os_error()))
    }
}

/// Destroys a connected IPv4 loopback socket of the agent's own by its id and checks
/// that the kernel aborted it (`take_error` reads its pending SO_ERROR).
fn probe_socket(
    sock: BorrowedFd<'_>,
    proto: Proto,
    take_error: impl FnOnce() -> std::io::Result<Option<std::io::Error>>,
) -> Result<(), DestroyError> {
    let local = sock_addr_of(sock, libc::getsockname)?;
    let peer = sock_addr_of(sock, libc::getpeername)?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io("probe: SO_COOKIE")(std::io::Error::last_os_error()));
    }
    // inet_diag_sockid: sport and dport, src[4] and dst[4] (all in network order,
    // as the sockaddr holds them), the interface, the cookie.
    let mut id = [0u8; 48];
    id[0..2].copy_from_slice(&local.sin_port.to_ne_bytes());
    id[2..4].copy_from_slice(&peer.sin_port.to_ne_bytes());
    id[4..8].copy_from_slice(&local.sin_addr.s_addr.to_ne_bytes());
    id[20..24].copy_from_slice(&peer.sin_addr.s_addr.to_ne_bytes());
    #[expect(clippy::cast_possible_truncation, reason = "the cookie's two halves")]
    {
        id[40..44].copy_from_slice(&(cookie as u32).to_ne_bytes());
        id[44..48].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    }
    let fd = netlink()?;
    match destroy_one(&fd, libc::AF_INET as u8, proto.number(), &id)? {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            let missing: Vec<&str> = proto
                .modules()
                .into_iter()
                .filter(|m| !Path::new("/sys/module").join(m).exists())
                .collect();
            return Err(DestroyError::NoHandler {
                protocol: proto.name(),
                modules: if missing.is_empty() {
                    proto.modules().join(" or ")
                } else {
                    missing.join(" and ")
                },
            });
        }
        Err(e) => return Err(DestroyError::Unsupported(e)),
    }
    match take_error() {
        Ok(Some(e)) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
        Ok(other) => Err(DestroyError::NotAborted(proto.name(), other)),
        Err(e) => Err(DestroyError::NotAborted(proto.name(), Some(e))),
    }
}

fn id_dst(id: &[u8]) -> ([u32; 4], u16) {
    let port = u16::from_be_bytes([id[2], id[3]]);
    let mut dst = [0u32; 4];
    for (i, w) in dst.iter_mut().enumerate() {
        let o = 20 + i * 4;
        *w = u32::from_ne_bytes([id[o], id[o + 1], id[o + 2], id[o + 3]]);
    }
    (dst, port)
}

fn id_cookie(id: &[u8]) -> u64 {
    let lo = u32::from_ne_bytes([id[40], id[41], id[42], id[43]]);
    let hi = u32::from_ne_bytes([id[44], id[45], id[46], id[47]]);
    u64::from(lo) | (u64::from(hi) << 32)
}

/// Map words of an address as inet_diag reports it for `family`.
fn diag_words(family: u8, addr: IpAddr) -> Option<[u32; 4]> {
    match (family as i32, addr) {
        (libc::AF_INET, IpAddr::V4(v4)) => Some([u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        (libc::AF_INET6, ip) => Some(ip_to_words(ip)),
        _ => None,
    }
}

/// Destroys, in the current network namespace, the sockets redirected to `targets`.
fn sweep_here(
    targets: &BTreeSet<Endpoint>,
    reverse: &mut BpfHashMap<MapData, ReverseKey, ReverseValue>,
    report: &mut DestroyReport,
) -> Result<(), DestroyError> {
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for (proto, protocol) in [
            (libc::IPPROTO_TCP as u8, Protocol::Tcp),
            (libc::IPPROTO_UDP as u8, Protocol::Udp),
        ] {
            let wanted: Vec<([u32; 4], u16, Endpoint)> = targets
                .iter()
                .filter(|t| t.protocol == protocol)
                .filter_map(|t| diag_words(family, t.addr).map(|w| (w, t.port, *t)))
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let fd = netlink()?;
            tracing::debug!(family, proto, "dumping sockets");
            send(
                &fd,
                &request(
                    SOCK_DIAG_BY_FAMILY,
                    NLM_F_REQUEST | NLM_F_DUMP,
                    family,
                    proto,
                    STATES,
                    &[0; 48],
                ),
            )?;
            let mut doomed: Vec<([u8; 48], ReverseKey)> = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            'dump: loop {
                let n = recv(&fd, &mut buf)?;
                let mut off = 0;
                while off + HDR <= n {
                    let len =
                        u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
                            as usize;
                    let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                    if kind == NLMSG_ERROR && off + HDR + 4 <= n {
                        let err = i32::from_ne_bytes([
                            buf[off + HDR],
                            buf[off + HDR + 1],
                            buf[off + HDR + 2],
                            buf[off + HDR + 3],
                        ]);
                        if err != 0 {
                            return Err(DestroyError::Dump {
                                family,
                                protocol: proto,
                                source: std::io::Error::from_raw_os_error(-err),
                            });
                        }
                    }
                    if kind == NLMSG_DONE || kind == NLMSG_ERROR || len < HDR {
                        break 'dump;
                    }
                    if len >= HDR + MSG_MIN && off + len <= n {
                        let id = &buf[off + HDR + 4..off + HDR + 52];
                        let (dst, dport) = id_dst(id);
                        if let Some((_, _, t)) =
                            wanted.iter().find(|(w, p, _)| *w == dst && *p == dport)
                        {
                            let key = ReverseKey {
                                cookie: id_cookie(id),
                                addr: ip_to_words(t.addr),
                                port: port_to_map(t.port),
                                pad: [0; 6],
                            };
                            let redirected = reverse.get(&key, 0).is_ok();
                            tracing::debug!(
                                family,
                                proto,
                                cookie = key.cookie,
                                endpoint = %t.addr,
                                port = t.port,
                                redirected,
                                "socket of a removed endpoint"
                            );
                            if redirected {
                                let mut copy = [0u8; 48];
                                copy.copy_from_slice(id);
                                doomed.push((copy, key));
                            } else {
                                report.skipped += 1;
                            }
                        }
                    }
                    off += (len + 3) & !3;
                }
                if n == 0 {
                    break;
                }
            }
            tracing::debug!(
                family,
                proto,
                doomed = doomed.len(),
                skipped = report.skipped,
                "dump done"
            );
            for (id, key) in doomed {
                let answer = destroy_one(&fd, family, proto, &id)?;
                tracing::debug!(
                    family,
                    proto,
                    cookie = id_cookie(&id),
                    answer = ?answer,
                    "SOCK_DESTROY"
                );
                match answer {
                    Ok(()) => {
                        report.destroyed += 1;
                        // Gone already if the socket closed meanwhile.
                        let _ = reverse.remove(&key);
                    }
                    // Closed since the dump.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(DestroyError::Unsupported(e)),
                }
            }
        }
    }
    Ok(())
}

/// The network namespaces on the node, one open descriptor each, with its nsfs
/// inode (for logs).
fn namespaces() -> Vec<(u64, fs::File)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut candidates: Vec<std::path::PathBuf> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"))
        .collect();
    candidates.extend(
        fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    );
    for path in candidates {
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        let key = std::os::unix::fs::MetadataExt::ino(&meta);
        if seen.insert(key)
            && let Ok(f) = fs::File::open(&path)
        {
            out.push((key, f));
        }
    }
    out
}

/// Destroys sockets redirected to `targets` in every network namespace. The
/// reverse-translation map is read from `maps_dir` (the pinned maps).
pub fn destroy_everywhere(
    maps_dir: &Path,
    targets: &BTreeSet<Endpoint>,
) -> Result<DestroyReport, DestroyError> {
    let mut report = DestroyReport::default();
    if targets.is_empty() {
        return Ok(report);
    }
    let name = map_names::REVERSE;
    let map_err = |source| DestroyError::Map { name, source };
    let data = MapData::from_pin(maps_dir.join(name)).map_err(map_err)?;
    let mut reverse: BpfHashMap<MapData, ReverseKey, ReverseValue> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err)?;
    let namespaces = namespaces();
    report.namespaces = namespaces.len();
    // Each namespace is entered by a short-lived thread (setns changes only the
    // calling thread's network namespace), so the agent's own threads stay put.
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| -> Result<DestroyReport, DestroyError> {
            let mut r = DestroyReport::default();
            let mut first_error = None;
            // One namespace that cannot be swept must not spare the others.
            for (inode, ns) in &namespaces {
                let swept = nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| io("setns")(std::io::Error::from(e)))
                    .and_then(|()| sweep_here(targets, &mut reverse, &mut r));
                if let Err(e) = swept {
                    tracing::warn!(netns = inode, error = %e, "sweeping a network namespace failed");
                    r.failed += 1;
                    first_error.get_or_insert(e);
                }
            }
            match first_error {
                Some(e) if r.failed == namespaces.len() => Err(e),
                _ => Ok(r),
            }
        });
        match handle.join() {
            Ok(r) => r.map(|r| {
                report.destroyed = r.destroyed;
                report.skipped = r.skipped;
                report.failed = r.failed;
            }),
            Err(_) => Err(io("sweeper thread")(std::io::Error::other("panicked"))),
        }
    })?;
    Ok(report)
}
