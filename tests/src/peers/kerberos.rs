//! A Kerberos realm for the proxy tests: a real MIT KDC (Debian's krb5-kdc) in a test namespace,
//! keytabs for a proxy's service principal and for egress, and squid answering only `Negotiate`
//! (`negotiate_kerberos_auth` with its own keytab). Nothing depends on DNS: krb5.conf names the
//! KDC by address and turns canonicalisation off.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::{
    process::{Daemon, Enter, launch, run},
    topology::netns::Netns,
    wait,
};

pub const REALM: &str = "EGRESS.TEST";
/// egress's client principal (without the realm).
pub const CLIENT: &str = "egress";

pub struct Kdc {
    pub dir: PathBuf,
    /// krb5.conf for clients of the realm (KRB5_CONFIG).
    pub krb5_conf: PathBuf,
    kdc_conf: PathBuf,
    /// The network namespace the KDC runs in (clients such as kinit run there too).
    netns: String,
    daemon: Option<Daemon>,
}

impl Kdc {
    /// A KDC for [`REALM`] on `address` (port 88, UDP and TCP) in `ns`.
    pub fn start(ns: &Netns, dir: &Path, address: &str) -> Result<Self> {
        let dir = dir.join("kdc");
        std::fs::create_dir_all(&dir)?;
        let d = dir.display();
        let krb5_conf = dir.join("krb5.conf");
        std::fs::write(
            &krb5_conf,
            format!(
                "[libdefaults]\n  default_realm = {REALM}\n  dns_lookup_kdc = false\n  \
                 dns_lookup_realm = false\n  rdns = false\n  dns_canonicalize_hostname = false\n  \
                 udp_preference_limit = 1\n\n[realms]\n  {REALM} = {{\n    kdc = {address}\n  }}\n\n\
                 [domain_realm]\n  .test = {REALM}\n"
            ),
        )?;
        let kdc_conf = dir.join("kdc.conf");
        std::fs::write(
            &kdc_conf,
            format!(
                "[kdcdefaults]\n  kdc_listen = {address}\n  kdc_tcp_listen = {address}\n\n[realms]\n  \
                 {REALM} = {{\n    database_name = {d}/principal\n    key_stash_file = {d}/stash\n    \
                 acl_file = {d}/kadm5.acl\n    max_life = 10h\n    max_renewable_life = 1d\n  }}\n"
            ),
        )?;
        std::fs::write(dir.join("kadm5.acl"), "")?;
        let mut kdc = Self {
            dir: dir.clone(),
            krb5_conf,
            kdc_conf,
            netns: ns.name.clone(),
            daemon: None,
        };
        kdc.admin_tool(
            "kdb5_util",
            &["create", "-s", "-r", REALM, "-P", "egress-test-master"],
        )?;
        let mut command = launch(Some(&ns.name), Enter::Net, None, "krb5kdc", &["-n", "-r", REALM]);
        kdc.env(&mut command);
        let mut daemon = Daemon::spawn("krb5kdc", command, &dir.join("krb5kdc.log"))?;
        wait::ready("the KDC to listen on 88", wait::STARTUP, || {
            daemon.check_alive()?;
            Ok(ns.is_listening(88))
        })
        .with_context(|| std::fs::read_to_string(dir.join("krb5kdc.log")).unwrap_or_default())?;
        kdc.daemon = Some(daemon);
        Ok(kdc)
    }

    fn env(&self, command: &mut std::process::Command) {
        command
            .env("KRB5_CONFIG", &self.krb5_conf)
            .env("KRB5_KDC_PROFILE", &self.kdc_conf);
    }

    fn admin_tool(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut command = std::process::Command::new(program);
        command.args(args);
        self.env(&mut command);
        let out = command.output().with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            anyhow::bail!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kadmin.local -q QUERY`.
    pub fn kadmin(&self, query: &str) -> Result<String> {
        self.admin_tool("kadmin.local", &["-r", REALM, "-q", query])
    }

    /// A principal with a random key, exported to a new keytab at `keytab`.
    pub fn principal_with_keytab(&self, principal: &str, keytab: &Path, owner: &str) -> Result<()> {
        self.kadmin(&format!("addprinc -randkey {principal}"))?;
        self.export(principal, keytab, owner)
    }

    /// Exports `principal`'s keys to `keytab` (which changes them: keytabs exported earlier
    /// go stale), readable by `owner` only.
    pub fn export(&self, principal: &str, keytab: &Path, owner: &str) -> Result<()> {
        let _ = std::fs::remove_file(keytab);
        self.kadmin(&format!("ktadd -k {} {principal}", keytab.display()))?;
        run("chown", &[owner, &keytab.to_string_lossy()])?;
        run("chmod", &["600", &keytab.to_string_lossy()])?;
        Ok(())
    }

    /// A ticket cache at `ccache` for `principal` from its `keytab`, valid for `lifetime`
    /// (kinit's notation, e.g. `5s`), owned by `owner`.
    pub fn kinit(
        &self,
        principal: &str,
        keytab: &Path,
        ccache: &Path,
        lifetime: &str,
        owner: &str,
    ) -> Result<()> {
        let cache = format!("FILE:{}", ccache.display());
        let keytab = keytab.to_string_lossy();
        let out = launch(
            Some(&self.netns),
            Enter::Net,
            None,
            "kinit",
            &["-k", "-t", &keytab, "-c", &cache, "-l", lifetime, principal],
        )
        .env("KRB5_CONFIG", &self.krb5_conf)
        .output()?;
        if !out.status.success() {
            anyhow::bail!("kinit: {}", String::from_utf8_lossy(&out.stderr));
        }
        run("chown", &[owner, &ccache.to_string_lossy()])?;
        Ok(())
    }
}
