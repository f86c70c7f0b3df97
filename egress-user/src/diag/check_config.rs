//! `egress check-config`: the effective configuration, as TOML with secrets redacted (rendered
//! from the settings' declarations, see `config::reference`), warnings for cgroups that do
//! not exist (yet: a unit's cgroup exists only while it runs), and, with Kerberos, whether a
//! ticket for each proxy's service principal can be had (this asks the KDC, not the proxy).

use crate::{
    config::{Settings, reference},
    kernel,
    upstream::negotiate,
};

pub fn check_config(settings: &Settings) -> String {
    let mut out = reference::render(settings);
    for cgroup in &settings.targets.cgroups {
        if let Err(e) = kernel::cgroup_id(cgroup) {
            out.push_str(&format!("# warning: {e:#}\n"));
        }
    }
    let hosts = negotiate::negotiate_hosts(settings);
    if !hosts.is_empty() {
        negotiate::set_environment(settings);
    }
    for host in hosts {
        match negotiate::token_blocking(&host) {
            Ok(_) => out.push_str(&format!("# kerberos: a ticket for HTTP/{host}: ok\n")),
            Err(e) => out.push_str(&format!("# error: {e}\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cgroups_are_warned_about_once() {
        let settings = Settings::from_toml("cgroups = [\"/nonexistent\"]");
        let text = check_config(&settings);
        assert_eq!(text.matches("/nonexistent").count(), 2, "{text}");
        assert!(text.contains("# warning: cgroup /nonexistent: "), "{text}");
    }
}
