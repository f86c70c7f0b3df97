//! `cargo xtask setup`: installs what a fresh Debian machine lacks. Idempotent, and a few
//! seconds when everything is already there.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Debian packages the agent's tests, demo and benchmarks use as real peers and tools.
pub const APT_PACKAGES: &[&str] = &[
    "squid",
    "apache2-utils",
    "nginx-light",
    "curl",
    "iproute2",
    "nftables",
    "openssl",
    "util-linux",
    "redsocks",
    "iptables",
    // DNS (A and SRV records) inside test namespaces, and a virtualenv for Synapse from PyPI.
    "dnsmasq-base",
    "python3",
    "python3-venv",
    // A real container engine for the container tests (started by the tests themselves, inside
    // a test namespace).
    "docker.io",
    // A 32-bit test program (its setsockopt is a compat syscall, which skips the cgroup hook).
    "gcc-multilib",
    // Kerberos: the system GSSAPI egress links (headers, and libclang for their bindings), and
    // a real KDC with its admin tools and kinit for the Negotiate proxy tests.
    "libkrb5-dev",
    "libclang-dev",
    "pkg-config",
    "krb5-kdc",
    "krb5-admin-server",
    "krb5-user",
    // A proxy whose clock is off, for the Kerberos clock-skew test.
    "faketime",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where bpf-linker and its LLVM shim live: $EGRESS_TOOLS_DIR or ~/.cache/egress/tools
/// (the same default egress-user's build script looks in).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("EGRESS_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/egress/tools")
        })
}

pub fn setup(with_packages: bool) -> Result<()> {
    if with_packages {
        apt_packages()?;
        resolver_daemons()?;
    }
    rust_src()?;
    bpf_linker()?;
    Ok(())
}

fn apt_packages() -> Result<()> {
    apt_install(APT_PACKAGES)
}

/// A clean Debian 12 root filesystem (debootstrap, minbase) for installing the package into:
/// $EGRESS_DEBIAN_ROOT or /var/cache/egress-debian12. Made once (a few minutes, from Debian's
/// mirror); tests use it read-only, under an overlay.
pub fn debian_root() -> Result<PathBuf> {
    let root = std::env::var_os("EGRESS_DEBIAN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/egress-debian12"));
    // What the root holds: minbase, and the libraries egress links beyond it (as `apt install`
    // of the package would pull them in). Another stamp means an older root: made again.
    const CONTENTS: &str = "bookworm minbase libgssapi-krb5-2\n";
    let stamp = root.join(".egress-complete");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == CONTENTS) {
        return Ok(root);
    }
    apt_install(&["debootstrap"])?;
    let partial = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    println!(
        "setup: debootstrap Debian 12 (bookworm, minbase) into {}",
        root.display()
    );
    sh(
        "debootstrap",
        &[
            "--variant=minbase",
            "--include=libgssapi-krb5-2",
            "bookworm",
            &partial.to_string_lossy(),
            "http://deb.debian.org/debian",
        ],
        &[],
    )?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&partial, &root)?;
    std::fs::write(&stamp, CONTENTS)?;
    Ok(root)
}

/// Where the resolver daemons of the name-resolution tests are unpacked (not installed: their
/// packages would take over the host's resolv.conf): $EGRESS_RESOLVERS_ROOT or
/// /var/cache/egress-resolvers/root.
pub fn resolvers_root() -> PathBuf {
    std::env::var_os("EGRESS_RESOLVERS_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/egress-resolvers/root"))
}

/// systemd-resolved with libnss-resolve (and the libsystemd-shared it links), and nscd, unpacked
/// into [`resolvers_root`] once per version; the tests run them inside their own namespaces.
fn resolver_daemons() -> Result<()> {
    let root = resolvers_root();
    let candidate = |package: &str| -> Result<String> {
        let policy = capture("apt-cache", &["policy", package])?;
        policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))
            .map(|v| v.trim().to_owned())
            .filter(|v| v != "(none)")
            .with_context(|| format!("Debian offers no {package}"))
    };
    let systemd = candidate("systemd-resolved")?;
    // nscd must match the C library it talks to.
    let libc = capture("dpkg-query", &["-W", "-f=${Version}", "libc6"])?;
    let wanted = [
        format!("systemd-resolved={systemd}"),
        format!("libnss-resolve={systemd}"),
        format!("libsystemd-shared={systemd}"),
        format!("nscd={libc}"),
    ];
    let stamp = root.join(".egress-stamp");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted.join(" ")) {
        return Ok(());
    }
    println!("setup: unpacking {} into {}", wanted.join(" "), root.display());
    let debs = root.with_file_name("debs");
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::create_dir_all(&debs)?;
    let mut download = Command::new("apt-get");
    download
        .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
        .args(&wanted)
        .current_dir(&debs);
    if !download.status()?.success() {
        sh("apt-get", &["update", "-qq"], &[])?;
        if !download.status()?.success() {
            bail!("apt-get download {} failed", wanted.join(" "));
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    for deb in std::fs::read_dir(&debs)? {
        let deb = deb?.path();
        sh(
            "dpkg-deb",
            &["-x", &deb.to_string_lossy(), &root.to_string_lossy()],
            &[],
        )?;
    }
    std::fs::write(&stamp, wanted.join(" "))?;
    Ok(())
}

/// Installs those of `packages` that are missing (`apt-get update` first, then).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    sh("apt-get", &["update", "-qq"], &[])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend_from_slice(&missing);
    sh("apt-get", &args, &[("DEBIAN_FRONTEND", "noninteractive")])?;
    // Debian starts redsocks' stock service on hosts with systemd; the benchmark runs its own
    // inside a namespace, and nothing else should listen on the host.
    if missing.contains(&"redsocks") {
        let _ = Command::new("sh")
            .args([
                "-c",
                "command -v systemctl >/dev/null && systemctl disable --now redsocks.service",
            ])
            .status();
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = capture("rustc", &["+nightly", "--print", "sysroot"]).context(
        "the nightly toolchain is required for the eBPF programs (rustup toolchain install nightly)",
    )?;
    Ok(PathBuf::from(out.trim()))
}

fn rust_src() -> Result<()> {
    let src = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core");
    if src.exists() {
        return Ok(());
    }
    println!("setup: adding rust-src to the nightly toolchain");
    sh(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
        &[],
    )
}

/// bpf-linker 0.13 built against the nightly toolchain's own libLLVM (as new as rustc's LLVM,
/// which Debian's LLVM is not). It is tied to that exact nightly: a stamp records which, and a
/// changed nightly or a binary that no longer runs triggers a rebuild.
fn bpf_linker() -> Result<()> {
    let root = tools_dir();
    let linker = root.join("bin/bpf-linker");
    let stamp_path = root.join("bpf-linker.stamp");
    let wanted_stamp = format!(
        "{BPF_LINKER_VERSION}\n{}",
        capture("rustc", &["+nightly", "-vV"])?
    );
    let runs = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if runs && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(wanted_stamp.as_str()) {
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's libLLVM (about a minute)"
    );
    let sysroot_lib = nightly_sysroot()?.join("lib");
    let lib = std::fs::read_dir(&sysroot_lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", sysroot_lib.display()))?;
    let llvm_major = wanted_stamp
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV did not report its LLVM version")?
        .to_owned();
    let shim = root.join("llvm-shim/lib");
    std::fs::create_dir_all(&shim)?;
    for name in [Path::new("libLLVM.so"), Path::new(lib.file_name().unwrap())] {
        let link = shim.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
    }
    let features = format!("llvm-{llvm_major}");
    let root_str = root.to_string_lossy().into_owned();
    let prefix = root.join("llvm-shim").to_string_lossy().into_owned();
    sh(
        "cargo",
        &[
            "+stable",
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &features,
            "--root",
            &root_str,
        ],
        &[("LLVM_PREFIX", prefix.as_str())],
    )?;
    let check = Command::new(&linker).arg("--version").output()?;
    if !check.status.success() {
        bail!(
            "the freshly built bpf-linker does not run: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    std::fs::write(&stamp_path, wanted_stamp)?;
    Ok(())
}

/// cargo-fuzz, from crates.io, when it is not installed yet.
pub fn cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    println!("setup: installing cargo-fuzz");
    sh("cargo", &["+stable", "install", "cargo-fuzz", "--locked"], &[])
}

/// The number before `what` (` passed`, ` failed`) in a libtest `test result: ` line.
pub fn result_count(result: &str, what: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(what)
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs cargo's test command, passing its output through, and closes with the totals of its
/// `test result:` lines as one plain `tests: N passed, M failed` line.
pub fn cargo_test(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut command = Command::new("cargo");
    command
        .args(args)
        .env_remove("RUSTUP_TOOLCHAIN")
        // ring's build script tracks it: inherited from xtask, it rebuilds ring every time.
        .env_remove("CARGO_MANIFEST_DIR")
        .stdout(std::process::Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += result_count(result, " passed");
            failed += result_count(result, " failed");
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn capture(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn sh(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let mut command = Command::new(program);
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    // xtask itself runs under cargo: do not leak its toolchain choice (or its manifest
    // directory, which ring's build script tracks) into nested cargo calls.
    command
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_MANIFEST_DIR");
    let status = command.status().with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
