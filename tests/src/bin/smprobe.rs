//! Test and benchmark traffic tool. Runs inside a namespace/cgroup the caller put it
//! in (see `sockmesh_tests::Spawn`).
//!
//! ```text
//! smprobe serve ADDR:PORT=NAME [ADDR:PORT=NAME ...]   TCP: send NAME, close
//!                                                     (NAME@MILLIS: close MILLIS
//!                                                     after sending). UDP (prefix
//!                                                     udp:): reply NAME.
//! smprobe connect ADDR:PORT COUNT [MILLIS]            COUNT TCP connects (or until
//!     MILLIS have passed); one line each: START_NS END_NS NAME|E<errno>
//!     START/END are CLOCK_MONOTONIC, comparable with the caller's clock.
//! smprobe udp ADDR:PORT COUNT [N]                     COUNT fresh UDP sockets, N
//!     requests each; one line each: FROM[|FROM..] NAME,NAME.. or `- E<errno>`
//! smprobe peer ADDR:PORT                              connect once, print getpeername
//! smprobe rate ADDR:PORT RPS MILLIS [http]           open-loop fixed rate, a new TCP
//!     connection per request (HTTP/1.1 GET with Connection: close if `http`, the
//!     body is the name); one line each: START_NS END_NS NAME|E<errno>
//! smprobe udp-hold ADDR:PORT MILLIS                   one connected UDP socket asking
//!     every 50 ms until MILLIS pass or an error; one line each: NAME or E<errno>
//! smprobe udp-reconnect ADDR:PORT ADDR:PORT          one UDP socket connected to
//!     each address in turn, asking once each; one line: NAME|E<errno> per address
//! smprobe cc ADDR:PORT COUNT                          COUNT connect()+close() (RST,
//!     no TIME_WAIT); prints COUNT FAILED MEAN_NS P50_NS P99_NS
//! smprobe load ADDR:PORT RATE MILLIS                  open loop: RATE connects/s for
//!     MILLIS, each read to the server's close; prints per backend NAME NEW PEAK
//!     (connections opened, most open at once), then `failed N`
//! smprobe hold ADDR:PORT COUNT                        COUNT TCP connects one after
//!     the other, each kept open; one line each: NAME|E<errno>, then `held`; closes
//!     them all and exits when stdin closes (or a line arrives)
//! smprobe clients ADDR:PORT PER SRC|- [SRC ...]       per client, PER TCP connects
//!     one after the other, bound to source address SRC (`-`: unbound, the
//!     kernel picks); one line per client: SRC NAME|E<errno> ...
//! smprobe each                                        one TCP connect to each ADDR:PORT
//!     read from stdin (a line each), reading the name; prints `ok N failed M`
//!     and the first failure's `ADDR:PORT E<errno>` if any
//! smprobe capture ADDR:PORT NAME                      a sidecar's capture port: for
//!     each connection iptables redirected to it, one line with its original
//!     destination (SO_ORIGINAL_DST); answers NAME and closes
//! ```

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use sockmesh_tests::monotonic_ns;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("connect") => connect(&args[1..]),
        Some("udp") => udp(&args[1..]),
        Some("peer") => peer(&args[1..]),
        Some("cc") => connect_close(&args[1..]),
        Some("rate") => rate(&args[1..]),
        Some("udp-hold") => udp_hold(&args[1..]),
        Some("udp-reconnect") => udp_reconnect(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("clients") => clients(&args[1..]),
        Some("load") => load(&args[1..]),
        Some("timeline") => timeline(&args[1..]),
        Some("drain") => drain(&args[1..]),
        Some("capture") => capture(&args[1..]),
        Some("each") => each(),
        _ => Err("usage: smprobe serve|connect|udp|peer ...".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(io::stderr(), "smprobe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn addr(s: Option<&String>) -> Result<SocketAddr, String> {
    let s = s.ok_or("missing ADDR:PORT")?;
    s.parse().map_err(|e| format!("{s}: {e}"))
}

fn number(s: Option<&String>, default: u64) -> Result<u64, String> {
    s.map_or(Ok(default), |s| s.parse().map_err(|e| format!("{s}: {e}")))
}

fn serve(specs: &[String]) -> Result<(), String> {
    let mut handles = Vec::new();
    for spec in specs {
        if let Some(at) = spec.strip_prefix("blast:") {
            handles.push(blast(at)?);
            continue;
        }
        let (udp, spec) = match spec.strip_prefix("udp:") {
            Some(rest) => (true, rest),
            None => (false, spec.as_str()),
        };
        let (at, name) = spec.split_once('=').ok_or("serve wants ADDR:PORT=NAME")?;
        let at: SocketAddr = at.parse().map_err(|e| format!("{at}: {e}"))?;
        let (name, hold) = match name.split_once('@') {
            Some((n, ms)) => (
                n,
                Duration::from_millis(ms.parse().map_err(|e| format!("{ms}: {e}"))?),
            ),
            None => (name, Duration::ZERO),
        };
        let name = name.as_bytes().to_vec();
        if udp {
            let sock = UdpSocket::bind(at).map_err(|e| format!("bind udp {at}: {e}"))?;
            handles.push(thread::spawn(move || {
                let mut buf = [0u8; 512];
                while let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&name, from);
                }
            }));
        } else {
            let listener = listen(at).map_err(|e| format!("bind tcp {at}: {e}"))?;
            // Several acceptors so the accept queue never overflows (an overflow
            // drops the SYN and costs the client a 1 s retransmission).
            for _ in 0..4 {
                let listener = listener.try_clone().map_err(|e| e.to_string())?;
                let name = name.clone();
                handles.push(thread::spawn(move || {
                    for mut conn in listener.incoming().flatten() {
                        let _ = conn.write_all(&name);
                        if !hold.is_zero() {
                            // Held open, then closed, on a thread of its own.
                            thread::spawn(move || {
                                thread::sleep(hold);
                                drop(conn);
                            });
                        }
                    }
                }));
            }
        }
    }
    // Tell the caller the sockets are bound.
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// A server at `at` that sends zeros to every connection until the peer closes
/// (`serve blast:ADDR:PORT`; the far end of `drain`).
fn blast(at: &str) -> Result<thread::JoinHandle<()>, String> {
    let at: SocketAddr = at.parse().map_err(|e| format!("{at}: {e}"))?;
    let listener = listen(at).map_err(|e| format!("bind tcp {at}: {e}"))?;
    Ok(thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let zeros = vec![0u8; 64 * 1024];
                while conn.write_all(&zeros).is_ok() {}
            });
        }
    }))
}

/// `drain ADDR MILLIS`: one connection to a `blast` server, read for MILLIS;
/// prints `BYTES MBIT_PER_S`.
fn drain(args: &[String]) -> Result<(), String> {
    let to = addr(args.first())?;
    let limit = Duration::from_millis(number(args.get(1), 2_000)?);
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .map_err(|e| format!("connect {to}: {e}"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < limit {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the server closed".into());
        }
        bytes += n as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    writeln!(
        io::stdout(),
        "{bytes} {:.0}",
        bytes as f64 * 8.0 / secs / 1e6
    )
    .map_err(|e| e.to_string())
}

fn errno(e: &io::Error) -> String {
    format!("E{}", e.raw_os_error().unwrap_or(0))
}

fn connect(args: &[String]) -> Result<(), String> {
    let to = addr(args.first())?;
    let count = number(args.get(1), 1)?;
    let limit = Duration::from_millis(number(args.get(2), 60_000)?);
    let started = Instant::now();
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut first = true;
    for _ in 0..count {
        if started.elapsed() > limit {
            break;
        }
        let t0 = monotonic_ns();
        let result = TcpStream::connect_timeout(&to, Duration::from_secs(2)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut name = String::new();
            s.read_to_string(&mut name)?;
            Ok(name)
        });
        let t1 = monotonic_ns();
        let what = result.unwrap_or_else(|e| errno(&e));
        writeln!(out, "{t0} {t1} {what}").map_err(|e| e.to_string())?;
        if first {
            // The caller may wait for the loop to be running; later lines are
            // buffered so that printing does not slow the loop down.
            out.flush().map_err(|e| e.to_string())?;
            first = false;
        }
    }
    out.flush().map_err(|e| e.to_string())
}

fn each() -> Result<(), String> {
    let (mut ok, mut failed, mut first) = (0u64, 0u64, None);
    for line in io::stdin().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let to: SocketAddr = line.trim().parse().map_err(|e| format!("{line:?}: {e}"))?;
        let result = TcpStream::connect_timeout(&to, Duration::from_secs(2)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut name = String::new();
            s.read_to_string(&mut name)?;
            Ok(name)
        });
        match result {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                first.get_or_insert_with(|| format!("{to} {}", errno(&e)));
            }
        }
    }
    let mut out = io::stdout().lock();
    writeln!(out, "ok {ok} failed {failed}").map_err(|e| e.to_string())?;
    if let Some(f) = first {
        writeln!(out, "{f}").map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn load(args: &[String]) -> Result<(), String> {
    use std::{
        collections::BTreeMap,
        sync::{Arc, Mutex},
    };
    let to = addr(args.first())?;
    let rate = number(args.get(1), 100)?.max(1);
    let limit = Duration::from_millis(number(args.get(2), 5_000)?);
    // Per backend: (opened, open now, most open at once); failures.
    type Tally = BTreeMap<String, (u64, u64, u64)>;
    let tally: Arc<Mutex<(Tally, u64)>> = Arc::default();
    let started = Instant::now();
    let gap = Duration::from_secs(1) / u32::try_from(rate).unwrap_or(u32::MAX);
    let mut workers = Vec::new();
    let mut next = started;
    while started.elapsed() < limit {
        let tally = tally.clone();
        workers.push(thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
                if let Ok(mut t) = tally.lock() {
                    t.1 += 1;
                }
                return;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            // The name arrives first; the socket stays open until the server closes.
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap_or(0);
            let name = String::from_utf8_lossy(&buf[..n]).into_owned();
            if let Ok(mut t) = tally.lock() {
                let e = t.0.entry(name.clone()).or_default();
                e.0 += 1;
                e.1 += 1;
                e.2 = e.2.max(e.1);
            }
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            drop(s);
            if let Ok(mut t) = tally.lock()
                && let Some(e) = t.0.get_mut(&name)
            {
                e.1 -= 1;
            }
        }));
        next += gap;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    for w in workers {
        let _ = w.join();
    }
    let t = tally.lock().map_err(|_| "tally poisoned".to_owned())?;
    let mut out = io::stdout().lock();
    for (name, (opened, _, peak)) in &t.0 {
        writeln!(out, "{name} {opened} {peak}").map_err(|e| e.to_string())?;
    }
    writeln!(out, "failed {}", t.1).map_err(|e| e.to_string())?;
    Ok(())
}

/// `timeline ADDR RATE MILLIS TIMEOUT_MS`: new connections at RATE per second
/// (an open loop, a thread each, so a slow connect never delays the next) for
/// MILLIS; each reads the server's name. Prints one line per connect when all are
/// done, by start time: `t0 t1 what` (CLOCK_MONOTONIC ns; the backend's name or
/// `E<errno>`, `E0` for a connect that timed out after TIMEOUT_MS).
fn timeline(args: &[String]) -> Result<(), String> {
    use std::sync::{Arc, Mutex};
    let to = addr(args.first())?;
    let rate = number(args.get(1), 100)?.max(1);
    let limit = Duration::from_millis(number(args.get(2), 5_000)?);
    let timeout = Duration::from_millis(number(args.get(3), 1_000)?.max(1));
    let seen: Arc<Mutex<Vec<(u64, u64, String)>>> = Arc::default();
    let started = Instant::now();
    let gap = Duration::from_secs(1) / u32::try_from(rate).unwrap_or(u32::MAX);
    let mut workers = Vec::new();
    let mut next = started;
    while started.elapsed() < limit {
        let seen = seen.clone();
        workers.push(thread::spawn(move || {
            let t0 = monotonic_ns();
            let what = TcpStream::connect_timeout(&to, timeout)
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let mut name = String::new();
                    s.read_to_string(&mut name)?;
                    Ok(name)
                })
                .unwrap_or_else(|e| errno(&e));
            let t1 = monotonic_ns();
            if let Ok(mut v) = seen.lock() {
                v.push((t0, t1, what));
            }
        }));
        next += gap;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    for w in workers {
        let _ = w.join();
    }
    let mut v = seen.lock().map_err(|_| "timeline poisoned".to_owned())?;
    v.sort();
    let mut out = io::BufWriter::new(io::stdout().lock());
    for (t0, t1, what) in v.iter() {
        writeln!(out, "{t0} {t1} {what}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

fn hold(args: &[String]) -> Result<(), String> {
    let to = addr(args.first())?;
    let count = number(args.get(1), 1)?;
    let mut out = io::stdout().lock();
    let mut open = Vec::new();
    for _ in 0..count {
        let what = match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(mut s) => {
                // The server sends its name and closes; the socket stays open here.
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .map_err(|e| e.to_string())?;
                let mut name = String::new();
                let name = match s.read_to_string(&mut name) {
                    Ok(_) => name,
                    Err(e) => errno(&e),
                };
                open.push(s);
                name
            }
            Err(e) => errno(&e),
        };
        writeln!(out, "{what}").map_err(|e| e.to_string())?;
    }
    writeln!(out, "held").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    let mut line = String::new();
    let _ = io::stdin().read_line(&mut line);
    drop(open);
    Ok(())
}

fn clients(args: &[String]) -> Result<(), String> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _};

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let to = addr(args.first())?;
    let per = number(args.get(1), 1)?;
    let SocketAddr::V4(to4) = to else {
        return Err("clients: an IPv4 service address".into());
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    for src in &args[2..] {
        let from: Option<std::net::Ipv4Addr> = match src.as_str() {
            "-" => None,
            s => Some(s.parse().map_err(|e| format!("source {s}: {e}"))?),
        };
        write!(out, "{src}").map_err(|e| e.to_string())?;
        for _ in 0..per {
            let once = || -> io::Result<String> {
                let fd = socket(
                    AddressFamily::Inet,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                if let Some(ip) = from {
                    bind(
                        fd.as_raw_fd(),
                        &SockaddrIn::from(std::net::SocketAddrV4::new(ip, 0)),
                    )?;
                }
                connect(fd.as_raw_fd(), &SockaddrIn::from(to4))?;
                // SAFETY: the descriptor is a connected TCP socket this function
                // owns; into_raw_fd hands its ownership to the stream.
                let mut s = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut name = String::new();
                s.read_to_string(&mut name)?;
                Ok(name)
            };
            let what = once().unwrap_or_else(|e| errno(&e));
            write!(out, " {what}").map_err(|e| e.to_string())?;
        }
        writeln!(out).map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

fn udp(args: &[String]) -> Result<(), String> {
    let to = addr(args.first())?;
    let count = number(args.get(1), 1)?;
    let per_socket = number(args.get(2), 1)?;
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut out = io::BufWriter::new(io::stdout().lock());
    for _ in 0..count {
        let result = UdpSocket::bind(any).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut senders = Vec::new();
            let mut names = Vec::new();
            for _ in 0..per_socket {
                s.send_to(b"q", to)?;
                let mut buf = [0u8; 512];
                let (n, from) = s.recv_from(&mut buf)?;
                senders.push(from.to_string());
                names.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            senders.dedup();
            Ok(format!("{} {}", senders.join("|"), names.join(",")))
        });
        let line = result.unwrap_or_else(|e| format!("- {}", errno(&e)));
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

fn peer(args: &[String]) -> Result<(), String> {
    let to = addr(args.first())?;
    let line = match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
        Ok(mut s) => {
            let peer = s.peer_addr().map_err(|e| e.to_string())?;
            let mut name = String::new();
            let _ = s.read_to_string(&mut name);
            format!("{peer} {name}")
        }
        Err(e) => format!("- {}", errno(&e)),
    };
    writeln!(io::stdout(), "{line}").map_err(|e| e.to_string())
}

fn connect_close(args: &[String]) -> Result<(), String> {
    let to = addr(args.first())?;
    let count = number(args.get(1), 1000)?;
    let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut failed = 0u64;
    for _ in 0..count {
        let t0 = Instant::now();
        match TcpStream::connect(to) {
            Ok(s) => {
                drop(s);
                samples.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
            Err(e) => {
                if failed == 0 {
                    let _ = writeln!(io::stderr(), "smprobe cc: first failure: {e}");
                }
                failed += 1;
            }
        }
    }
    samples.sort_unstable();
    let n = samples.len().max(1);
    let mean = samples.iter().sum::<u64>() / n as u64;
    let pct = |p: usize| {
        samples
            .get((samples.len() * p / 100).min(n - 1))
            .copied()
            .unwrap_or(0)
    };
    writeln!(
        io::stdout(),
        "{} {failed} {mean} {} {}",
        samples.len(),
        pct(50),
        pct(99)
    )
    .map_err(|e| e.to_string())
}

/// A listening TCP socket with a deep accept queue (std's `bind` uses 128).
fn listen(at: SocketAddr) -> io::Result<TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket,
        sockopt::ReuseAddr,
    };
    let family = if at.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, ReuseAddr, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(at),
    )?;
    nix::sys::socket::listen(&fd, Backlog::new(4096).map_err(io::Error::from)?)?;
    Ok(TcpListener::from(fd))
}

/// One request on a new connection: the backend's name, or `E<errno>`.
fn request(to: &SocketAddr, http: bool) -> String {
    let result = TcpStream::connect_timeout(to, Duration::from_secs(2)).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        if http {
            s.write_all(b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")?;
        }
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        if !http {
            return Ok(reply);
        }
        let ok = reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200");
        match reply.split_once("\r\n\r\n") {
            Some((_, body)) if ok => Ok(body.trim().to_owned()),
            _ => Err(io::Error::other(format!(
                "bad HTTP reply: {:?}",
                reply.lines().next().unwrap_or("")
            ))),
        }
    });
    result.unwrap_or_else(|e| match e.raw_os_error() {
        Some(n) => format!("E{n}"),
        None => "Ehttp".to_owned(),
    })
}

fn rate(args: &[String]) -> Result<(), String> {
    let to = addr(args.first())?;
    let rps = number(args.get(1), 1000)?.max(1);
    let millis = number(args.get(2), 1000)?;
    let http = args.get(3).is_some_and(|a| a == "http");
    let interval = Duration::from_nanos(1_000_000_000 / rps);
    let total = millis * rps / 1000;
    // Open loop over 4 threads: request i is due at i × interval and goes at once
    // if late, so one slow request does not hold back the ones after it.
    const THREADS: u64 = 4;
    let started = Instant::now();
    // Each line is printed as its request completes, so a caller can act on the
    // first responses while the load runs.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let workers: Vec<_> = (0..THREADS)
        .map(|k| {
            let tx = tx.clone();
            thread::spawn(move || {
                let mut i = k;
                while i < total {
                    let due = interval * u32::try_from(i).unwrap_or(u32::MAX);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        thread::sleep(wait);
                    }
                    let t0 = monotonic_ns();
                    let what = request(&to, http);
                    let t1 = monotonic_ns();
                    if tx.send(format!("{t0} {t1} {what}")).is_err() {
                        return;
                    }
                    i += THREADS;
                }
            })
        })
        .collect();
    drop(tx);
    let mut out = io::stdout().lock();
    for line in rx {
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
    }
    for w in workers {
        w.join().map_err(|_| "worker panicked".to_owned())?;
    }
    Ok(())
}

fn udp_hold(args: &[String]) -> Result<(), String> {
    let to = addr(args.first())?;
    let millis = number(args.get(1), 1000)?;
    let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = UdpSocket::bind(any).map_err(|e| e.to_string())?;
    sock.connect(to).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut out = io::stdout().lock();
    while started.elapsed() < Duration::from_millis(millis) {
        let mut buf = [0u8; 512];
        let result = sock.send(b"q").and_then(|_| sock.recv(&mut buf));
        let line = match result {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) => errno(&e),
        };
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
        let _ = out.flush();
        if line.starts_with('E') && line != "E11" {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn udp_reconnect(args: &[String]) -> Result<(), String> {
    let first = addr(args.first())?;
    let any = if first.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = UdpSocket::bind(any).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut answers = Vec::new();
    for to in [args.first(), args.get(1)] {
        let to = addr(to)?;
        let mut buf = [0u8; 512];
        let answer = sock
            .connect(to)
            .and_then(|()| sock.send(b"q"))
            .and_then(|_| sock.recv(&mut buf));
        answers.push(match answer {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) => errno(&e),
        });
    }
    println!("{}", answers.join(" "));
    Ok(())
}

/// Accepts the connections iptables `REDIRECT` sends here, as a sidecar proxy's
/// outbound port does, and prints where each was going (`SO_ORIGINAL_DST`, the
/// destination before the redirect): what a proxy would apply its policy to.
fn capture(args: &[String]) -> Result<(), String> {
    let listen = addr(args.first())?;
    let name = args.get(1).cloned().unwrap_or_else(|| "proxy".to_owned());
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let original =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::OriginalDst)
                .map(|sa| {
                    let ip = std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
                    format!("{ip}:{}", u16::from_be(sa.sin_port))
                })
                .unwrap_or_else(|e| format!("E{}", e as i32));
        let _ = writeln!(out, "{original}");
        let _ = out.flush();
        let _ = stream.write_all(name.as_bytes());
    }
    Ok(())
}
