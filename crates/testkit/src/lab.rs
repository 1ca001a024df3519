//! A lab: namespaces + API-server emulator + mini control plane + kube-proxy-rs processes,
//! one per node. Used by the end-to-end tests and by `kp-sandbox`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cluster::{MiniCluster, ObjectStore};
use crate::emulator::{Emulator, EmulatorOptions};
use crate::netns::{ChildGuard, Topology, TopologySpec, bind_tcp_in, in_netns};

/// Port the emulator listens on inside every node namespace.
pub const API_PORT: u16 = 6443;

impl ObjectStore for Emulator {
    fn apply(&self, obj: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        Emulator::apply(self, obj)
    }
    fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> anyhow::Result<bool> {
        Emulator::delete(self, api_version, kind, namespace, name)
    }
    fn list(&self, api_version: &str, kind: &str) -> Vec<serde_json::Value> {
        Emulator::list(self, api_version, kind)
    }
}

/// One running kube-proxy-rs.
pub struct ProxyProcess {
    pub node: usize,
    pub child: ChildGuard,
    pub log: PathBuf,
    pub args: Vec<String>,
}

/// The whole test bed.
pub struct Lab {
    /// Declared first: proxies stop before pods and namespaces go away.
    proxies: Vec<ProxyProcess>,
    pub cluster: MiniCluster,
    pub emulator: Arc<Emulator>,
    /// Extra environment for proxies started from now on (e.g. a PATH with fake tools).
    pub proxy_env: Vec<(String, String)>,
    /// Proxies started so far (names log files, so a restart never overwrites a log).
    started: usize,
    workdir: tempfile::TempDir,
}

impl Lab {
    /// Builds `nodes` node namespaces, the emulator (reachable at 127.0.0.1:6443 inside
    /// every node), and registers the Node objects.
    pub fn new(nodes: usize) -> anyhow::Result<Lab> {
        Self::with_spec(TopologySpec::new(nodes))
    }

    pub fn with_spec(spec: TopologySpec) -> anyhow::Result<Lab> {
        let topology = Topology::new(spec).context("building namespaces")?;
        let emulator = Arc::new(
            Emulator::start(EmulatorOptions::default()).context("starting the API emulator")?,
        );
        for node in topology.nodes() {
            let listener =
                bind_tcp_in(&node.ns, SocketAddr::from((Ipv4Addr::LOCALHOST, API_PORT)))?;
            emulator.serve_listener(listener)?;
        }
        let store: Arc<dyn ObjectStore> = emulator.clone();
        let cluster = MiniCluster::new(store, topology)?;
        Ok(Lab {
            proxies: Vec::new(),
            cluster,
            emulator,
            proxy_env: Vec::new(),
            started: 0,
            workdir: tempfile::tempdir()?,
        })
    }

    pub fn topology(&self) -> &Topology {
        self.cluster.topology()
    }

    /// Namespace of node `n` (1-based).
    pub fn node_ns(&self, n: usize) -> String {
        self.topology()
            .node(n)
            .map(|n| n.ns.clone())
            .unwrap_or_default()
    }

    /// Starts kube-proxy-rs in node `n` with a kubeconfig for the emulator, the node's name
    /// and the cluster CIDR, plus `extra_args`.
    pub fn start_proxy(
        &mut self,
        binary: &Path,
        n: usize,
        extra_args: &[&str],
    ) -> anyhow::Result<()> {
        let node = self.topology().node(n)?.clone();
        let kubeconfig = self
            .workdir
            .path()
            .join(format!("kubeconfig-{}", node.name));
        if !kubeconfig.exists() {
            self.emulator
                .write_kubeconfig(&kubeconfig, &format!("https://127.0.0.1:{API_PORT}"))?;
        }
        let log = self
            .workdir
            .path()
            .join(format!("proxy-{}-{}.log", node.name, self.started));
        self.started += 1;
        let mut args: Vec<String> = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={}", node.name),
            "--cluster-cidr=10.244.0.0/16".into(),
        ];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let logfile = std::fs::File::create(&log)?;
        let mut cmd = Command::new(binary);
        cmd.args(&args)
            .env("KUBE_PROXY_RS_LOG", "info")
            .envs(self.proxy_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(logfile.try_clone()?)
            .stderr(logfile);
        let child = self.cluster.topology().spawn(&node.ns, cmd)?;
        self.proxies.push(ProxyProcess {
            node: n,
            child,
            log,
            args,
        });
        Ok(())
    }

    /// Stops node `n`'s proxy with SIGTERM (or SIGKILL when `kill`).
    pub fn stop_proxy(&mut self, n: usize, kill: bool) {
        self.proxies.retain(|p| {
            if p.node != n {
                return true;
            }
            if kill {
                p.child.kill();
            } else {
                p.child.terminate(Duration::from_secs(5));
            }
            false
        });
    }

    /// The proxy process of node `n`, if running.
    pub fn proxy(&self, n: usize) -> Option<&ProxyProcess> {
        self.proxies.iter().find(|p| p.node == n)
    }

    /// Everything node `n`'s proxies have logged so far.
    pub fn proxy_log(&self, n: usize) -> String {
        let mut out = String::new();
        for i in 0..self.started {
            let name = self
                .topology()
                .node(n)
                .map(|n| n.name.clone())
                .unwrap_or_default();
            let p = self.workdir.path().join(format!("proxy-{name}-{i}.log"));
            if let Ok(s) = std::fs::read_to_string(p) {
                out.push_str(&s);
            }
        }
        out
    }

    /// `iptables-save -t <table>` in node `n`.
    pub fn iptables_save(&self, n: usize, table: &str) -> anyhow::Result<String> {
        Ok(self
            .topology()
            .exec_ok(&self.node_ns(n), &["iptables-save", "-t", table])?)
    }

    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout * time_scale();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How much longer every [`wait_for`] waits: `KP_TEST_TIME_SCALE` (default 1). The
/// scenario suites run in an emulated guest for IPVS mode, where a process start costs
/// ~0.3 s and a first sync seconds; what they assert stays the same.
pub fn time_scale() -> u32 {
    static SCALE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var("KP_TEST_TIME_SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n >= 1)
            .unwrap_or(1)
    })
}

/// A plain HTTP/1.1 GET from inside namespace `ns`: (status, body).
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_string();
    in_netns(ns, move || -> anyhow::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status")?;
        let body = match text.split_once("\r\n\r\n") {
            Some((head, body))
                if head
                    .to_ascii_lowercase()
                    .contains("transfer-encoding: chunked") =>
            {
                dechunk(body)
            }
            Some((_, body)) => body.to_string(),
            None => String::new(),
        };
        Ok((status, body))
    })?
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Localhost in a namespace, for the admin ports.
pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}
