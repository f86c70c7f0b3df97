//! The Debian package (`cargo xtask deb`), installed into a clean Debian 12 root filesystem
//! (debootstrap minbase, left unchanged under an overlay), run there, then removed and purged.
//! `cargo xtask test` builds both and passes them in EGRESS_DEB and EGRESS_DEBIAN_ROOT.
//!
//! Root only.

use std::path::{Path, PathBuf};

use egress_testbed::{
    overlay::Overlay,
    process::{self, TempDir},
};

/// An overlay over the Debian root with /proc mounted, unmounted on drop.
struct Chroot {
    /// Its root is `overlay.merged`; unmounted after /proc (fields drop after `Drop::drop`).
    overlay: Overlay,
}

impl Chroot {
    fn new(base: &Path, scratch: &Path) -> Self {
        let overlay = Overlay::mount(&[base], scratch).unwrap();
        let chroot = Self { overlay };
        process::run(
            "mount",
            &["-t", "proc", "proc", &chroot.path("/proc").to_string_lossy()],
        )
        .unwrap();
        chroot
    }

    /// `program args...` inside; (exit code, stdout + stderr).
    fn run(&self, program: &str, args: &[&str]) -> (Option<i32>, String) {
        let out = std::process::Command::new("chroot")
            .arg(&self.overlay.merged)
            .arg(program)
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env_remove("https_proxy")
            .env_remove("http_proxy")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.overlay.merged.join(inside.trim_start_matches('/'))
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        process::quietly("umount", &[&self.path("/proc").to_string_lossy()]);
    }
}

fn required(var: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: run this through `cargo xtask test`"))
}

#[test]
fn the_debian_package_installs_runs_and_removes_cleanly_on_debian_12() {
    let deb = required("EGRESS_DEB");
    let base = required("EGRESS_DEBIAN_ROOT");
    let scratch = TempDir::new("deb").unwrap();
    let chroot = Chroot::new(&base, &scratch.path);
    assert!(
        std::fs::read_to_string(chroot.path("/etc/os-release"))
            .unwrap()
            .contains("VERSION_ID=\"12\""),
        "not a Debian 12 root"
    );
    std::fs::copy(&deb, chroot.path("/tmp/egress.deb")).unwrap();

    let (code, out) = chroot.run("dpkg", &["-i", "/tmp/egress.deb"]);
    assert_eq!(code, Some(0), "dpkg -i: {out}");
    let (code, out) = chroot.run("egress", &["--version"]);
    assert_eq!(
        (code, out.trim()),
        (Some(0), concat!("egress ", env!("CARGO_PKG_VERSION")))
    );
    // The shipped configuration is valid, runs the agent as the package's user, and prints
    // no password.
    let (code, out) = chroot.run("egress", &["check-config", "--config", "/etc/egress/egress.toml"]);
    assert_eq!(code, Some(0), "check-config: {out}");
    assert!(out.contains("user = \"egress\""), "{out}");
    assert!(!out.contains("change-me"), "{out}");
    let (code, out) = chroot.run("getent", &["passwd", "egress"]);
    assert_eq!(code, Some(0), "no egress user: {out}");
    assert!(out.contains("/usr/sbin/nologin"), "{out}");

    // The unit and the drop-in are installed, point at the packaged binary, and are not enabled.
    let unit = std::fs::read_to_string(chroot.path("/lib/systemd/system/egress.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/egress run"), "{unit}");
    assert!(unit.contains("RequiresMountsFor=/sys/fs/bpf"), "{unit}");
    let drop_in =
        std::fs::read_to_string(chroot.path("/usr/share/egress/matrix-synapse.service.d/egress.conf"))
            .unwrap();
    assert!(drop_in.contains("+/usr/bin/egress attach --unit %n"), "{drop_in}");
    assert!(
        !chroot
            .path("/etc/systemd/system/multi-user.target.wants/egress.service")
            .exists()
    );
    let (_, conffiles) = chroot.run("dpkg-query", &["-W", "-f=${Conffiles}", "egress"]);
    assert!(conffiles.contains("/etc/egress/egress.toml"), "{conffiles}");

    // Removed: the binary goes, the (possibly edited) conffile stays; purged: it goes too.
    let (code, out) = chroot.run("dpkg", &["-r", "egress"]);
    assert_eq!(code, Some(0), "dpkg -r: {out}");
    assert!(!chroot.path("/usr/bin/egress").exists());
    assert!(!chroot.path("/lib/systemd/system/egress.service").exists());
    assert!(chroot.path("/etc/egress/egress.toml").exists());
    let (code, out) = chroot.run("dpkg", &["-P", "egress"]);
    assert_eq!(code, Some(0), "dpkg -P: {out}");
    assert!(!chroot.path("/etc/egress/egress.toml").exists());
    let (code, _) = chroot.run("dpkg", &["-s", "egress"]);
    assert_ne!(code, Some(0), "still installed after purge");
    let (code, out) = chroot.run("getent", &["passwd", "egress"]);
    assert_ne!(code, Some(0), "the egress user outlived the purge: {out}");
}
