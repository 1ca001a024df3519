//! kube-proxy-rs: a drop-in replacement for Kubernetes' kube-proxy.
//!
//! `kube-proxy-rs [upstream kube-proxy flags]` runs the proxy. The walk-through without a
//! cluster is the `kp-sandbox` binary (crates/sandbox), which runs this one.

mod client;
mod daemon;
mod events;
mod kernel;
mod modes;
mod runner;

use std::ffi::OsString;
use std::process::ExitCode;

fn init_tracing(verbosity: u32) {
    let default = match verbosity {
        0..=1 => "info",
        2..=3 => "info,kube_proxy_rs=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KUBE_PROXY_RS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// One malloc arena for every thread. glibc gives each thread that meets contention its
/// own arena; the tokio workers that convert the watched objects then keep the model in
/// two arenas, each with the holes the freed API objects left. Measured with kp-bench
/// (nftables, 10k services x 10 endpoints): RSS after the changes 71.9 -> 58.5 MiB.
/// `MALLOC_ARENA_MAX` or a `GLIBC_TUNABLES` arena setting wins.
fn malloc_setup() {
    #[cfg(target_env = "gnu")]
    {
        let tuned = std::env::var_os("MALLOC_ARENA_MAX").is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
        if !tuned {
            // SAFETY: mallopt only changes allocator parameters; called before any
            // thread is started.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        }
    }
}

fn main() -> ExitCode {
    malloc_setup();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "sandbox") {
        eprintln!(
            "kube-proxy-rs: the sandbox is its own binary now: ./scripts/kp sandbox (or target/release/kp-sandbox)"
        );
        return ExitCode::from(2);
    }
    let loaded = match kp_config::load(args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kube-proxy-rs: {e}");
            return ExitCode::FAILURE;
        }
    };
    if loaded.show_help {
        print!("{}", kp_config::help_text());
        return ExitCode::SUCCESS;
    }
    if loaded.show_version {
        println!(
            "kube-proxy-rs v{} (kube-proxy v1.3x compatible)",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    // A file anyone can write could redirect the proxy (config) or steal its identity
    // (kubeconfig): refuse to start, before touching the kernel.
    for (what, path) in [
        ("--config", loaded.config_file.as_ref()),
        ("--kubeconfig", loaded.settings.kubeconfig.as_ref()),
    ] {
        if let Some(path) = path
            && let Ok(meta) = std::fs::metadata(path)
            && std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o002 != 0
        {
            eprintln!(
                "kube-proxy-rs: {what} {} is world-writable; refusing to start (chmod o-w it)",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    }
    init_tracing(loaded.settings.verbosity);
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    if let Some(path) = &loaded.write_config_to {
        return match kp_config::write_config_file(path, &loaded.config) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "wrote configuration");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kube-proxy-rs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if loaded.cleanup {
        return cleanup(&loaded.settings);
    }
    if !modes::implemented(loaded.settings.mode) {
        eprintln!(
            "kube-proxy-rs: {}",
            modes::NotImplemented(loaded.settings.mode)
        );
        return ExitCode::FAILURE;
    }
    if let Some(adj) = loaded.settings.oom_score_adj
        && let Err(e) = std::fs::write("/proc/self/oom_score_adj", adj.to_string())
    {
        tracing::warn!(error = %e, "cannot set oom_score_adj");
    }
    if loaded.init_only {
        // Privileged set-up only, so the main container can run with fewer capabilities.
        kernel::apply_conntrack(&loaded.settings.conntrack);
        let cfg = daemon::dataplane_config(
            &loaded.settings,
            kp_model::IpFamily::V4,
            &Default::default(),
            &[],
        );
        if let Ok(dataplane) = modes::new_dataplane(loaded.settings.mode, &cfg) {
            for (sysctl, value) in dataplane.required_sysctls() {
                kernel::write_sysctl(sysctl, value);
            }
        }
        tracing::info!("--init-only: initialisation done");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kube-proxy-rs: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(daemon::run(loaded)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kube-proxy-rs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--cleanup`: remove everything every mode installed, then exit. Modes share chain
/// names (KUBE-SERVICES, KUBE-PROXY-FIREWALL, ...), so one mode's chain can still be
/// referenced by another's jump when its turn comes: what failed is tried once more
/// after every other mode's cleanup.
fn cleanup(settings: &kp_config::Settings) -> ExitCode {
    let mut ok = true;
    let node = k8s_openapi::api::core::v1::Node::default();
    for family in [kp_model::IpFamily::V4, kp_model::IpFamily::V6] {
        let cfg = daemon::dataplane_config(settings, family, &node, &[]);
        let mut retry = Vec::new();
        for (pass, modes) in [(1, kp_dataplane::Mode::ALL.to_vec()), (2, Vec::new())] {
            let modes = if pass == 1 {
                modes
            } else {
                std::mem::take(&mut retry)
            };
            for mode in modes {
                let family = family.k8s_name();
                match modes::cleanup(mode, &cfg) {
                    modes::Cleaned::Removed => tracing::info!(family, %mode, "removed rules"),
                    modes::Cleaned::ToolMissing => {
                        tracing::debug!(family, %mode, "tool not installed; nothing to remove")
                    }
                    modes::Cleaned::NotImplemented | modes::Cleaned::NothingThere => {}
                    modes::Cleaned::Failed(e) if pass == 1 => {
                        tracing::info!(family, %mode, error = %e, "cleanup incomplete; trying again after the other modes");
                        retry.push(mode);
                    }
                    modes::Cleaned::Failed(e) => {
                        tracing::error!(family, %mode, error = %e, "cleanup failed");
                        ok = false;
                    }
                }
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
