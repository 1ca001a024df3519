//! `process_*` metrics read from `/proc/self` on each scrape, with the Go client's names and
//! help texts (its process collector is part of upstream's `/metrics`).
//!
//! Like Go's procfs, CPU ticks are converted with USER_HZ = 100; a value that cannot be read
//! is left out of the scrape rather than reported wrong.

use std::fs;
use std::path::PathBuf;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Kernel clock ticks per second as reported in `/proc/<pid>/stat` (USER_HZ).
const USER_HZ: f64 = 100.0;

/// One snapshot of the process values the collector reports.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ProcessSnapshot {
    pub cpu_seconds: Option<f64>,
    pub start_time_seconds: Option<f64>,
    pub resident_memory_bytes: Option<f64>,
    pub virtual_memory_bytes: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
}

/// Reads process metrics from a procfs directory (`/proc/self` outside tests).
#[derive(Debug)]
pub(crate) struct ProcessCollector {
    proc_dir: PathBuf,
    /// `/proc/stat`, for the boot time that start times are relative to.
    system_stat: PathBuf,
}

impl ProcessCollector {
    pub(crate) fn new() -> Self {
        ProcessCollector {
            proc_dir: PathBuf::from("/proc/self"),
            system_stat: PathBuf::from("/proc/stat"),
        }
    }

    pub(crate) fn snapshot(&self) -> ProcessSnapshot {
        let mut snapshot = ProcessSnapshot::default();
        let stat = fs::read_to_string(self.proc_dir.join("stat")).ok();
        if let Some(fields) = stat.as_deref().and_then(stat_fields_after_comm) {
            snapshot.cpu_seconds = cpu_seconds(&fields);
            let boot_time = fs::read_to_string(&self.system_stat)
                .ok()
                .and_then(|text| boot_time_seconds(&text));
            snapshot.start_time_seconds = boot_time.and_then(|boot| {
                // Field 22 (starttime) is index 19 after pid and comm.
                let ticks: f64 = fields.get(19)?.parse().ok()?;
                Some(boot + ticks / USER_HZ)
            });
        }
        if let Ok(status) = fs::read_to_string(self.proc_dir.join("status")) {
            snapshot.resident_memory_bytes = status_kib(&status, "VmRSS:").map(|kib| kib * 1024.0);
            snapshot.virtual_memory_bytes = status_kib(&status, "VmSize:").map(|kib| kib * 1024.0);
        }
        snapshot.open_fds = fs::read_dir(self.proc_dir.join("fd"))
            .ok()
            .map(|entries| entries.count() as f64);
        snapshot.max_fds = fs::read_to_string(self.proc_dir.join("limits"))
            .ok()
            .and_then(|limits| max_open_files(&limits));
        snapshot
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot();
        if let Some(cpu) = snapshot.cpu_seconds {
            let counter = ConstCounter::new(cpu);
            // The encoder appends `_total`.
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        let gauges = [
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                snapshot.max_fds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                snapshot.open_fds,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                snapshot.resident_memory_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                snapshot.start_time_seconds,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                snapshot.virtual_memory_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let gauge = ConstGauge::new(value);
                let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
        }
        Ok(())
    }
}

/// The whitespace-separated fields after `(comm)`; comm may itself contain spaces and `)`.
fn stat_fields_after_comm(stat: &str) -> Option<Vec<&str>> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    Some(after_comm.split_whitespace().collect())
}

/// utime + stime (fields 14 and 15, indexes 11 and 12 after pid and comm) in seconds.
fn cpu_seconds(fields: &[&str]) -> Option<f64> {
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

fn boot_time_seconds(system_stat: &str) -> Option<f64> {
    system_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// A `Key:   123 kB` line of `/proc/<pid>/status`, in KiB.
fn status_kib(status: &str, key: &str) -> Option<f64> {
    let line = status.lines().find(|line| line.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// The soft limit of "Max open files" in `/proc/<pid>/limits`.
fn max_open_files(limits: &str) -> Option<f64> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        Some(f64::from(u32::MAX))
    } else {
        soft.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (kube proxy) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                        250 50 0 0 20 0 8 0 12345 100000000 2000 18446744073709551615";

    #[test]
    fn stat_parsing_handles_spaces_in_comm() {
        let fields = stat_fields_after_comm(STAT).expect("fields");
        assert_eq!(fields[0], "S");
        assert_eq!(cpu_seconds(&fields), Some(3.0));
        assert_eq!(fields[19], "12345");
    }

    #[test]
    fn snapshot_reads_a_fake_procfs() {
        let dir = std::env::temp_dir().join(format!("kp-admin-proc-{}", std::process::id()));
        let proc_dir = dir.join("self");
        fs::create_dir_all(proc_dir.join("fd")).expect("mkdir");
        for fd in ["0", "1", "2"] {
            fs::write(proc_dir.join("fd").join(fd), "").expect("fd");
        }
        fs::write(proc_dir.join("stat"), STAT).expect("stat");
        fs::write(
            proc_dir.join("status"),
            "Name:\tkube-proxy\nVmSize:\t  2048 kB\nVmRSS:\t   512 kB\n",
        )
        .expect("status");
        fs::write(
            proc_dir.join("limits"),
            "Limit                     Soft Limit           Hard Limit           Units\n\
             Max open files            1048576              1048576              files\n",
        )
        .expect("limits");
        fs::write(dir.join("stat"), "cpu  1 2 3\nbtime 1700000000\n").expect("system stat");

        let collector = ProcessCollector {
            proc_dir,
            system_stat: dir.join("stat"),
        };
        let snapshot = collector.snapshot();
        let _ = fs::remove_dir_all(&dir);

        assert_eq!(
            snapshot,
            ProcessSnapshot {
                cpu_seconds: Some(3.0),
                start_time_seconds: Some(1_700_000_000.0 + 123.45),
                resident_memory_bytes: Some(512.0 * 1024.0),
                virtual_memory_bytes: Some(2048.0 * 1024.0),
                open_fds: Some(3.0),
                max_fds: Some(1_048_576.0),
            }
        );
    }

    #[test]
    fn real_proc_self_is_readable() {
        let snapshot = ProcessCollector::new().snapshot();
        assert!(snapshot.resident_memory_bytes.unwrap_or(0.0) > 0.0);
        assert!(snapshot.open_fds.unwrap_or(0.0) >= 1.0);
        assert!(snapshot.start_time_seconds.unwrap_or(0.0) > 1_000_000_000.0);
    }
}
