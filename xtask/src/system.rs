//! `cargo xtask test --system`: the documented deployment on a real systemd host. A Debian 12
//! root filesystem with systemd, squid, nginx and Synapse (in a virtualenv) is made once; each
//! run boots it with systemd as PID 1 and Debian's 6.1 kernel under qemu (virtme-ng, emulated),
//! under an overlay so that the root stays clean. There the unit `egress-system-test.service`
//! runs `tests/tests/system.rs` (install the package, start, use, restart, reload, upgrade,
//! purge) and powers the guest off; the results come back through the overlay's upper layer.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use egress_testbed::overlay::Overlay;

use crate::{deb, kernel, setup};

const DIR: &str = "/var/cache/egress-system";
/// The kernel the guest boots: Debian 12's own.
const KERNEL: &str = "6.1";
/// Debian packages of the host the guest is: systemd as init, what the test bed runs (squid with
/// htpasswd, nginx, dnsmasq, nftables, openssl, curl, python for Synapse) and bpftool to look
/// into the kernel after a purge.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "kmod",
    "iproute2",
    "procps",
    "squid",
    "apache2-utils",
    "nginx-light",
    "dnsmasq-base",
    "nftables",
    "openssl",
    "curl",
    "ca-certificates",
    "python3",
    "python3-venv",
    "libgssapi-krb5-2",
    "bpftool",
];
const SYNAPSE_VENV: &str = "/opt/synapse";
const GUEST_DIR: &str = "/opt/egress-test";
/// A bound on the whole guest run: boot, the scenario (about N minutes emulated), power-off.
const GUEST_TIMEOUT_SECONDS: u32 = 50 * 60;

const TEST_UNIT: &str = "[Unit]
Description=egress: the system test (tests/tests/system.rs)
After=multi-user.target
SuccessAction=poweroff-immediate
FailureAction=poweroff-immediate

[Service]
Type=oneshot
TimeoutStartSec=infinity
Environment=EGRESS_SYSTEM_GUEST=/opt/egress-test EGRESS_SYNAPSE_VENV=/opt/synapse
Environment=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The root is a 9p export mounted sync: the disk-heavy directories (the test bed's, SQLite's)
# go to memory, as fast as a real host's disk.
ExecStartPre=/bin/mount -t tmpfs -o size=1G tmpfs /tmp
ExecStartPre=/bin/mkdir -p /var/lib/matrix-synapse
ExecStartPre=/bin/mount -t tmpfs -o size=1G tmpfs /var/lib/matrix-synapse
ExecStart=/bin/sh -c '/opt/egress-test/system --ignored --test-threads 1 --nocapture \
    >/opt/egress-test/results/system.log 2>&1; echo $? >/opt/egress-test/results/exit-code'

[Install]
WantedBy=multi-user.target
";

pub fn run(root: &Path, egress_bin: &Path) -> Result<()> {
    let dir = Path::new(DIR);
    std::fs::create_dir_all(dir)?;
    let system_root = system_root(dir)?;
    let kernels = Path::new(kernel::DIR);
    std::fs::create_dir_all(kernels)?;
    let vng = kernel::vm_tools(kernels)?;
    let vmlinuz = kernel::kernel(kernels, KERNEL)?;
    let unpacked = vmlinuz
        .parent()
        .and_then(Path::parent)
        .context("vmlinuz is not in a boot directory")?;
    let modules = kernel_layer(dir, unpacked)?;
    let executables = kernel::test_executables(root)?;
    let test = executables
        .get("system")
        .context("no integration test named system")?;

    // The package, and a newer build of it for the upgrade.
    let version = env!("CARGO_PKG_VERSION");
    let debs = [
        deb::build_as(root, egress_bin, version)?,
        deb::build_as(root, egress_bin, &format!("{version}+system1"))?,
    ];

    // The guest's root: the clean system root and the kernel's modules, under a fresh overlay.
    let run = dir.join("run");
    let overlay = Overlay::mount(&[&system_root, &modules], &run)?;
    let merged = overlay.merged.clone();
    let guest = merged.join(GUEST_DIR.trim_start_matches('/'));
    std::fs::create_dir_all(guest.join("debs"))?;
    std::fs::create_dir_all(guest.join("results"))?;
    std::fs::copy(test, guest.join("system"))?;
    for deb in &debs {
        std::fs::copy(
            deb,
            guest.join("debs").join(deb.file_name().expect("a file name")),
        )?;
    }
    let units = merged.join("etc/systemd/system");
    std::fs::write(units.join("egress-system-test.service"), TEST_UNIT)?;
    std::fs::create_dir_all(units.join("multi-user.target.wants"))?;
    let wants = units.join("multi-user.target.wants/egress-system-test.service");
    let _ = std::fs::remove_file(&wants);
    std::os::unix::fs::symlink("/etc/systemd/system/egress-system-test.service", wants)?;

    println!(
        "system: booting Debian 12 with systemd and {} under qemu (emulated: about 20 minutes)",
        vmlinuz.display()
    );
    let started = Instant::now();
    let log_path = run.join("vng.log");
    let log = std::fs::File::create(&log_path)?;
    let path = format!(
        "{}:{}",
        vng.parent().expect("vng lives in a bin directory").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let vm = Command::new("timeout")
        .args(["-k", "30", &GUEST_TIMEOUT_SECONDS.to_string()])
        .arg(&vng)
        .args(["-v", "--disable-kvm", "--run"])
        .arg(&vmlinuz)
        .arg("--root")
        .arg(&merged)
        .args(["--rw", "--systemd", "--cpus", "2", "--memory", "4G"])
        .env("PATH", path)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running vng")?;
    let elapsed = started.elapsed().as_secs();
    let upper = overlay.upper.clone();
    drop(overlay);

    let results = upper.join(GUEST_DIR.trim_start_matches('/')).join("results");
    let output = std::fs::read_to_string(results.join("system.log")).unwrap_or_default();
    println!("{output}");
    let code = std::fs::read_to_string(results.join("exit-code")).unwrap_or_default();
    println!(
        "system: the guest ran {elapsed} s (vng: {vm}); console in {}",
        log_path.display()
    );
    match code.trim() {
        "0" if output.contains("test result: ok. 1 passed") => Ok(()),
        "" => bail!(
            "the guest did not finish the system test; see {}",
            log_path.display()
        ),
        code => bail!("the system test failed (exit {code})"),
    }
}

/// The kernel's modules where the guest's modprobe looks (/usr/lib/modules: /lib is a link to
/// usr/lib in Debian 12, which would hide a /lib of a lower layer), as hard links (no copy).
fn kernel_layer(dir: &Path, unpacked: &Path) -> Result<PathBuf> {
    let layer = dir.join(format!(
        "kernel-{}",
        unpacked.file_name().and_then(|n| n.to_str()).unwrap_or("unknown")
    ));
    if !layer.join("usr/lib/modules").exists() {
        let partial = layer.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(partial.join("usr/lib"))?;
        setup::sh(
            "cp",
            &[
                "-al",
                &unpacked.join("lib/modules").to_string_lossy(),
                &partial.join("usr/lib/modules").to_string_lossy(),
            ],
            &[],
        )?;
        let _ = std::fs::remove_dir_all(&layer);
        std::fs::rename(&partial, &layer)?;
    }
    Ok(layer)
}

/// The Debian 12 system root ([`PACKAGES`], Synapse in [`SYNAPSE_VENV`]), made once (several
/// minutes, from Debian's mirror and PyPI); a stamp records what it holds.
fn system_root(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("root");
    let requirement = egress_testbed::peers::synapse::SYNAPSE_REQUIREMENT;
    let contents = format!("bookworm minbase {}\n{requirement}\n", PACKAGES.join(","));
    let stamp = dir.join("root.stamp");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == contents) {
        return Ok(root);
    }
    setup::apt_install(&["debootstrap"])?;
    let partial = dir.join("root.partial");
    let _ = std::fs::remove_dir_all(&partial);
    println!(
        "setup: debootstrap Debian 12 with systemd into {}",
        root.display()
    );
    let partial_s = partial.to_string_lossy().into_owned();
    setup::sh(
        "debootstrap",
        &[
            "--variant=minbase",
            &format!("--include={}", PACKAGES.join(",")),
            "bookworm",
            &partial_s,
            "http://deb.debian.org/debian",
        ],
        &[],
    )?;
    // Synapse from PyPI with the guest's own Python. pip needs this machine's resolver and CAs
    // (a registry mirror's CA may be among them) for that only.
    std::fs::copy("/etc/resolv.conf", partial.join("etc/resolv.conf"))?;
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        partial.join("tmp/host-ca.pem"),
    )?;
    let script = format!(
        "python3 -m venv {SYNAPSE_VENV} && {SYNAPSE_VENV}/bin/pip install --quiet \
         --disable-pip-version-check '{requirement}' && echo '{requirement}' > {SYNAPSE_VENV}/egress-installed"
    );
    setup::sh(
        "chroot",
        &[&partial_s, "sh", "-c", &script],
        &[
            ("PIP_CERT", "/tmp/host-ca.pem"),
            ("REQUESTS_CA_BUNDLE", "/tmp/host-ca.pem"),
            ("SSL_CERT_FILE", "/tmp/host-ca.pem"),
        ],
    )?;
    std::fs::remove_file(partial.join("tmp/host-ca.pem"))?;
    // The guest has no network of its own; a machine id makes journald keep its journal.
    std::fs::write(partial.join("etc/resolv.conf"), "")?;
    std::fs::write(partial.join("etc/hostname"), "egress-system\n")?;
    let _ = std::fs::remove_file(partial.join("etc/machine-id"));
    setup::sh("chroot", &[&partial_s, "systemd-machine-id-setup"], &[])?;
    // Services the packages enabled that the test starts by itself, in its namespaces.
    setup::sh(
        "chroot",
        &[&partial_s, "systemctl", "disable", "squid", "nginx"],
        &[],
    )?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&partial, &root)?;
    std::fs::write(&stamp, contents)?;
    Ok(root)
}
