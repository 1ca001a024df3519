//! `kube-proxy-rs sandbox`: the walk-through on a machine with no cluster.

pub fn main(_args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    anyhow::bail!("sandbox is not built yet")
}
