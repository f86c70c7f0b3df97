//! `cargo xtask test --kernel VERSION`: integration tests inside another kernel, Debian's
//! `linux-image-VERSION*` package booted under qemu with virtme-ng. The package is unpacked, not
//! installed (the host's /boot and modules stay untouched); the guest shares the host's root
//! filesystem read-only, so it runs the binaries built here against the host's squid, nginx and
//! python. No KVM here (its flavour runs only PVM guests): qemu emulates (TCG), slowly.
//!
//! Everything lives in [`DIR`], the guest's one writable shared directory: the kernel, the
//! binaries under test (copied, so a rebuild cannot change them mid-run) and the results, which
//! the guest writes to files because vng's own exit status says nothing about the guest's.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::setup;

pub const DIR: &str = "/var/cache/egress-kernels";
const VIRTME_NG: &str = "virtme-ng==1.42";
/// Debian packages the VM needs (kmod: a new machine has no depmod, which virtme-ng uses).
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod"];
/// The tests run when none are named (and by CI): the tunnel through squid, failing closed, and
/// loopback; every policy route; the kernel's verdict on every kind of destination (the
/// destinations table); the side doors of the handoff (routing headers, claimed destinations,
/// squatters); IPv6; the served namespaces of containers; and the DNS programs.
/// `FILE:FILTER,FILTER` runs the tests of FILE whose names contain a FILTER. What is left out
/// takes long under emulation (tunnel's 40 concurrent connections, Synapse), not a newer kernel.
const SMOKE: &[&str] = &[
    "tunnel:tls_on_443_and_8448,stopped_or_killed_agent_fails_closed,loopback_connections",
    "policy",
    "kernel_model",
    "side_doors",
    "transparency:ipv6_",
    "containers",
    "dns:forged_dns_answers,protocols_without_sni_or_host,a_dns_port_reused",
];

/// The script the guest runs: the mounts and modules a fresh guest lacks, then each test binary.
const GUEST_SCRIPT: &str = r#"#!/bin/bash
D=$1; shift
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec >"$D/results/guest.log" 2>&1
uname -r
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
for m in veth bridge nf_tables nft_counter nft_chain_nat; do modprobe $m; done
ip link set lo up
mkdir -p /var/log/nginx /var/log/squid /var/spool/squid /run/squid
chown proxy:proxy /var/log/squid /var/spool/squid /run/squid
for spec in "$@"; do
  t=${spec%%:*}; filters=()
  [ "$t" != "$spec" ] && IFS=, read -ra filters <<<"${spec#*:}"
  EGRESS_BIN=$D/bin/egress timeout -k 10 1800 "$D/bin/$t" --test-threads=1 "${filters[@]}" >"$D/results/$t.log" 2>&1
  echo "$t $?" >>"$D/results/exit-codes"
done
echo done >"$D/results/finished"
"#;

pub fn run(root: &Path, egress_bin: &Path, version: &str, named: &[String]) -> Result<()> {
    let tests: Vec<String> = if named.is_empty() {
        SMOKE.iter().map(|t| t.to_string()).collect()
    } else {
        named.to_vec()
    };
    let dir = Path::new(DIR);
    std::fs::create_dir_all(dir)?;
    let vng = vm_tools(dir)?;
    let vmlinuz = kernel(dir, version)?;
    let executables = test_executables(root)?;

    let bin = dir.join("bin");
    let results = dir.join("results");
    for stale in [&bin, &results] {
        let _ = std::fs::remove_dir_all(stale);
        std::fs::create_dir_all(stale)?;
    }
    std::fs::copy(egress_bin, bin.join("egress")).context("copying the egress binary")?;
    for spec in &tests {
        let test = test_file(spec);
        let executable = executables
            .get(test)
            .with_context(|| format!("no integration test named {test}"))?;
        std::fs::copy(executable, bin.join(test))?;
    }
    std::fs::write(dir.join("guest.sh"), GUEST_SCRIPT)?;

    println!(
        "kernel {version}: booting {} under qemu (emulated: minutes per test file)",
        vmlinuz.display()
    );
    let mut exec = format!("bash {DIR}/guest.sh {DIR}");
    for test in &tests {
        exec.push(' ');
        exec.push_str(test);
    }
    let path = format!(
        "{}:{}",
        vng.parent().expect("vng lives in a bin directory").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::File::create(results.join("vng.log"))?;
    let vm = Command::new(&vng)
        .args(["-v", "--disable-kvm", "--run"])
        .arg(&vmlinuz)
        .args([
            "--user", "root", "--cpus", "2", "--memory", "4G", "--rwdir", DIR, "--exec", &exec,
        ])
        .env("PATH", path)
        // With -v the guest's console comes on stderr: into the log, not the terminal.
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running vng")?;
    if !results.join("finished").exists() {
        bail!(
            "the guest did not finish (vng {vm}); see {} and {}",
            results.join("vng.log").display(),
            results.join("guest.log").display()
        );
    }
    report(&results, version, &tests)
}

/// Prints each test file's output and the totals; fails unless every file passed.
fn report(results: &Path, version: &str, tests: &[String]) -> Result<()> {
    let codes = std::fs::read_to_string(results.join("exit-codes")).unwrap_or_default();
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut bad = Vec::new();
    for spec in tests {
        let test = test_file(spec);
        let log = std::fs::read_to_string(results.join(format!("{test}.log"))).unwrap_or_default();
        println!("kernel {version}, {test}:\n{log}");
        let mut file_passed = 0;
        for result in log.lines().filter_map(|l| l.strip_prefix("test result: ")) {
            file_passed += setup::result_count(result, " passed");
            failed += setup::result_count(result, " failed");
        }
        passed += file_passed;
        let code = codes
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{test} ")))
            .unwrap_or("missing");
        if code != "0" {
            bad.push(format!("{test} (exit {code})"));
        } else if file_passed == 0 {
            // A filter that matches nothing must not pass as a test run.
            bad.push(format!("{spec} (no test ran)"));
        }
    }
    println!("tests (kernel {version}): {passed} passed, {failed} failed");
    if !bad.is_empty() {
        bail!("on kernel {version}: {}", bad.join(", "));
    }
    Ok(())
}

/// The test file of `FILE` or `FILE:FILTERS`.
fn test_file(spec: &str) -> &str {
    spec.split_once(':').map_or(spec, |(file, _)| file)
}

/// qemu from Debian, virtme-ng from PyPI in a virtualenv; returns the `vng` program.
pub fn vm_tools(dir: &Path) -> Result<PathBuf> {
    setup::apt_install(PACKAGES)?;
    let venv = dir.join("venv");
    let vng = venv.join("bin/vng");
    if !vng.exists() {
        println!("setup: installing {VIRTME_NG} into {}", venv.display());
        setup::sh("python3", &["-m", "venv", &venv.to_string_lossy()], &[])?;
        setup::sh(
            &venv.join("bin/pip").to_string_lossy(),
            &["install", "-q", VIRTME_NG],
            &[],
        )?;
    }
    Ok(vng)
}

/// The newest `linux-image-VERSION*-amd64` Debian offers, unpacked (once) with its module index;
/// returns its vmlinuz.
pub fn kernel(dir: &Path, version: &str) -> Result<PathBuf> {
    let unpacked = dir.join(format!("k{version}"));
    if let Some(vmlinuz) = find_vmlinuz(&unpacked, version) {
        return Ok(vmlinuz);
    }
    // Another kernel unpacked there (an earlier, looser match took 6.12 for 6.1): start over.
    if unpacked.exists() {
        std::fs::remove_dir_all(&unpacked)?;
    }
    let pattern = format!(
        "^linux-image-{}[.-][.0-9+a-z-]*-amd64$",
        version.replace('.', "\\.")
    );
    let mut found = setup::capture("apt-cache", &["search", "--names-only", &pattern])?;
    if found.trim().is_empty() {
        setup::sh("apt-get", &["update", "-qq"], &[])?;
        found = setup::capture("apt-cache", &["search", "--names-only", &pattern])?;
    }
    let mut names: Vec<&str> = found
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        // The generic flavour: cloud kernels lack modules the tests load, rt ones are another build.
        .filter(|n| {
            is_release_of(n.strip_prefix("linux-image-").unwrap_or_default(), version)
                && !["-unsigned", "-dbg", "-cloud-", "-rt-"]
                    .iter()
                    .any(|f| n.contains(f))
        })
        .collect();
    names.sort_by_key(|name| version_key(name));
    let package = names
        .last()
        .with_context(|| format!("Debian offers no kernel package matching {pattern}"))?;
    println!("setup: unpacking {package} (not installed)");
    let status = Command::new("apt-get")
        .args(["download", package])
        .current_dir(dir)
        .status()?;
    if !status.success() {
        bail!("apt-get download {package} failed ({status})");
    }
    let deb = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("{package}: the download is missing"))?;
    setup::sh(
        "dpkg-deb",
        &["-x", &deb.to_string_lossy(), &unpacked.to_string_lossy()],
        &[],
    )?;
    let release = package.strip_prefix("linux-image-").expect("matched the pattern");
    setup::sh("depmod", &["-a", "-b", &unpacked.to_string_lossy(), release], &[])?;
    find_vmlinuz(&unpacked, version).with_context(|| format!("no vmlinuz of {version} in {package}"))
}

/// Whether kernel release `release` (`6.1.0-41-amd64`) is of `version` (`6.1`), and not of a
/// later one sharing its digits (`6.12.118+deb12-amd64`).
fn is_release_of(release: &str, version: &str) -> bool {
    release
        .strip_prefix(version)
        .is_some_and(|rest| rest.starts_with(['.', '-']))
}

/// Orders `linux-image-6.1.0-9-amd64` before `linux-image-6.1.0-57-amd64`: by the numbers in it.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn find_vmlinuz(unpacked: &Path, version: &str) -> Option<PathBuf> {
    std::fs::read_dir(unpacked.join("boot"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .is_some_and(|release| is_release_of(release, version))
        })
}

/// The integration test executables by name, as `cargo test --no-run` built them.
pub fn test_executables(root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let output = Command::new("cargo")
        .args([
            "test",
            "--release",
            "--locked",
            "-p",
            "egress-testbed",
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_MANIFEST_DIR")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the integration tests")?;
    if !output.status.success() {
        bail!("building the integration tests failed");
    }
    let mut executables = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(path)) = (
            is_test,
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            executables.insert(name.to_owned(), PathBuf::from(path));
        }
    }
    Ok(executables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_release_belongs_to_its_version_only() {
        for (release, version, belongs) in [
            ("6.1.0-41-amd64", "6.1", true),
            ("6.1.0-9-amd64", "6.1", true),
            ("6.12.118+deb12-amd64", "6.1", false),
            ("6.10.3-amd64", "6.1", false),
            ("6.12.118+deb12-amd64", "6.12", true),
            ("5.10.0-30-amd64", "5.10", true),
            ("5.10.0-30-amd64", "5.1", false),
            ("6.1", "6.1", false),
        ] {
            assert_eq!(is_release_of(release, version), belongs, "{release} of {version}");
        }
    }
}
