//! `cargo run --release -p kp-bench -- --services 1000 --endpoints 10`
//!
//! Starts the real kube-proxy-rs binary (target/release by default) in a node namespace
//! against the API emulator holding N services x E endpoints, and prints a table:
//! cold full sync (as the proxy measures it, and start -> rules committed), one endpoint
//! change (API write -> rules committed, and the proxy's own sync time), and the kernel
//! floor: the same final ruleset loaded alone (`nft -f`, or `iptables-restore` replacing
//! the tables and with `--noflush`), in a fresh namespace.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use kp_testkit::lab::{Lab, http_get, localhost};
use kp_testkit::netns::in_netns;
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Endpoint changes to measure.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Endpoint changes in the burst (M4), one per service.
    #[arg(long, default_value_t = 1000)]
    burst: usize,
    /// Churn soak (M9): seconds of endpoint changes at --soak-rate per second, one service
    /// after another, while the probe service is connected to every ~5 ms. 0: skip.
    #[arg(long, default_value_t = 0)]
    soak: u64,
    #[arg(long, default_value_t = 20)]
    soak_rate: u64,
    /// Proxy mode: iptables, nftables or ipvs (ipvs needs a kernel with IPVS: run it in
    /// the guest, `scripts/guest run -- target/release/kp-bench --mode ipvs ...`).
    #[arg(long, default_value = "iptables")]
    mode: String,
    /// iptables mode: skip the `--noflush` floor (quadratic in chains with iptables-nft
    /// 1.8: about 150 s at 10k services); the tables-replaced floor is always measured.
    #[arg(long)]
    no_noflush_floor: bool,
    /// The proxy binary (default: target/release/kube-proxy-rs next to this binary).
    #[arg(long)]
    binary: Option<PathBuf>,
}

fn endpoint_ip(svc: usize, ep: usize) -> String {
    let n = svc * 16 + ep;
    format!("10.{}.{}.{}", 128 + (n >> 16), (n >> 8) & 255, n & 255)
}

fn slice(i: usize, eps: usize, shift: usize) -> serde_json::Value {
    let endpoints: Vec<_> = (0..eps)
        .map(|e| json!({"addresses": [endpoint_ip(i, (e + shift) % 16)], "conditions": {"ready": true}, "nodeName": "node1"}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-x"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn metric(ns: &str, name: &str) -> Option<f64> {
    let (_, m) = http_get(ns, localhost(10249), "/metrics").ok()?;
    m.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
}

fn sync_times_ms(log: &str) -> Vec<(bool, f64)> {
    log_field_ms(log, "elapsed_ms=")
}

/// (full, value) of `field` on every IPv4 "synced proxy rules" line.
fn log_field_ms(log: &str, field: &str) -> Vec<(bool, f64)> {
    log.lines()
        .filter(|l| l.contains("synced proxy rules") && l.contains("family=IPv4"))
        .filter_map(|l| {
            let full = l.contains("full=true");
            let ms = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix(field))?
                .parse()
                .ok()?;
            Some((full, ms))
        })
        .collect()
}

/// New TCP connections from a namespace to one address, every `interval`, until finished.
struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<(u64, u64), kp_testkit::netns::NetnsError>>,
}

impl Prober {
    fn start(ns: &str, addr: std::net::SocketAddr, interval: Duration) -> Prober {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, ns) = (stop.clone(), ns.to_string());
        let thread = std::thread::spawn(move || {
            in_netns(&ns, || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                    std::thread::sleep(interval);
                }
                (ok, failed)
            })
        });
        Prober { stop, thread }
    }

    /// (succeeded, failed)
    fn finish(self) -> anyhow::Result<(u64, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("prober panicked"))??)
    }
}

/// utime + stime of a process, in seconds.
fn proc_cpu_seconds(pid: Option<u32>) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    std::fs::read_to_string(format!("/proc/{}/stat", pid.unwrap_or(0)))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may contain spaces) start at ')'.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let u: f64 = f.get(11)?.parse().ok()?;
            let sy: f64 = f.get(12)?.parse().ok()?;
            Some((u + sy) / tick)
        })
        .unwrap_or(f64::NAN)
}

/// A `/proc/PID/status` field in KiB.
fn proc_status_kib(pid: Option<u32>, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{}/status", pid.unwrap_or(0)))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(f64::NAN)
}

/// median, p99, min, max
fn stats(v: &[f64]) -> (f64, f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    }
    let p99 = v[((v.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)];
    (v[v.len() / 2], p99, v[0], v[v.len() - 1])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("run as root (namespaces, iptables)");
    }
    let binary = match args.binary {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("kube-proxy-rs"),
    };
    if !binary.exists() {
        bail!(
            "{} not found: cargo build --release -p kube-proxy-rs",
            binary.display()
        );
    }
    let mut lab = Lab::new(1)?;
    let emu = lab.emulator.clone();
    let t_load = Instant::now();
    for i in 0..args.services {
        let a = 10 + (i >> 16);
        let ip = format!("10.{}.{}.{}", 96 + a - 10, (i >> 8) & 255, i & 255);
        emu.apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))
            .with_context(|| format!("service {i}"))?;
        emu.apply(slice(i, args.endpoints, 0))?;
    }
    let load_time = t_load.elapsed();
    // One service with a real pod behind it, for the connect-latency measurement (M5).
    let probe_ip = "10.96.255.250";
    let labels = json!({"app": "probe"});
    let manifest = [
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "probe", "namespace": "default"},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                    {"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}]}}}}),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "probe", "namespace": "default"},
            "spec": {"clusterIP": probe_ip, "selector": labels,
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    ]
    .map(|v| v.to_string())
    .join("\n---\n");
    lab.cluster.apply_manifest(&manifest)?;
    let probe_pod = lab
        .cluster
        .pods()
        .into_iter()
        .find(|p| p.name.starts_with("probe"))
        .context("probe pod")?;

    let node = lab.node_ns(1);
    let t0 = Instant::now();
    if let Ok(p) = std::env::var("KP_BENCH_PATH") {
        lab.proxy_env.push(("PATH".into(), p));
    }
    // KP_BENCH_ENV="A=1 B=2": extra environment for the proxy (allocator experiments).
    if let Ok(e) = std::env::var("KP_BENCH_ENV") {
        for kv in e.split_whitespace() {
            if let Some((k, v)) = kv.split_once('=') {
                lab.proxy_env.push((k.into(), v.into()));
            }
        }
    }
    let mode_flag = format!("--proxy-mode={}", args.mode);
    lab.start_proxy(&binary, 1, &["--iptables-min-sync-period=0s", &mode_flag])?;
    // The IPv4 family's first sync is the one that programs these services.
    // RSS once the initial lists are in (model and watches, before the dataplane).
    let mut rss_listed = f64::NAN;
    loop {
        let log = lab.proxy_log(1);
        if rss_listed.is_nan() && log.contains("initial Service and EndpointSlice lists complete") {
            rss_listed = proc_status_kib(lab.proxy(1).and_then(|p| p.child.id()), "VmRSS:");
        }
        if !sync_times_ms(&log).is_empty() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("first sync never completed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = metric(&node, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
    let cold = t0.elapsed();
    let first = sync_times_ms(&lab.proxy_log(1))
        .first()
        .map(|x| x.1)
        .unwrap_or(f64::NAN);
    let rss = std::fs::read_to_string(format!(
        "/proc/{}/status",
        lab.proxy(1).and_then(|p| p.child.id()).unwrap_or(0)
    ))
    .ok()
    .and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
    })
    .and_then(|kb| kb.parse::<f64>().ok())
    .unwrap_or(f64::NAN);

    // One endpoint change at a time, to the middle service.
    let mid = args.services / 2;
    let mut change_ms = Vec::new();
    for c in 1..=args.changes {
        let want = endpoint_ip(mid, c % 16);
        let before = sync_times_ms(&lab.proxy_log(1)).len();
        let t = Instant::now();
        emu.apply(slice(mid, args.endpoints, c))?;
        // Poll the log every millisecond (the lab's wait_for sleeps 50 ms between checks).
        while sync_times_ms(&lab.proxy_log(1)).len() <= before {
            if t.elapsed() > Duration::from_secs(60) {
                let log = lab.proxy_log(1);
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("change never synced; proxy log tail:\n{}", tail.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        change_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let _ = want;
    }
    // The M3 syncs: the ones after the first, before the burst.
    let m3_log = lab.proxy_log(1);
    let m3_count = sync_times_ms(&m3_log).len();

    // M4: a burst of endpoint changes (one per service, written as fast as the API
    // takes them), then the time until a sync that started after the last write ends.
    let burst = args.burst.min(args.services);
    let syncs_before = sync_times_ms(&lab.proxy_log(1)).len();
    let cpu_before = proc_cpu_seconds(lab.proxy(1).and_then(|p| p.child.id()));
    let t_burst = Instant::now();
    for i in 0..burst {
        emu.apply(slice(i, args.endpoints, 3))?;
    }
    let burst_write = t_burst.elapsed();
    let t_last = Instant::now();
    let mut burst_converged = f64::NAN;
    loop {
        // Each service changed once, so the burst is applied when the syncs since it
        // began have covered `burst` changed services.
        let covered: usize = log_field_ms(&lab.proxy_log(1), "changed_services=")
            .iter()
            .skip(syncs_before)
            .map(|(_, n)| *n as usize)
            .sum();
        if covered >= burst {
            burst_converged = t_last.elapsed().as_secs_f64() * 1000.0;
            break;
        }
        if t_last.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let burst_cpu = proc_cpu_seconds(lab.proxy(1).and_then(|p| p.child.id())) - cpu_before;
    let burst_syncs = sync_times_ms(&lab.proxy_log(1)).len() - syncs_before;

    // M5: TCP connect time from the node through the ClusterIP vs to the pod directly.
    let probe_addr: std::net::SocketAddr = format!("{probe_ip}:80").parse()?;
    let pod_addr = std::net::SocketAddr::new(probe_pod.ip, 8080);
    let (via_vip, direct) = in_netns(&node, || {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..300 {
            for (addr, out) in [(probe_addr, &mut a), (pod_addr, &mut b)] {
                let t = Instant::now();
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                    out.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        (a, b)
    })?;

    // M8: CPU of an idle proxy (no changes) over a few seconds.
    let idle_secs = 10.0;
    let c0 = proc_cpu_seconds(lab.proxy(1).and_then(|p| p.child.id()));
    std::thread::sleep(Duration::from_secs_f64(idle_secs));
    let idle_cpu = proc_cpu_seconds(lab.proxy(1).and_then(|p| p.child.id())) - c0;

    // M9: churn soak.
    let soak = if args.soak > 0 {
        let pid = lab.proxy(1).and_then(|p| p.child.id());
        let rss_start = proc_status_kib(pid, "VmRSS:");
        let prober = Prober::start(&node, probe_addr, Duration::from_millis(5));
        let syncs_before = sync_times_ms(&lab.proxy_log(1)).len();
        let total = (args.soak * args.soak_rate) as usize;
        let period = Duration::from_secs_f64(1.0 / args.soak_rate as f64);
        let t_soak = Instant::now();
        let mut written: Vec<Instant> = Vec::with_capacity(total);
        let mut done_at: Vec<Option<Instant>> = vec![None; total];
        let mut rss_peak = rss_start;
        let mut covered_seen = 0usize;
        let mut next = Instant::now();
        let mut k = 0usize;
        while k < total || covered_seen < total {
            let now = Instant::now();
            if k < total && now >= next {
                // One service after another, a new endpoint set each time.
                emu.apply(slice(
                    k % args.services,
                    args.endpoints,
                    5 + k / args.services,
                ))?;
                written.push(Instant::now());
                k += 1;
                next += period;
            }
            let covered: usize = log_field_ms(&lab.proxy_log(1), "changed_services=")
                .iter()
                .skip(syncs_before)
                .map(|(_, n)| *n as usize)
                .sum();
            for slot in done_at.iter_mut().take(covered.min(k)).skip(covered_seen) {
                *slot = Some(Instant::now());
            }
            covered_seen = covered_seen.max(covered.min(k));
            rss_peak = rss_peak.max(proc_status_kib(pid, "VmRSS:"));
            if t_soak.elapsed() > Duration::from_secs(args.soak + 120) {
                bail!("soak: changes not applied 120 s after the last write");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let (ok, failed) = prober.finish()?;
        let lat: Vec<f64> = written
            .iter()
            .zip(&done_at)
            .filter_map(|(w, d)| Some(d.as_ref()?.duration_since(*w).as_secs_f64() * 1000.0))
            .collect();
        Some((
            rss_start,
            proc_status_kib(pid, "VmRSS:"),
            rss_peak,
            stats(&lat),
            ok,
            failed,
            total,
        ))
    } else {
        None
    };

    let partial: Vec<f64> = sync_times_ms(&m3_log)
        .into_iter()
        .take(m3_count)
        .skip(1)
        .filter(|(full, _)| !full)
        .map(|x| x.1)
        .collect();
    let applies = log_field_ms(&m3_log, "apply_ms=");
    let first_apply = applies.first().map(|x| x.1).unwrap_or(f64::NAN);
    let partial_apply: Vec<f64> = applies
        .into_iter()
        .skip(1)
        .filter(|(full, _)| !full)
        .map(|x| x.1)
        .collect();

    let rss_now = std::fs::read_to_string(format!(
        "/proc/{}/status",
        lab.proxy(1).and_then(|p| p.child.id()).unwrap_or(0)
    ))
    .ok()
    .and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
    })
    .unwrap_or(f64::NAN);

    // M2: warm restart (SIGTERM, start again) with the rules in the kernel, while a prober
    // connects to the probe service every ~2 ms.
    let prober = Prober::start(&node, probe_addr, Duration::from_millis(2));
    std::thread::sleep(Duration::from_millis(200));
    let syncs_before_restart = sync_times_ms(&lab.proxy_log(1)).len();
    let t_restart = Instant::now();
    lab.stop_proxy(1, false);
    lab.start_proxy(&binary, 1, &["--iptables-min-sync-period=0s", &mode_flag])?;
    while sync_times_ms(&lab.proxy_log(1)).len() <= syncs_before_restart {
        if t_restart.elapsed() > Duration::from_secs(600) {
            bail!("no sync after the restart");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let warm = t_restart.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let (probe_ok, probe_failed) = prober.finish()?;

    // Kernel floor: load the final ruleset alone into a fresh namespace.
    lab.stop_proxy(1, false);
    let nft = args.mode == "nftables";
    let ipvs = args.mode == "ipvs";
    let (dump, rules) = if ipvs {
        // IPVS mode's state: the virtual and real servers and the ipsets (its dozen
        // iptables rules do not grow with services).
        let services = lab.topology().exec_ok(&node, &["ipvsadm", "-Sn"])?;
        let sets = lab.topology().exec_ok(&node, &["ipset", "save"])?;
        let n = services.lines().filter(|l| l.starts_with("-a ")).count();
        (format!("{services}\u{0}{sets}"), n)
    } else if nft {
        let t = lab
            .topology()
            .exec_ok(&node, &["nft", "list", "table", "ip", "kube-proxy"])?;
        let n = t
            .lines()
            .filter(|l| l.starts_with("\t\t") && !l.contains("elements") && !l.contains("type "))
            .count();
        (t, n)
    } else {
        // iptables-nft-save 1.8.9 overflows the default 8 MiB stack at 10k services.
        let save = |table: &str| {
            lab.topology().exec_ok(
                &node,
                &[
                    "sh",
                    "-c",
                    &format!("ulimit -s unlimited; exec iptables-save -t {table}"),
                ],
            )
        };
        let nat = save("nat")?;
        let filter = save("filter")?;
        let n = nat.lines().filter(|l| l.starts_with("-A")).count();
        (format!("{filter}{nat}"), n)
    };
    // Loads `dump` into a fresh namespace with `loader`; None if it failed.
    // (IPVS: `loader` runs once per NUL-separated part of `dump`, timed together.)
    let load_alone = |loader: &[&[&str]]| -> anyhow::Result<Duration> {
        let ns = format!("kpbench{}", std::process::id());
        let run = |a: &[&str]| std::process::Command::new("ip").args(a).status();
        run(&["netns", "add", &ns])?;
        // IPVS refuses IPv4 real servers in a namespace whose loopback is down.
        run(&["-n", &ns, "link", "set", "lo", "up"])?;
        let mut el = Duration::ZERO;
        let mut ok = true;
        for (part, loader) in dump.split('\u{0}').zip(loader) {
            let t = Instant::now();
            let mut child = std::process::Command::new("ip")
                .args(["netns", "exec", &ns])
                .args(*loader)
                .stdin(std::process::Stdio::piped())
                .spawn()?;
            use std::io::Write;
            child
                .stdin
                .take()
                .context("stdin")?
                .write_all(part.as_bytes())?;
            ok &= child.wait()?.success();
            el += t.elapsed();
        }
        run(&["netns", "del", &ns])?;
        if !ok {
            bail!("floor load with {loader:?} failed");
        }
        Ok(el)
    };
    // Floors: for nftables `nft -f`; for iptables the whole tables replaced (the fastest
    // load of these rules) and, unless skipped, `--noflush` as upstream loads them.
    let mut floors: Vec<(&str, Duration)> = Vec::new();
    if ipvs {
        floors.push((
            "ipvsadm --restore + ipset restore",
            load_alone(&[&["ipvsadm", "--restore"], &["ipset", "restore"]])?,
        ));
    } else if nft {
        floors.push(("nft -f", load_alone(&[&["nft", "-f", "-"]])?));
    } else {
        floors.push((
            "iptables-restore (tables replaced)",
            load_alone(&[&["iptables-restore"]])?,
        ));
        if !args.no_noflush_floor {
            floors.push((
                "iptables-restore --noflush (upstream's way)",
                load_alone(&[&["iptables-restore", "--noflush"]])?,
            ));
        }
    }
    let floor = floors.iter().map(|f| f.1).min().context("no floor")?;
    let (c50, c99, cmin, cmax) = stats(&change_ms);
    let (p50, p99, pmin, pmax) = stats(&partial);
    let (a50, a99, amin, amax) = stats(&partial_apply);
    let applier = if nft {
        "netlink batch, kernel time"
    } else if ipvs {
        "ipset restore, iptables-restore, IPVS netlink, ip"
    } else {
        "iptables-restore run"
    };
    println!(
        "kube-proxy-rs {} mode: {} services x {} endpoints ({} rules)",
        args.mode, args.services, args.endpoints, rules
    );
    println!("| measurement | median | p99 | min | max |");
    println!("|---|---|---|---|---|");
    println!(
        "| objects written to the emulator | {:.2} s | | | |",
        load_time.as_secs_f64()
    );
    println!(
        "| M1 cold start -> first sync committed (wall) | {:.0} ms | | | |",
        cold.as_secs_f64() * 1000.0
    );
    println!("| M1 first full sync (render + apply, proxy's timer) | {first:.0} ms | | | |");
    println!("| M1 of which apply ({applier}) | {first_apply:.0} ms | | | |");
    for (loader, took) in &floors {
        println!(
            "| kernel floor: the final ruleset loaded alone by {loader}, fresh netns | {:.0} ms | | | |",
            took.as_secs_f64() * 1000.0
        );
    }
    println!(
        "| ratio full sync / fastest floor | {:.2} | | | |",
        first / (floor.as_secs_f64() * 1000.0)
    );
    println!(
        "| M3 endpoint change, API write -> committed (n={}) | {c50:.1} ms | {c99:.1} | {cmin:.1} | {cmax:.1} |",
        change_ms.len()
    );
    println!("| M3 partial sync, proxy's timer | {p50:.1} ms | {p99:.1} | {pmin:.1} | {pmax:.1} |");
    println!(
        "| M4 burst of {burst} endpoint changes ({:.0} ms to write): last write -> converged | {burst_converged:.0} ms | | | |",
        burst_write.as_secs_f64() * 1000.0
    );
    println!("| M4 proxy CPU for the burst, syncs | {burst_cpu:.2} s, {burst_syncs} syncs | | | |");
    let (v50, v99, vmin, vmax) = stats(&via_vip);
    let (d50, d99, dmin, dmax) = stats(&direct);
    println!(
        "| M5 TCP connect via ClusterIP (n={}) | {v50:.0} us | {v99:.0} | {vmin:.0} | {vmax:.0} |",
        via_vip.len()
    );
    println!(
        "| M5 TCP connect to the pod IP (n={}); ratio of medians {:.2} | {d50:.0} us | {d99:.0} | {dmin:.0} | {dmax:.0} |",
        direct.len(),
        v50 / d50
    );
    println!(
        "| M8 idle CPU ({idle_secs:.0} s, no changes) | {:.2}% of one core | | | |",
        idle_cpu / idle_secs * 100.0
    );
    if let Some((start, end, peak, (l50, l99, lmin, lmax), ok, failed, total)) = soak {
        println!(
            "| M9 soak: {total} changes at {}/s, write -> committed | {l50:.1} ms | {l99:.1} | {lmin:.1} | {lmax:.1} |",
            args.soak_rate
        );
        println!(
            "| M9 soak RSS start / end / peak | {:.1} / {:.1} / {:.1} MiB | | | |",
            start / 1024.0,
            end / 1024.0,
            peak / 1024.0
        );
        println!(
            "| M9 soak probes to an unchanged service: failed / total | {failed} / {} | | | |",
            ok + failed
        );
    }
    println!(
        "| M2 warm restart: SIGTERM -> new proxy's first sync committed | {:.0} ms | | | |",
        warm.as_secs_f64() * 1000.0
    );
    println!(
        "| M2 connections during the restart: failed / total | {probe_failed} / {} | | | |",
        probe_ok + probe_failed
    );
    println!("| M3 of which apply ({applier}) | {a50:.2} ms | {a99:.2} | {amin:.2} | {amax:.2} |");
    println!(
        "| M7 proxy RSS after the changes (peak during the cold full sync) | {:.1} MiB ({:.1}) | | | |",
        rss_now / 1024.0,
        rss / 1024.0
    );
    println!(
        "| M7 of which: RSS with the initial lists in, before the first sync | {:.1} MiB | | | |",
        rss_listed / 1024.0
    );
    if let Ok(path) = std::env::var("KP_BENCH_CSV") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        for (i, c) in change_ms.iter().enumerate() {
            writeln!(
                f,
                "{},{},{},change_ms,{i},{c:.3}",
                args.mode, args.services, args.endpoints
            )?;
        }
        for (i, a) in partial_apply.iter().enumerate() {
            writeln!(
                f,
                "{},{},{},apply_ms,{i},{a:.3}",
                args.mode, args.services, args.endpoints
            )?;
        }
        writeln!(
            f,
            "{},{},{},full_sync_ms,0,{first:.3}",
            args.mode, args.services, args.endpoints
        )?;
    }
    Ok(())
}
