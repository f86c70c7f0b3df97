//! `cargo xtask deb`: `target/egress_VERSION_amd64.deb`, built with dpkg-deb from a staged tree:
//!
//! - `/usr/bin/egress` (debug info stripped; it embeds its kernel programs);
//! - `egress.service`, installed but not enabled, and the Synapse drop-in under
//!   `/usr/share/egress/` for the admin to copy (it makes Synapse want egress and start after it);
//! - `/etc/egress/egress.toml`, a conffile, running the agent as the system user `egress`, which
//!   the maintainer scripts create;
//! - `RequiresMountsFor=/sys/fs/bpf` in the unit (egress mounts bpffs there itself if nothing did);
//! - maintainer scripts: an upgrade restarts a running agent on the new binary; a removal stops
//!   it, leaving its programs attached (intercepted services fail closed); a purge removes the
//!   pins (the programs detach and unload) and the user.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::setup;

const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd egress >/dev/null; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "egress proxy agent" egress
    fi
    # Not enabled or started: point egress.toml at the homeserver's units and proxy first.
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        # An upgrade: a running agent restarts on the new binary. Meanwhile the pinned programs
        # refuse intercepted connections (fail closed); none goes direct.
        if [ -n "$2" ]; then
            systemctl try-restart egress.service || true
        fi
    fi
fi
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
# Stopping egress leaves its programs attached: intercepted services fail closed (EPERM) until it
# runs again or `egress detach` removes the interception.
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop egress.service || true
fi
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
# Purged: the interception goes too. Its pins hold the programs on the homeserver's cgroups;
# with egress stopped (prerm) and gone, removing them detaches and unloads the programs.
if [ "$1" = purge ]; then
    rm -rf /sys/fs/bpf/egress
    if getent passwd egress >/dev/null; then
        userdel egress || true
    fi
    if getent group egress >/dev/null; then
        groupdel egress || true
    fi
fi
"#;

/// Builds the package from the release binary `bin`; returns its path.
pub fn build(root: &Path, bin: &Path) -> Result<PathBuf> {
    // xtask shares the workspace's version.
    build_as(root, bin, env!("CARGO_PKG_VERSION"))
}

/// [`build`] with another package version (a newer build, for upgrade tests).
pub fn build_as(root: &Path, bin: &Path, version: &str) -> Result<PathBuf> {
    let name = format!("egress_{version}_amd64");
    let stage = root.join("target/deb").join(&name);
    let _ = fs::remove_dir_all(&stage);
    let dir = |relative: &str| -> Result<PathBuf> {
        let path = stage.join(relative);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(path)
    };
    let packaging = root.join("packaging");

    let usr_bin = dir("usr/bin")?;
    setup::sh(
        "objcopy",
        &[
            "--strip-debug",
            &bin.to_string_lossy(),
            &usr_bin.join("egress").to_string_lossy(),
        ],
        &[],
    )?;

    let installed = |text: String| text.replace("/usr/local/bin/egress", "/usr/bin/egress");
    let unit = installed(fs::read_to_string(packaging.join("egress.service"))?).replace(
        "Wants=network-online.target\n",
        "Wants=network-online.target\nRequiresMountsFor=/sys/fs/bpf\n",
    );
    fs::write(dir("lib/systemd/system")?.join("egress.service"), unit)?;
    let drop_in = installed(fs::read_to_string(
        packaging.join("matrix-synapse.service.d/egress.conf"),
    )?);
    fs::write(
        dir("usr/share/egress/matrix-synapse.service.d")?.join("egress.conf"),
        drop_in,
    )?;
    let config = fs::read_to_string(packaging.join("egress.toml"))?;
    fs::write(
        dir("etc/egress")?.join("egress.toml"),
        format!("{config}\n# The package's system user (created by its postinst).\nuser = \"egress\"\n"),
    )?;
    let docs = dir("usr/share/doc/egress")?;
    for file in ["README.md", "SECURITY.md"] {
        fs::copy(root.join(file), docs.join(file))?;
    }
    // The reference the README points to, under the same relative path.
    let reference = dir("usr/share/doc/egress/docs")?;
    for entry in fs::read_dir(root.join("docs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            fs::copy(&path, reference.join(path.file_name().expect("a file name")))?;
        }
    }

    let debian = dir("DEBIAN")?;
    let size_kib = dir_size(&stage)? / 1024;
    fs::write(
        debian.join("control"),
        format!(
            "Package: egress\n\
             Version: {version}\n\
             Architecture: amd64\n\
             Maintainer: egress developers <egress@localhost>\n\
             Installed-Size: {size_kib}\n\
             Depends: libc6 (>= 2.34), libgssapi-krb5-2, passwd\n\
             Section: net\n\
             Priority: optional\n\
             Description: transparent egress proxy for Matrix homeserver hosts\n \
             A cgroup eBPF program redirects every outbound TCP connection of the homeserver's\n \
             cgroups (or containers) to the egress agent, which applies no_proxy rules and IP\n \
             blacklists and chains to the configured HTTP(S) proxy. Needs Linux 5.15 or later.\n"
        ),
    )?;
    fs::write(debian.join("conffiles"), "/etc/egress/egress.toml\n")?;
    for (script, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        let path = debian.join(script);
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }

    let deb = root.join("target").join(format!("{name}.deb"));
    setup::sh(
        "dpkg-deb",
        &[
            "--root-owner-group",
            "--build",
            &stage.to_string_lossy(),
            &deb.to_string_lossy(),
        ],
        &[],
    )?;
    println!("deb: {}", deb.display());
    Ok(deb)
}

fn dir_size(path: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
