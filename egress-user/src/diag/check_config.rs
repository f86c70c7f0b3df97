//! `egress check-config`: the effective configuration, as TOML with secrets redacted (rendered
//! from the settings' declarations, see `config::reference`), warnings for cgroups that do
//! not exist (yet: a unit's cgroup exists only while it runs), and, with Kerberos, whether a
//! ticket for each proxy's service principal can be had (this asks the KDC, not the proxy).

use crate::{
    config::{Settings, reference},
    kernel,
    upstream::negotiate,
};

/// The report, and what makes the configuration unusable as it is (a failed Kerberos check).
pub fn check_config(settings: &Settings) -> (String, Option<String>) {
    let mut out = reference::render(settings);
    for cgroup in &settings.targets.cgroups {
        if let Err(e) = kernel::cgroup_id(cgroup) {
            out.push_str(&format!("# warning: {e:#}\n"));
        }
    }
    let hosts = negotiate::negotiate_hosts(settings);
    let mut problem = None;
    if !hosts.is_empty() {
        negotiate::set_environment(settings);
        if let Some(warning) = keytab_readable_by(settings) {
            out.push_str(&format!("# warning: {warning}\n"));
        }
    }
    for host in hosts {
        // On a thread of its own: a KDC that does not answer must not hang the check.
        let (sender, answer) = std::sync::mpsc::channel();
        let asked = host.clone();
        std::thread::spawn(move || {
            let _ = sender.send(negotiate::token_blocking(&asked));
        });
        match answer.recv_timeout(negotiate::TOKEN_TIMEOUT) {
            Ok(Ok(_)) => out.push_str(&format!("# kerberos: a ticket for HTTP/{host}: ok\n")),
            Ok(Err(e)) => {
                out.push_str(&format!("# error: {e}\n"));
                problem = Some(e.to_string());
            }
            Err(_) => {
                let e = format!("Kerberos ticket for HTTP/{host}: the KDC did not answer in time");
                out.push_str(&format!("# error: {e}\n"));
                problem = Some(e);
            }
        }
    }
    (out, problem)
}

/// Whether the agent's user (it reads the keytab after dropping root) can read the keytab.
fn keytab_readable_by(settings: &Settings) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let keytab = settings.kerberos_keytab.as_ref()?;
    let meta = match std::fs::metadata(keytab) {
        Ok(meta) => meta,
        Err(e) => return Some(format!("kerberos_keytab {}: {e}", keytab.display())),
    };
    let user = nix::unistd::User::from_name(&settings.user).ok().flatten()?;
    let owner_reads = meta.uid() == user.uid.as_raw() && meta.mode() & 0o400 != 0;
    let others_read = meta.mode() & 0o004 != 0;
    let group_reads = meta.gid() == user.gid.as_raw() && meta.mode() & 0o040 != 0;
    if others_read {
        return Some(format!(
            "kerberos_keytab {} is readable by every user: make it {}'s, mode 600",
            keytab.display(),
            settings.user
        ));
    }
    (!owner_reads && !group_reads).then(|| {
        format!(
            "kerberos_keytab {} is not readable by user {} (the agent reads it after dropping root)",
            keytab.display(),
            settings.user
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cgroups_are_warned_about_once() {
        let settings = Settings::from_toml("cgroups = [\"/nonexistent\"]");
        let (text, _) = check_config(&settings);
        assert_eq!(text.matches("/nonexistent").count(), 2, "{text}");
        assert!(text.contains("# warning: cgroup /nonexistent: "), "{text}");
    }
}
