//! `kp-sandbox [MANIFEST]` (run by `./scripts/kp sandbox`): the walk-through on a machine
//! with no cluster.
//!
//! Starts the API-server emulator in-process, builds throwaway network namespaces (a node,
//! pods, an external client), applies the manifest (default: examples/redis.yaml), runs
//! the `kube-proxy-rs` binary (`--binary`, default: the one beside this one) as the proxy
//! in the node namespace, prints the rules it programmed and the traffic distribution it
//! measured, then removes everything. A binary of its own, so the proxy's image carries
//! neither the emulator nor the namespace lab.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use kp_testkit::lab::{Lab, http_get, localhost, wait_for};
use kp_testkit::probe::{ProbeReport, probe_tcp, probe_udp};

const DEFAULT_MANIFEST: &str = include_str!("../../../examples/redis.yaml");

#[derive(Parser, Debug)]
#[command(
    name = "kp-sandbox",
    about = "Run the Service walk-through in throwaway namespaces"
)]
struct Args {
    /// Manifest to apply (Deployments, Services, EndpointSlices); default: the redis example.
    manifest: Option<std::path::PathBuf>,
    /// Connections per service port for the distribution measurement.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Number of node namespaces (one kube-proxy-rs each).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Extra flags for the proxy, e.g. --proxy-arg=--masquerade-all.
    #[arg(long = "proxy-arg")]
    proxy_args: Vec<String>,
    /// The kube-proxy-rs binary to run; default: `kube-proxy-rs` beside this binary.
    #[arg(long)]
    binary: Option<std::path::PathBuf>,
}

struct PortTarget {
    service: String,
    port_name: String,
    protocol: String,
    addr: SocketAddr,
    kind: &'static str,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KUBE_PROXY_RS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kp-sandbox: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the sandbox creates network namespaces and loads iptables rules: run it as root");
    }
    let (manifest, source) = match &args.manifest {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEFAULT_MANIFEST.to_string(),
            "examples/redis.yaml (built in)".to_string(),
        ),
    };
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .context("locating this binary")?
            .with_file_name("kube-proxy-rs"),
    };
    if !binary.is_file() {
        bail!(
            "no kube-proxy-rs binary at {} (build it: cargo build --release -p kube-proxy-rs, or pass --binary)",
            binary.display()
        );
    }

    println!("== kube-proxy-rs sandbox ==");
    let t0 = Instant::now();
    let mut lab = Lab::new(args.nodes.max(1))?;
    println!(
        "namespaces: {} node(s), external client {}; API emulator at https://127.0.0.1:{} inside each node",
        args.nodes.max(1),
        lab.topology().ext().ns,
        kp_testkit::lab::API_PORT
    );
    let applied = lab
        .cluster
        .apply_manifest(&manifest)
        .context("applying the manifest")?;
    println!("applied {} object(s) from {source}", applied.len());
    for pod in lab.cluster.pods() {
        println!(
            "  pod {}/{} ip {} on {}",
            pod.namespace, pod.name, pod.ip, pod.node
        );
    }

    let extra: Vec<&str> = args.proxy_args.iter().map(|s| s.as_str()).collect();
    for n in 1..=args.nodes.max(1) {
        lab.start_proxy(&binary, n, &extra)?;
    }
    let synced = wait_for(Duration::from_secs(30), || {
        let (_, m) = http_get(&lab.node_ns(1), localhost(10249), "/metrics").ok()?;
        // The IPv4 family's sync: the IPv6 one may finish first.
        m.lines()
            .find(|l| {
                l.starts_with("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
                    && l.contains("ip_family=\"IPv4\"")
            })
            .map(|_| ())
    });
    if synced.is_none() {
        bail!(
            "the proxy did not sync within 30s; its log:\n{}",
            lab.proxy_log(1)
        );
    }
    let ready_in = t0.elapsed();

    let nat = lab.iptables_save(1, "nat")?;
    if nat.contains("-A KUBE-SERVICES") {
        println!("\n== rules programmed in node1 (nat table, service paths) ==");
        print_paths(&nat);
    } else {
        let table = lab
            .topology()
            .exec_ok(
                &lab.node_ns(1),
                &["nft", "list", "table", "ip", "kube-proxy"],
            )
            .unwrap_or_default();
        println!("\n== rules programmed in node1 (table ip kube-proxy, service paths) ==");
        print_nft_paths(&table);
    }
    if let Some(line) = lab
        .proxy_log(1)
        .lines()
        .find(|l| l.contains("synced proxy rules") && l.contains("family=IPv4"))
    {
        println!("\nfirst sync: {}", summarize_sync_line(line));
    }

    println!(
        "\n== traffic from the external client ({} connections per port) ==",
        args.connections
    );
    let ext = lab.topology().ext().ns.clone();
    let node_ip = lab.topology().node(1)?.ip;
    let targets = targets(&lab, node_ip);
    if targets.is_empty() {
        println!("(no Services with a cluster IP in the manifest)");
    }
    for t in &targets {
        // Allow a moment for the first packets after programming.
        let report = measure(&ext, t, args.connections)?;
        print_report(t, &report);
    }
    println!(
        "\nsandbox ready in {:.2}s (namespaces, emulator, pods, first sync); cleaning up",
        ready_in.as_secs_f64()
    );
    drop(lab);
    println!("removed all namespaces, processes and rules");
    Ok(())
}

fn targets(lab: &Lab, node_ip: IpAddr) -> Vec<PortTarget> {
    let mut out = Vec::new();
    for svc in lab.emulator.list("v1", "Service") {
        let ns = svc["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = svc["metadata"]["name"].as_str().unwrap_or_default();
        if ns == "default" && name == "kubernetes" {
            continue;
        }
        let Some(ip) = svc["spec"]["clusterIP"]
            .as_str()
            .and_then(|s| s.parse::<IpAddr>().ok())
        else {
            continue;
        };
        for p in svc["spec"]["ports"].as_array().into_iter().flatten() {
            let port = p["port"].as_u64().unwrap_or(0) as u16;
            let protocol = p["protocol"].as_str().unwrap_or("TCP").to_string();
            let port_name = p["name"].as_str().unwrap_or_default().to_string();
            let service = format!("{ns}/{name}");
            out.push(PortTarget {
                service: service.clone(),
                port_name: port_name.clone(),
                protocol: protocol.clone(),
                addr: SocketAddr::new(ip, port),
                kind: "ClusterIP",
            });
            if let Some(np) = p["nodePort"].as_u64() {
                out.push(PortTarget {
                    service,
                    port_name,
                    protocol,
                    addr: SocketAddr::new(node_ip, np as u16),
                    kind: "NodePort",
                });
            }
        }
    }
    out
}

fn measure(ns: &str, t: &PortTarget, n: usize) -> anyhow::Result<ProbeReport> {
    let timeout = Duration::from_secs(2);
    Ok(match t.protocol.as_str() {
        "UDP" => probe_udp(ns, t.addr, n, timeout)?,
        _ => probe_tcp(ns, t.addr, n, timeout)?,
    })
}

fn print_report(t: &PortTarget, r: &ProbeReport) {
    let port = if t.port_name.is_empty() {
        String::new()
    } else {
        format!(":{}", t.port_name)
    };
    println!(
        "{}{} {} {} {}:",
        t.service, port, t.kind, t.protocol, t.addr
    );
    let total = r.total_ok().max(1);
    for (pod, count) in &r.answers {
        println!(
            "  {pod:<32} {count:>5}  {:>5.1}%",
            100.0 * *count as f64 / total as f64
        );
    }
    if r.total_failed() > 0 {
        println!(
            "  failed: {} (refused {}, timed out {}, unreachable {}, other {})",
            r.total_failed(),
            r.refused,
            r.timeouts,
            r.unreachable,
            r.other_errors
        );
    }
    if let (Some(p50), Some(p99)) = (r.latency_quantile(0.5), r.latency_quantile(0.99)) {
        println!(
            "  connect latency p50 {:.0}us p99 {:.0}us",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
}

/// Prints, for every per-service rule in KUBE-SERVICES and KUBE-NODEPORTS, the chain it
/// jumps to and the chains below (KUBE-SVC -> KUBE-SEP).
fn print_paths(nat: &str) {
    let mut chains: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in nat.lines() {
        if let Some(rest) = line.strip_prefix("-A ")
            && let Some((chain, _)) = rest.split_once(' ')
        {
            chains.entry(chain).or_default().push(line);
        }
    }
    for top in ["KUBE-SERVICES", "KUBE-NODEPORTS"] {
        for line in chains.get(top).into_iter().flatten() {
            if let Some(target) = jump_target(line).filter(|t| is_service_chain(t)) {
                println!("{line}");
                print_chain(&chains, target, 1);
            }
        }
    }
}

/// The parts of the nftables table a packet to a service goes through: the entry maps,
/// the chains they jump to, and the endpoint maps (empty maps are left out).
fn print_nft_paths(table: &str) {
    let mut block = String::new();
    let mut keep = false;
    for line in table.lines() {
        let header = line.strip_prefix('\t').filter(|l| !l.starts_with('\t'));
        if let Some(h) = header.filter(|h| *h != "}") {
            let name = h.split_whitespace().nth(1).unwrap_or_default();
            keep = (h.starts_with("map ")
                && (name.starts_with("service-")
                    || name.contains("-endpoints-")
                    || name == "firewall-ips"))
                || (h.starts_with("chain ")
                    && [
                        "pick-",
                        "service-",
                        "external-",
                        "local-",
                        "endpoint-",
                        "firewall-",
                    ]
                    .iter()
                    .any(|p| name.starts_with(p))
                    && !name.ends_with("-check"));
            block.clear();
        }
        block.push_str(line);
        block.push('\n');
        if line == "\t}" {
            if keep && (block.contains("elements") || block.starts_with("\tchain")) {
                print!("{block}");
            }
            keep = false;
        }
    }
}

fn print_chain(chains: &BTreeMap<&str, Vec<&str>>, chain: &str, depth: usize) {
    if depth > 4 {
        return;
    }
    for line in chains.get(chain).into_iter().flatten() {
        println!("{}{line}", "    ".repeat(depth));
        if let Some(target) = jump_target(line).filter(|t| is_service_chain(t)) {
            print_chain(chains, target, depth + 1);
        }
    }
}

fn jump_target(line: &str) -> Option<&str> {
    let idx = line.find(" -j ")?;
    line[idx + 4..].split_whitespace().next()
}

fn is_service_chain(c: &str) -> bool {
    [
        "KUBE-SVC-",
        "KUBE-SVL-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-SEP-",
    ]
    .iter()
    .any(|p| c.starts_with(p))
}

fn summarize_sync_line(line: &str) -> String {
    let fields: Vec<&str> = line
        .split_whitespace()
        .filter(|w| {
            [
                "full=",
                "services=",
                "endpoints=",
                "nat_rules=",
                "rules_written=",
                "bytes=",
                "elapsed_ms=",
            ]
            .iter()
            .any(|p| w.starts_with(p))
        })
        .collect();
    fields.join(" ")
}
