//! Builds the kernel programs (egress-ebpf, nightly, bpfel-unknown-none) and hands the object's
//! path to the agent, which embeds it: the `egress` binary is the only file to ship.
//!
//! Needs the nightly toolchain with rust-src and bpf-linker; `cargo xtask setup` installs both
//! (bpf-linker under $EGRESS_TOOLS_DIR, default ~/.cache/egress/tools, which is searched here too).

use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let ebpf_dir = root.join("egress-ebpf");
    // Everything the kernel object is built from: its sources and the shared types, its manifest
    // and lockfile, its cargo settings (target, build-std, linker flags) and toolchain file.
    for watched in [
        "egress-ebpf/src",
        "egress-ebpf/Cargo.toml",
        "egress-ebpf/Cargo.lock",
        "egress-ebpf/.cargo/config.toml",
        "egress-ebpf/rust-toolchain.toml",
        "egress-common/src",
        "egress-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=EGRESS_TOOLS_DIR");

    let tools_bin = env::var_os("EGRESS_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var("HOME").unwrap_or_default()).join(".cache/egress/tools"))
        .join("bin");
    let search: Vec<PathBuf> = std::iter::once(tools_bin)
        .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default()))
        .collect();
    // A new bpf-linker (setup rebuilds it when the nightly changes) links a different object.
    if let Some(linker) = search
        .iter()
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
    {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    let path = env::join_paths(&search).unwrap();

    let target_dir = root.join("target/ebpf");
    let mut cargo = Command::new("rustup");
    cargo
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--locked",
            "--target-dir",
        ])
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        .env("PATH", path);
    // This script runs under the stable cargo: keep its settings away from the nested nightly build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTUP_TOOLCHAIN")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cargo.env_remove(key.as_ref());
        }
    }
    let status = cargo.status().expect("failed to run `rustup run nightly cargo`");
    if !status.success() {
        panic!(
            "building the eBPF programs failed ({status}); run `cargo xtask setup` to install \
             the nightly toolchain's rust-src and bpf-linker"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/egress");
    println!("cargo:rustc-env=EGRESS_EBPF_OBJECT={}", object.display());
}
