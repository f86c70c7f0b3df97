//! The oldest kernel egress runs on, feature by feature, checked before anything is loaded: an
//! older kernel gets a message naming what it lacks instead of a verifier error.

use anyhow::{Result, bail};

/// What egress uses, and the first Linux release that has it.
pub const FEATURES: &[(&str, (u32, u32))] = &[
    (
        "BPF links for cgroup programs (pinned, survive the agent)",
        (5, 7),
    ),
    (
        "bpf_get_netns_cookie and bpf_get_current_ancestor_cgroup_id in cgroup/connect programs",
        (5, 7),
    ),
    (
        "cgroup/setsockopt hooks (routing headers refused) and socket storage in cgroup/connect \
         programs (egress's own listeners)",
        (5, 3),
    ),
    ("cgroup/getpeername4|6 hooks", (5, 8)),
    (
        "cgroup/sock_release hooks (synthetic DNS permissions go with their socket)",
        (5, 9),
    ),
    (
        "BPF ring buffer (DNS messages of intercepted processes to the agent)",
        (5, 8),
    ),
    ("SO_NETNS_COOKIE (the agent's namespace cookie)", (5, 14)),
    (
        "bpf_get_netns_cookie in sock_ops programs (original destinations per namespace)",
        (5, 15),
    ),
];

/// The kernel release's major and minor numbers (`6.1.0-57-amd64` → (6, 1)).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The oldest release with every feature.
pub fn minimum() -> (u32, u32) {
    FEATURES.iter().map(|(_, v)| *v).max().unwrap_or((0, 0))
}

/// Refuses a kernel older than [`minimum`], naming the features it lacks.
pub fn check(release: &str) -> Result<()> {
    let Some(running) = parse_release(release) else {
        tracing::warn!("cannot read the kernel version from {release:?}; going ahead");
        return Ok(());
    };
    let missing: Vec<String> = FEATURES
        .iter()
        .filter(|(_, since)| running < *since)
        .map(|(what, (major, minor))| format!("{what} (Linux {major}.{minor})"))
        .collect();
    if !missing.is_empty() {
        let (major, minor) = minimum();
        bail!(
            "Linux {release} is too old for egress, which needs {major}.{minor} or later; missing: {}",
            missing.join("; ")
        );
    }
    Ok(())
}

/// The running kernel's release (`uname -r`).
pub fn running_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        let cases = [
            ("6.1.0-57-amd64", Some((6, 1))),
            ("6.12.48+deb13-amd64", Some((6, 12))),
            ("5.15.0-127-generic", Some((5, 15))),
            ("6.18.44-fc-v782", Some((6, 18))),
            ("4.19.0", Some((4, 19))),
            ("garbage", None),
            ("", None),
        ];
        for (release, want) in cases {
            assert_eq!(parse_release(release), want, "{release}");
        }
    }

    #[test]
    fn old_kernels_are_refused_with_what_they_lack() {
        assert_eq!(minimum(), (5, 15));
        for ok in ["5.15.0-127-generic", "6.1.0-57-amd64", "6.12.48+deb13-amd64"] {
            assert!(check(ok).is_ok(), "{ok}");
        }
        let error = check("5.10.0-33-amd64").unwrap_err().to_string();
        assert!(error.contains("needs 5.15 or later"), "{error}");
        assert!(error.contains("SO_NETNS_COOKIE"), "{error}");
        assert!(error.contains("sock_ops"), "{error}");
        assert!(!error.contains("getpeername"), "5.10 has those hooks: {error}");
        let error = check("5.4.0").unwrap_err().to_string();
        assert!(
            error.contains("getpeername") && error.contains("BPF links"),
            "{error}"
        );
    }
}
