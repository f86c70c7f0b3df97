//! How this host resolves names, as far as it matters to egress: the kernel programs read the
//! DNS answers that travel as UDP (or TCP) packets of the homeserver's cgroup. A name resolved
//! any other way (the hosts file, nscd's cache, systemd-resolved over its socket, DNS over TLS)
//! leaves no trace there: egress then routes SRV-delegated peers by their SRV target, checked by
//! its own lookup through the same system resolver, and other connections by SNI.

use std::path::Path;

use super::report::Status;

/// What the doctor reads.
pub struct HostResolution {
    /// /etc/nsswitch.conf.
    pub nsswitch: String,
    /// /etc/hosts.
    pub hosts: String,
    /// Whether nscd's socket exists (/run/nscd/socket): glibc asks nscd first.
    pub nscd: bool,
    /// The text of /etc/systemd/resolved.conf and its drop-ins, in order.
    pub resolved_confs: Vec<String>,
}

impl HostResolution {
    pub fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let mut resolved_confs = vec![read("/etc/systemd/resolved.conf")];
        let mut drop_ins: Vec<_> = std::fs::read_dir("/etc/systemd/resolved.conf.d")
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conf"))
            .collect();
        drop_ins.sort();
        resolved_confs.extend(
            drop_ins
                .iter()
                .map(|p| std::fs::read_to_string(p).unwrap_or_default()),
        );
        Self {
            nsswitch: read("/etc/nsswitch.conf"),
            hosts: read("/etc/hosts"),
            nscd: is_socket(Path::new("/run/nscd/socket")),
            resolved_confs,
        }
    }

    /// Each way names are resolved out of egress's sight, with what it means.
    pub fn findings(&self) -> Vec<(Status, String)> {
        let mut found = Vec::new();
        let sources = hosts_sources(&self.nsswitch);
        if sources.iter().any(|s| s == "resolve") {
            found.push((
                Status::Info,
                "nsswitch asks systemd-resolved (`resolve`) over its socket: getaddrinfo() answers \
                 do not travel as the homeserver's packets, so egress's record misses them; \
                 SRV-delegated peers are routed by their SRV target, which egress checks with its \
                 own lookup"
                    .to_owned(),
            ));
        }
        let custom_hosts = custom_hosts_entries(&self.hosts);
        if sources.iter().any(|s| s == "files") && custom_hosts > 0 {
            found.push((
                Status::Info,
                format!(
                    "/etc/hosts names {custom_hosts} host(s) besides localhost and this host: \
                     connections to them are not in egress's record; an SRV target found there \
                     is checked by egress's own lookup (containers: their own hosts file)"
                ),
            ));
        }
        if self.nscd {
            found.push((
                Status::Info,
                "nscd runs (/run/nscd/socket): glibc asks it first, and its lookups leave from \
                 nscd, not the homeserver; egress checks SRV targets through it too"
                    .to_owned(),
            ));
        }
        if let Some(mode) = dns_over_tls(&self.resolved_confs) {
            found.push((
                Status::Warn,
                format!(
                    "systemd-resolved uses DNSOverTLS={mode}: its answers cannot be read on the \
                     wire, and if the homeserver asks it over its stub (127.0.0.53) only the \
                     stub's answers are seen; egress relies on its own lookups for SRV targets"
                ),
            ));
        }
        found
    }
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// The sources of the `hosts:` line (without their `[...]` actions), in order.
fn hosts_sources(nsswitch: &str) -> Vec<String> {
    let Some(line) = nsswitch
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .find_map(|l| l.strip_prefix("hosts:"))
    else {
        // glibc's default without the file.
        return vec!["dns".to_owned(), "files".to_owned()];
    };
    let mut sources = Vec::new();
    let mut in_action = false;
    for word in line.split_whitespace() {
        if word.starts_with('[') {
            in_action = true;
        }
        if !in_action {
            sources.push(word.to_ascii_lowercase());
        }
        if word.ends_with(']') {
            in_action = false;
        }
    }
    sources
}

/// Entries of a hosts file that name something other than localhost or loopback.
fn custom_hosts_entries(hosts: &str) -> usize {
    hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let address: std::net::IpAddr = fields.next()?.parse().ok()?;
            let names: Vec<&str> = fields.collect();
            let local = address.is_loopback()
                || address.is_multicast()
                || names
                    .iter()
                    .any(|n| n.contains("localhost") || n.starts_with("ip6-"));
            (!local && !names.is_empty()).then_some(())
        })
        .count()
}

/// systemd-resolved's `DNSOverTLS=` in force (the last one set), unless `no`.
fn dns_over_tls(confs: &[String]) -> Option<String> {
    let mut mode = None;
    for conf in confs {
        let mut in_resolve = false;
        for line in conf.lines().map(str::trim) {
            if line.starts_with('[') {
                in_resolve = line == "[Resolve]";
            } else if in_resolve && let Some(value) = line.strip_prefix("DNSOverTLS=") {
                mode = Some(value.trim().to_ascii_lowercase());
            }
        }
    }
    mode.filter(|m| !m.is_empty() && m != "no" && m != "false" && m != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lines_are_read_with_their_actions_left_out() {
        for (nsswitch, want) in [
            ("hosts: files dns\n", &["files", "dns"][..]),
            (
                "passwd: files\nhosts:          files resolve [!UNAVAIL=return] myhostname dns\n",
                &["files", "resolve", "myhostname", "dns"],
            ),
            (
                "hosts: resolve [!UNAVAIL=return] files dns # comment\n",
                &["resolve", "files", "dns"],
            ),
            ("# hosts: resolve\nhosts: files dns\n", &["files", "dns"]),
            ("passwd: files\n", &["dns", "files"]),
        ] {
            assert_eq!(hosts_sources(nsswitch), want, "{nsswitch:?}");
        }
    }

    #[test]
    fn custom_hosts_entries_leave_out_the_local_ones() {
        let debian = "127.0.0.1\tlocalhost\n127.0.1.1\tmatrix\n::1 localhost ip6-localhost ip6-loopback\n\
                      ff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n";
        assert_eq!(custom_hosts_entries(debian), 0);
        let with_peers =
            format!("{debian}10.0.0.5 fed.partner.example\n# 10.0.0.6 old.example\n192.0.2.7 a b\n");
        assert_eq!(custom_hosts_entries(&with_peers), 2);
    }

    #[test]
    fn dns_over_tls_is_the_last_setting_in_the_resolve_section() {
        let conf = |text: &str| text.to_owned();
        for (confs, want) in [
            (vec![conf("[Resolve]\n#DNSOverTLS=no\n")], None),
            (vec![conf("[Resolve]\nDNSOverTLS=yes\n")], Some("yes")),
            (
                vec![
                    conf("[Resolve]\nDNSOverTLS=opportunistic\n"),
                    conf("[Resolve]\nDNSOverTLS=no\n"),
                ],
                None,
            ),
            (
                vec![
                    conf("[Resolve]\nDNSOverTLS=no\n"),
                    conf("[Resolve]\nDNSOverTLS=yes\n"),
                ],
                Some("yes"),
            ),
            (vec![conf("[Other]\nDNSOverTLS=yes\n")], None),
        ] {
            assert_eq!(dns_over_tls(&confs).as_deref(), want, "{confs:?}");
        }
    }

    #[test]
    fn each_way_out_of_sight_is_reported_and_a_plain_host_has_none() {
        let plain = HostResolution {
            nsswitch: "hosts: files dns\n".into(),
            hosts: "127.0.0.1 localhost\n".into(),
            nscd: false,
            resolved_confs: vec![],
        };
        assert!(plain.findings().is_empty());
        let all = HostResolution {
            nsswitch: "hosts: files resolve [!UNAVAIL=return] dns\n".into(),
            hosts: "127.0.0.1 localhost\n10.0.0.5 fed.partner.example\n".into(),
            nscd: true,
            resolved_confs: vec!["[Resolve]\nDNSOverTLS=yes\n".into()],
        };
        let found = all.findings();
        let said = |needle: &str| found.iter().any(|(_, m)| m.contains(needle));
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(said("systemd-resolved (`resolve`)"));
        assert!(said("/etc/hosts names 1 host"));
        assert!(said("nscd runs"));
        assert!(said("DNSOverTLS=yes"));
        assert_eq!(found.iter().filter(|(s, _)| *s == Status::Warn).count(), 1);
    }
}
