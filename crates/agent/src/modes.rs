//! The one place that maps a [`Mode`] to its backend. Adding a mode: its crate, its
//! entry in `Mode::ALL`, and one arm in [`new_dataplane`]; the daemon, the cleanup of
//! other modes at start and `--cleanup` all go through here.

use kp_dataplane::{Dataplane, DataplaneConfig, Mode, SyncError, SystemRunner};
use kp_model::IpFamily;

/// A mode this build cannot run yet.
#[derive(Debug, thiserror::Error)]
#[error("proxy mode {0} is not implemented yet; use --proxy-mode=iptables or nftables")]
pub struct NotImplemented(pub Mode);

/// The dataplane of `mode` for `cfg.family`.
pub fn new_dataplane(
    mode: Mode,
    cfg: &DataplaneConfig,
) -> Result<Box<dyn Dataplane>, NotImplemented> {
    match mode {
        Mode::Iptables => Ok(Box::new(kp_iptables::IptablesProxier::new(
            SystemRunner,
            cfg.clone(),
        ))),
        Mode::Nftables => Ok(Box::new(
            kp_nftables::NftProxier::new(SystemRunner, cfg.clone()).with_netlink_applier(),
        )),
        Mode::Ipvs => Ok(Box::new(kp_ipvs::IpvsProxier::new(
            SystemRunner,
            cfg.clone(),
            Box::new(kp_ipvs::open_netlink),
            Box::new(kp_ipvs::RtnlDevice::new(kp_ipvs::DEVICE)),
        ))),
        Mode::Userspace => Err(NotImplemented(mode)),
    }
}

/// Whether this build can run `mode`.
pub fn implemented(mode: Mode) -> bool {
    new_dataplane(mode, &DataplaneConfig::for_cleanup(IpFamily::V4)).is_ok()
}

/// What one mode's cleanup found.
#[derive(Debug)]
pub enum Cleaned {
    Removed,
    /// The mode's tool is not installed, so nothing of it can be there.
    ToolMissing,
    NotImplemented,
    /// Nothing of the mode was found (so nothing was touched).
    NothingThere,
    Failed(SyncError),
}

/// Removes what `mode` installed for `family`. `cfg` gives the settings the rules were
/// written with where removal depends on them (defaults otherwise).
pub fn cleanup(mode: Mode, cfg: &DataplaneConfig) -> Cleaned {
    let Ok(mut dataplane) = new_dataplane(mode, cfg) else {
        return Cleaned::NotImplemented;
    };
    match dataplane.cleanup() {
        Ok(()) => Cleaned::Removed,
        Err(e) if e.is_tool_missing() => Cleaned::ToolMissing,
        Err(e) => Cleaned::Failed(e),
    }
}

/// Removes what `mode` left behind, if anything of it is there: a plain restart of the
/// running mode never flushes the chains two modes share (KUBE-SERVICES and others).
pub fn cleanup_leftovers(mode: Mode, cfg: &DataplaneConfig) -> Cleaned {
    let Ok(mut dataplane) = new_dataplane(mode, cfg) else {
        return Cleaned::NotImplemented;
    };
    if !dataplane.is_installed() {
        return Cleaned::NothingThere;
    }
    match dataplane.cleanup() {
        Ok(()) => Cleaned::Removed,
        Err(e) if e.is_tool_missing() => Cleaned::ToolMissing,
        Err(e) => Cleaned::Failed(e),
    }
}
