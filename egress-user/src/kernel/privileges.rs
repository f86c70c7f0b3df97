//! Dropping root once the programs are loaded and attached.
//!
//! The running agent needs one capability only: CAP_NET_ADMIN, to put its socket mark on the
//! connections it makes (SO_MARK). Maps and listeners are already-open file descriptors, which
//! need no privilege. Everything else goes: the user and groups change, all other capabilities
//! leave every set (bounding included), and no_new_privs is set.
//!
//! Capabilities are per thread, so this must run while the process is single-threaded, before
//! the async runtime starts its workers (which then inherit the reduced set).

use anyhow::{Context, Result, bail};
use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{User, setgroups, setresgid, setresuid};

/// Becomes `user` with only CAP_NET_ADMIN. `root` keeps everything (with a warning).
pub fn drop_to(user: &str) -> Result<()> {
    if user == "root" {
        tracing::warn!("user = root: the agent keeps all privileges (not recommended)");
        return Ok(());
    }
    let account = User::from_name(user)
        .with_context(|| format!("looking up user {user}"))?
        .with_context(|| format!("user {user}: no such user"))?;
    let keep: CapsHashSet = [Capability::CAP_NET_ADMIN].into_iter().collect();

    // While still fully privileged (CAP_SETPCAP): shrink the bounding set for good.
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .with_context(|| format!("dropping {cap} from the bounding set"))?;
        }
    }
    // Keep the permitted set across the uid change; it is trimmed right after.
    nix::sys::prctl::set_keepcaps(true).context("PR_SET_KEEPCAPS")?;
    setgroups(&[account.gid]).context("setgroups")?;
    setresgid(account.gid, account.gid, account.gid).context("setresgid")?;
    setresuid(account.uid, account.uid, account.uid).context("setresuid")?;
    nix::sys::prctl::set_keepcaps(false).context("PR_SET_KEEPCAPS")?;

    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing inheritable capabilities")?;
    caps::set(None, CapSet::Permitted, &keep).context("setting permitted capabilities")?;
    caps::set(None, CapSet::Effective, &keep).context("setting effective capabilities")?;
    nix::sys::prctl::set_no_new_privs().context("PR_SET_NO_NEW_PRIVS")?;

    let effective = caps::read(None, CapSet::Effective)?;
    if effective != keep || nix::unistd::geteuid() != account.uid {
        bail!("dropping privileges to {user} did not take effect");
    }
    tracing::info!(
        user,
        uid = account.uid.as_raw(),
        "dropped privileges; keeping CAP_NET_ADMIN only"
    );
    Ok(())
}

/// The namespace helper (see `netns::helper`) stays root but keeps only what making sockets in
/// other network namespaces takes: setns (CAP_SYS_ADMIN), opening another process's namespace
/// (CAP_SYS_PTRACE), the agent mark (CAP_NET_ADMIN), and the privileged listen port inside the
/// namespace (CAP_NET_BIND_SERVICE).
pub fn restrict_helper() -> Result<()> {
    let keep: CapsHashSet = [
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_SYS_PTRACE,
        Capability::CAP_NET_ADMIN,
        Capability::CAP_NET_BIND_SERVICE,
    ]
    .into_iter()
    .collect();
    // The bounding set takes CAP_SETPCAP to shrink (a unit's CapabilityBoundingSet may have
    // left it out); the effective and permitted sets below shrink regardless.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)
                    .with_context(|| format!("dropping {cap} from the bounding set"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing inheritable capabilities")?;
    let permitted = caps::read(None, CapSet::Permitted)?;
    let kept: CapsHashSet = keep.intersection(&permitted).copied().collect();
    caps::set(None, CapSet::Effective, &kept).context("setting effective capabilities")?;
    caps::set(None, CapSet::Permitted, &kept).context("setting permitted capabilities")?;
    nix::sys::prctl::set_no_new_privs().context("PR_SET_NO_NEW_PRIVS")?;
    if !caps::read(None, CapSet::Effective)?.is_subset(&keep) {
        bail!("the namespace helper could not give up its other capabilities");
    }
    Ok(())
}
