//! The command line's error paths: each refusal says what was wrong once, naming the thing
//! (cgroup, unit, setting, file, source) and the value once, on one line, and exits non-zero.
//!
//! The CLI alone: no namespaces, no peers, nothing attached.

use std::process::Command;

use egress_testbed::{egress_bin, process};

/// Runs `egress args...` with only `env` in its environment (and PATH).
fn egress(args: &[&str], env: &[(&str, &str)]) -> process::ClientResult {
    let mut command = Command::new(egress_bin());
    command
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (key, value) in env {
        command.env(key, value);
    }
    process::output(command).unwrap()
}

#[test]
fn each_error_says_each_thing_once() {
    let dir = std::env::temp_dir().join(format!("egress-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let bad_file = file("bad.toml", "peek_timeout = -7.5\n");
    let unknown_key = file("unknown.toml", "no_proxy_hosts = [\"a.example\"]\n");
    let missing_pins = dir.join("no-pins").to_string_lossy().into_owned();

    // (arguments, environment, what the one line must say, the things said exactly once)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            vec!["run", "--cgroup", "/sys/fs/cgroup/missing-egress-cgroup"],
            vec![],
            "egress: error: cgroup /sys/fs/cgroup/missing-egress-cgroup: ",
            vec!["missing-egress-cgroup", "cgroup /"],
        ),
        (
            vec!["check-config", "--unit", "no-such-egress-unit.service"],
            vec![],
            "egress: error: unit no-such-egress-unit.service: no cgroup of that name",
            vec!["no-such-egress-unit.service"],
        ),
        (
            vec!["check-config", "--config", &bad_file],
            vec![],
            ": peek_timeout: -7.5: must be a number of seconds above 0 and at most 3600",
            vec!["peek_timeout", "-7.5", "bad.toml"],
        ),
        (
            vec!["check-config", "--config", &unknown_key],
            vec![],
            "unknown key no_proxy_hosts",
            vec!["no_proxy_hosts", "unknown.toml"],
        ),
        (
            vec!["check-config", "--config", "/nonexistent/egress.toml"],
            vec![],
            "egress: error: reading config file /nonexistent/egress.toml: ",
            vec!["/nonexistent/egress.toml"],
        ),
        (
            vec![
                "check-config",
                "--homeserver-config",
                "/nonexistent/homeserver.yaml",
            ],
            vec![],
            "/nonexistent/homeserver.yaml: ",
            vec!["/nonexistent/homeserver.yaml"],
        ),
        (
            vec!["check-config"],
            vec![("HTTPS_PROXY", "socks5://proxy.example:1080")],
            "egress: error: environment variable https_proxy: unsupported proxy scheme 'socks5'",
            vec!["https_proxy", "socks5"],
        ),
        (
            vec!["check-config", "--peek-timeout=-7.5"],
            vec![],
            "invalid value '-7.5' for '--peek-timeout <SECS>': must be a number of seconds",
            vec!["-7.5", "peek-timeout"],
        ),
        (
            vec!["check-config", "--no-proxy", "10.0.0.0/99"],
            vec![],
            "invalid value '10.0.0.0/99' for '--no-proxy <ENTRY>': the prefix length must be",
            vec!["10.0.0.0/99"],
        ),
        (
            vec![
                "attach",
                "--cgroup",
                "/sys/fs/cgroup",
                "--bpffs-dir",
                &missing_pins,
            ],
            vec![],
            "egress: error: no egress instance at ",
            vec!["no-pins"],
        ),
        (
            vec![
                "detach",
                "--cgroup",
                "/sys/fs/cgroup/missing-egress-cgroup",
                "--bpffs-dir",
                &missing_pins,
            ],
            vec![],
            "egress: error: cgroup /sys/fs/cgroup/missing-egress-cgroup: ",
            vec!["missing-egress-cgroup"],
        ),
        (
            vec!["explain", "matrix.org:99999"],
            vec![],
            "egress: error: ",
            vec!["99999"],
        ),
    ];
    for (args, env, says, once) in cases {
        let out = egress(&args, &env);
        assert_ne!(out.code, Some(0), "{args:?}: {out:?}");
        let error = out
            .stderr
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or_else(|| panic!("{args:?}: no error line: {out:?}"));
        assert!(error.contains(says), "{args:?}: `{error}` should say `{says}`");
        for thing in once {
            assert_eq!(
                error.matches(thing).count(),
                1,
                "{args:?}: `{error}` should name `{thing}` once"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
