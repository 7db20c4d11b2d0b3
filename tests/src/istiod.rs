//! `sockmesh-istiod` (`tests/istiod`): istiod's own discovery server over an
//! in-memory Kubernetes, as a fixture. It starts on a temporary directory of
//! YAML (`kube/` for Kubernetes objects, `config/` for Istio config), binds its
//! ADS and HTTP ports to port 0 on loopback and reports them in its ready file;
//! the test changes the world over its HTTP API and reads istiod's own view
//! (`/pushes`, `/syncz`, `/debug/adsz`). Drop kills it by PID, then removes the
//! directory.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime},
};

use crate::{TempDir, istiod_build, wait_until};

/// The harness binary, built once per machine (see [`istiod_build`]).
pub fn harness_bin() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    match istiod_build::harness(workspace) {
        Ok(h) => h.binary,
        Err(e) => panic!("{e}"),
    }
}

/// How the harness runs (its flags).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--debounce` (istiod's `PILOT_DEBOUNCE_AFTER`); unset: istiod's 100 ms.
    pub debounce: Option<Duration>,
    /// `--max-connection-age` and its grace; unset: the Helm chart's 30 min.
    pub max_connection_age: Option<(Duration, Duration)>,
    /// `--env KEY=VALUE`.
    pub env: Vec<String>,
    /// How long it may take to load its files and serve (unset: 60 s, scaled).
    pub ready_timeout: Option<Duration>,
}

fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The harness's update counters (`GET /pushes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushes {
    pub inbound: u64,
    pub committed: u64,
    pub version: String,
    pub connections: u64,
}

/// A running `sockmesh-istiod`.
pub struct Istiod {
    child: Option<Child>,
    pub ads: SocketAddr,
    pub http: SocketAddr,
    args: Vec<OsString>,
    ready_timeout: Duration,
    /// `kube/`, `config/`, the ready file and the log.
    pub dir: TempDir,
}

impl Istiod {
    /// Starts the harness with `kube` (Kubernetes objects) and `config` (Istio
    /// config) as its initial state, each written to a file of its directory.
    pub fn start(kube: &str, config: &str, opts: &Options) -> Self {
        let dir = TempDir::new("sockmesh-istiod-");
        for (sub, text) in [("kube", kube), ("config", config)] {
            fs::create_dir_all(dir.0.join(sub)).expect("create harness dir");
            fs::write(dir.0.join(sub).join("00-initial.yaml"), text).expect("write fixture");
        }
        let mut args: Vec<OsString> = vec![
            "--kube".into(),
            dir.0.join("kube").into(),
            "--config".into(),
            dir.0.join("config").into(),
            "--ready-file".into(),
            dir.0.join("ready.json").into(),
        ];
        if let Some(d) = opts.debounce {
            args.extend(["--debounce".into(), go_duration(d).into()]);
        }
        if let Some((age, grace)) = opts.max_connection_age {
            args.extend([
                "--max-connection-age".into(),
                go_duration(age).into(),
                "--max-connection-age-grace".into(),
                go_duration(grace).into(),
            ]);
        }
        for e in &opts.env {
            args.extend(["--env".into(), e.into()]);
        }
        let mut me = Self {
            ready_timeout: opts.ready_timeout.unwrap_or(Duration::from_secs(60)),
            child: None,
            ads: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            args,
            dir,
        };
        me.spawn();
        me
    }

    fn log_path(&self) -> PathBuf {
        self.dir.0.join("istiod.log")
    }

    /// The last lines istiod logged (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Starts the process on the ports it had (port 0 the first time) and waits
    /// for its ready file.
    fn spawn(&mut self) {
        let ready = self.dir.0.join("ready.json");
        let _ = fs::remove_file(&ready);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the harness log");
        let child = Command::new(harness_bin())
            .args(&self.args)
            .arg("--ads")
            .arg(self.ads.to_string())
            .arg("--http")
            .arg(self.http.to_string())
            // Its logs are istiod's, at info: a file, quoted when a test fails.
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start sockmesh-istiod");
        self.child = Some(child);
        let (ads, http) = wait_until("sockmesh-istiod's ready file", self.ready_timeout, || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("sockmesh-istiod exited ({status}):\n{}", self.log_tail());
            }
            let text = fs::read_to_string(&ready).map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let addr = |k: &str| -> Result<SocketAddr, String> {
                v[k].as_str()
                    .ok_or(format!("no {k} in {text}"))?
                    .parse()
                    .map_err(|e| format!("{k}: {e}"))
            };
            Ok::<_, String>((addr("ads")?, addr("http")?))
        });
        self.ads = ads;
        self.http = http;
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crashed or evicted istiod: no goodbye to its clients.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again after [`Istiod::kill`], on the same ports, with the files
    /// in its directory (write there what changed meanwhile: all its state is in
    /// memory).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Writes `text` as `dir/kube/NAME` (read at the next start).
    pub fn write_kube_file(&self, name: &str, text: &str) {
        fs::write(self.dir.0.join("kube").join(name), text).expect("write kube file");
    }

    /// One HTTP/1.0 exchange (the server closes; no chunked bodies): (status, body).
    fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = TcpStream::connect_timeout(&self.http, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("sockmesh-istiod's HTTP API: {e}"));
        s.set_read_timeout(Some(crate::scaled(Duration::from_secs(60))))
            .expect("timeout");
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: istiod\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send request");
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).expect("read reply");
        let reply = String::from_utf8_lossy(&reply);
        let code = reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    }

    /// `GET path`, parsed as JSON.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let (code, body) = self.http("GET", path, "");
        assert_eq!(code, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// `GET path`: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        self.http("GET", path, "")
    }

    fn write(&self, path: &str, yaml: &str) -> SystemTime {
        let (code, body) = self.http("POST", path, yaml);
        assert_eq!(code, 200, "POST {path}: {body}\n{yaml}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("write reply");
        let nanos = v["at_unix_nanos"].as_u64().expect("at_unix_nanos");
        SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
    }

    /// Creates or replaces Kubernetes objects; returns the wall-clock time just
    /// before the first write.
    pub fn apply_kube(&self, yaml: &str) -> SystemTime {
        self.write("/kube/apply", yaml)
    }

    pub fn delete_kube(&self, yaml: &str) -> SystemTime {
        self.write("/kube/delete", yaml)
    }

    /// Creates or replaces Istio config (validated as istiod's webhook does).
    pub fn apply_config(&self, yaml: &str) -> SystemTime {
        self.write("/config/apply", yaml)
    }

    pub fn delete_config(&self, yaml: &str) -> SystemTime {
        self.write("/config/delete", yaml)
    }

    /// The discovery server's update counters.
    pub fn pushes(&self) -> Pushes {
        let v = self.get_json("/pushes");
        Pushes {
            inbound: v["inbound_updates"].as_u64().unwrap_or(0),
            committed: v["committed_updates"].as_u64().unwrap_or(0),
            version: v["push_version"].as_str().unwrap_or_default().to_owned(),
            connections: v["connections"].as_u64().unwrap_or(0),
        }
    }

    /// istiod's `/debug/syncz`: per connected proxy, what was sent and ACKed.
    pub fn syncz(&self) -> serde_json::Value {
        self.get_json("/syncz")
    }

    /// The connections of proxy `proxy` (`NAME.NAMESPACE`) istiod holds, from
    /// `/debug/adsz`: their resource names watched, per type URL.
    pub fn watches(&self, proxy: &str) -> Vec<BTreeMap<String, Vec<String>>> {
        let v = self.get_json("/debug/adsz");
        v["clients"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| {
                c["connectionId"]
                    .as_str()
                    .is_some_and(|id| id.rsplit_once('-').is_some_and(|(p, _)| p == proxy))
            })
            .map(|c| {
                c["watches"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(t, names)| {
                        let mut names: Vec<String> = names
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|n| n.as_str().map(str::to_owned))
                            .collect();
                        names.sort();
                        (t.clone(), names)
                    })
                    .collect()
            })
            .collect()
    }

    /// The ClusterLoadAssignment istiod generates for proxy `proxy` (`NAME.NAMESPACE`)
    /// and `cluster`, as its `/debug/config_dump?include_eds` shows it (proto3
    /// JSON, camelCase), if it has one.
    pub fn load_assignment(&self, proxy: &str, cluster: &str) -> Option<serde_json::Value> {
        let (code, body) = self.get(&format!("/debug/config_dump?proxyID={proxy}&include_eds"));
        if code != 200 {
            return None;
        }
        let dump: serde_json::Value = serde_json::from_str(&body).ok()?;
        dump["configs"]
            .as_array()?
            .iter()
            .filter(|c| {
                c["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("EndpointsConfigDump"))
            })
            .flat_map(|c| c["dynamicEndpointConfigs"].as_array().into_iter().flatten())
            .map(|e| &e["endpointConfig"])
            .find(|cla| cla["clusterName"].as_str() == Some(cluster))
            .cloned()
    }

    /// When istiod last sent proxy `proxy` a response of `type_url` (`/syncz`'s
    /// `sentTime`, istiod's wall clock, which is this machine's).
    pub fn sent_time(&self, proxy: &str, type_url: &str) -> Option<SystemTime> {
        let syncz = self.syncz();
        let p = syncz
            .as_array()?
            .iter()
            .find(|p| p["proxy"].as_str() == Some(proxy))?;
        parse_rfc3339(p["resources"][type_url]["sentTime"].as_str()?)
    }

    /// Whether proxy `proxy` has ACKed everything istiod sent it (every type in
    /// `/syncz` has `acked` equal to `sent`), on one connection.
    pub fn acked_all(&self, proxy: &str) -> Result<(), String> {
        let syncz = self.syncz();
        let mine: Vec<&serde_json::Value> = syncz
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["proxy"].as_str() == Some(proxy))
            .collect();
        let [p] = mine.as_slice() else {
            return Err(format!("{} connections of {proxy}", mine.len()));
        };
        let resources = p["resources"].as_object().ok_or("no resources")?;
        for (t, r) in resources {
            if r["sent"] != r["acked"] {
                return Err(format!("{t}: sent {} acked {}", r["sent"], r["acked"]));
            }
        }
        Ok(())
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An RFC 3339 time as Go writes it (`2026-12-07T03:33:37.81583226Z`, or with an
/// offset `+01:00`), to the nanosecond.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let (date, rest) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (clock, offset_s) = if let Some(c) = rest.strip_suffix('Z') {
        (c, 0)
    } else {
        let at = rest.rfind(['+', '-'])?;
        let (c, off) = rest.split_at(at);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (h, min) = off[1..].split_once(':')?;
        (
            c,
            sign * (h.parse::<i64>().ok()? * 3600 + min.parse::<i64>().ok()? * 60),
        )
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    let nanos: u32 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
    // days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + min * 60 + sec - offset_s;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    #[test]
    fn rfc3339_as_go_writes_it() {
        let t =
            |s| super::parse_rfc3339(s).and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
        // `date -u -d 2026-12-07T03:33:37Z +%s`
        assert_eq!(
            t("2026-12-07T03:33:37Z"),
            Some(Duration::from_secs(1_796_614_417))
        );
        assert_eq!(
            t("2026-12-07T03:33:37.81583226Z"),
            Some(Duration::new(1_796_614_417, 815_832_260))
        );
        assert_eq!(
            t("2026-12-07T04:33:37.5+01:00"),
            Some(Duration::new(1_796_614_417, 500_000_000))
        );
        assert_eq!(
            t("2000-02-29T00:00:00Z"),
            Some(Duration::from_secs(951_782_400))
        );
        assert_eq!(t("garbage"), None);
    }
}
