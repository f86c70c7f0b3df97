//! A second homeserver to federate with: Synapse on the origin host, outside egress, with its
//! own resolver (dnsmasq) and /etc/netns files; and what both homeservers of a federation test
//! need (a TLS federation listener, users with display names).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{Certs, synapse};
use crate::{
    process::{self, Daemon, Enter},
    topology::{SrvRecord, Testbed},
    wait,
};

/// Synapse's federation listener (TLS, `certs`) on `bind`:8448 and its client listener on
/// 127.0.0.1:8008, SQLite in `dir`, the test CA trusted for federation, and the test LAN
/// allowed (it is private address space, in Synapse's default `ip_range_blacklist`).
pub fn federation_overrides(dir: &Path, certs: &Certs, bind: &str) -> String {
    let (d, cert, key, ca) = (
        dir.display(),
        certs.cert.display(),
        certs.key.display(),
        certs.ca.display(),
    );
    format!(
        "listeners:
  - port: 8448
    bind_addresses: ['{bind}']
    type: http
    tls: true
    resources: [{{names: [federation], compress: false}}]
  - port: 8008
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    resources: [{{names: [client], compress: false}}]
tls_certificate_path: {cert}
tls_private_key_path: {key}
federation_custom_ca_list: [{ca}]
ip_range_whitelist: ['10.248.0.0/24']
database: {{name: sqlite3, args: {{database: {d}/homeserver.db}}}}
media_store_path: {d}/media_store
trusted_key_servers: []
suppress_key_server_warning: true
report_stats: false
"
    )
}

/// Registers `user` on the Synapse configured in `dir` (its client port on loopback, reached
/// through `run`, which runs a command beside it and returns its stdout and stderr) and sets
/// its display name.
pub fn register_with_name(run: &dyn Fn(&[&str]) -> String, dir: &Path, user: &str, display: &str) {
    let venv = synapse::venv().unwrap();
    let register = venv.join("bin/register_new_matrix_user");
    let config = dir.join("homeserver.yaml");
    let out = run(&[
        &register.to_string_lossy(),
        "-c",
        &config.to_string_lossy(),
        "-u",
        user,
        "-p",
        "correct-horse-battery",
        "--no-admin",
        "http://127.0.0.1:8008",
    ]);
    assert!(out.contains("Success"), "registering {user}: {out}");
    let login = format!(
        r#"{{"type":"m.login.password","identifier":{{"type":"m.id.user","user":"{user}"}},"password":"correct-horse-battery"}}"#
    );
    let answer = run(&[
        "curl",
        "-sS",
        "-d",
        &login,
        "http://127.0.0.1:8008/_matrix/client/v3/login",
    ]);
    let token = serde_json::from_str::<serde_json::Value>(&answer).unwrap()["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("login: {answer}"))
        .to_owned();
    let body = format!(r#"{{"displayname":"{display}"}}"#);
    let whoami = run(&[
        "curl",
        "-sS",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "http://127.0.0.1:8008/_matrix/client/v3/account/whoami",
    ]);
    let user_id = serde_json::from_str::<serde_json::Value>(&whoami).unwrap()["user_id"]
        .as_str()
        .unwrap_or_else(|| panic!("whoami: {whoami}"))
        .to_owned();
    let url = format!("http://127.0.0.1:8008/_matrix/client/v3/profile/{user_id}/displayname");
    let put = run(&[
        "curl",
        "-sS",
        "-X",
        "PUT",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-d",
        &body,
        &url,
    ]);
    assert_eq!(put.trim(), "{}", "setting the display name: {put}");
}

/// Waits until the Synapse reached through `run` answers /health.
pub fn wait_healthy(name: &str, run: &dyn Fn(&[&str]) -> String) -> Result<()> {
    wait::until(
        &format!("{name}'s /health"),
        std::time::Duration::from_secs(120),
        || {
            Ok(run(&[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:8008/health",
            ]))
        },
        |body| body.trim() == "OK",
    )
    .map(drop)
}

/// Removes a namespace's /etc/netns directory on drop.
pub struct EtcGuard(pub PathBuf);

impl Drop for EtcGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The second homeserver, on the origin host: not intercepted.
pub struct PeerHomeserver {
    pub dir: PathBuf,
    origin: String,
    // Dropped in this order: Synapse, its resolver, its /etc/netns files.
    _synapse: Daemon,
    _dns: Daemon,
    _etc: EtcGuard,
}

impl PeerHomeserver {
    /// Starts Synapse for `server_name` in the origin host, its federation listener on
    /// `bind`:8448 with `certs`. Its resolver answers from `hosts` (hosts-file lines) and `srv`,
    /// and NXDOMAIN for the rest of .test.
    pub fn start(
        bed: &Testbed,
        server_name: &str,
        bind: &str,
        certs: &Certs,
        hosts: &str,
        srv: &[SrvRecord],
    ) -> Result<Self> {
        let dir = bed.dir.join("hs2");
        let args = synapse::configure(&dir, server_name, &federation_overrides(&dir, certs, bind))?;
        let etc = PathBuf::from("/etc/netns").join(&bed.origin.name);
        std::fs::create_dir_all(&etc)?;
        let etc_guard = EtcGuard(etc.clone());
        std::fs::write(etc.join("hosts"), format!("127.0.0.1 localhost\n{hosts}"))?;
        std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        let dns = super::start_dnsmasq_on(&bed.origin, &dir, "127.0.0.1", hosts, srv, &[])?;
        let python = synapse::venv()?.join("bin/python").to_string_lossy().into_owned();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut command = process::launch(Some(&bed.origin.name), Enter::NetAndEtc, None, &python, &args);
        command.current_dir(&dir);
        let daemon = Daemon::spawn("hs2", command, &dir.join("stdout.log")).context("starting hs2")?;
        let peer = Self {
            dir,
            origin: bed.origin.name.clone(),
            _synapse: daemon,
            _dns: dns,
            _etc: etc_guard,
        };
        wait_healthy("hs2", &|args| peer.run(args))?;
        Ok(peer)
    }

    /// Runs a command beside it (its network namespace and /etc/netns files); stdout + stderr.
    pub fn run(&self, args: &[&str]) -> String {
        let out = process::output(process::launch(
            Some(&self.origin),
            Enter::NetAndEtc,
            None,
            args[0],
            &args[1..],
        ))
        .unwrap();
        format!("{}{}", out.stdout, out.stderr)
    }
}

/// Counts, with an nftables rule in `ns`, TCP packets from `source` to port 8448: federation
/// that went direct (replies of a federation listener at `source` go from 8448, not to it).
pub struct DirectFederation {
    ns: String,
}

impl DirectFederation {
    pub fn install(ns: &crate::topology::netns::Netns, source: &str) -> Result<Self> {
        process::run_with_input(
            "ip",
            &["netns", "exec", &ns.name, "nft", "-f", "-"],
            Some(&format!(
                "table inet egress_fed {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
                 ip saddr {source} tcp dport 8448 counter\n  }}\n}}\n"
            )),
        )?;
        Ok(Self { ns: ns.name.clone() })
    }

    pub fn packets(&self) -> Result<u64> {
        let listing = process::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns,
                "nft",
                "list",
                "chain",
                "inet",
                "egress_fed",
                "input",
            ],
        )?;
        let words: Vec<&str> = listing.split_whitespace().collect();
        let i = words
            .iter()
            .position(|w| *w == "packets")
            .with_context(|| format!("no counter in:\n{listing}"))?;
        Ok(words[i + 1].parse()?)
    }
}
