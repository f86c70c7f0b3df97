//! Upgrading in place: the previous release runs and serves, a client keeps connecting, and the
//! new release takes over the pinned maps and links. While they swap, connects are refused,
//! never passed; afterwards they are proxied again; nothing goes direct and nothing hangs.
//! `cargo xtask test` builds the previous release (a recorded commit) and passes it in
//! EGRESS_PREVIOUS_BIN.
//!
//! Root only.

use std::time::Duration;

use egress_testbed::{ORIGIN_NAME, Testbed, process::Daemon, wait};

/// One HTTPS request to the origin every 50 ms, 200 times; each status on a line of its own
/// (`000`: refused or failed), then `done`.
const LOAD: &str = "for i in $(seq 200); do curl -s -o /dev/null -w '%{http_code}\\n' --noproxy '*' --max-time 5 \
--cacert \"$0\" --resolve origin.test:443:10.248.0.30 https://origin.test/; sleep 0.05; done; echo done";

#[test]
fn the_new_release_takes_over_from_the_previous_one_under_load_with_nothing_direct() {
    let previous = std::env::var_os("EGRESS_PREVIOUS_BIN")
        .map(std::path::PathBuf::from)
        .expect("EGRESS_PREVIOUS_BIN is not set: run this through `cargo xtask test`");
    let mut bed = Testbed::standard();
    let args = bed.default_agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    bed.start_agent_bin(&previous, &args).unwrap();

    let ca = bed.certs.ca.to_string_lossy().into_owned();
    let log = bed.dir.join("load.log");
    let command = egress_testbed::process::launch(
        Some(&bed.hs.name),
        egress_testbed::process::Enter::Net,
        Some(&bed.cgroup.path),
        "sh",
        &["-c", LOAD, &ca],
    );
    let _load = Daemon::spawn("load", command, &log).unwrap();
    let statuses = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    wait::until(
        "the old release to proxy a few requests",
        wait::SHORT,
        || Ok(statuses()),
        |s| s.iter().filter(|l| *l == "200").count() >= 5,
    )
    .unwrap();

    // The upgrade: the old agent stops (its links stay pinned: connects are refused), the new
    // one takes over the maps and replaces the links.
    let before = statuses().len();
    bed.start_default_agent().unwrap();
    wait::until(
        "the load to finish",
        Duration::from_secs(120),
        || Ok(statuses()),
        |s| s.last().is_some_and(|l| l == "done"),
    )
    .unwrap();
    let all = statuses();
    let after: Vec<&String> = all[before..].iter().filter(|l| *l != "done").collect();
    assert!(
        all.iter().all(|s| s == "200" || s == "000" || s == "done"),
        "{all:?}"
    );
    assert!(
        after.iter().filter(|s| **s == "200").count() >= 5,
        "the new release did not proxy: {after:?}"
    );
    bed.agent()
        .wait_decision(&[
            ("route", &"proxy-connect"),
            ("target", &format!("{ORIGIN_NAME}:443")),
        ])
        .unwrap();
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "a connection went direct during the upgrade"
    );
    // The new release's own kernel state is in force: a followed-container map exists, and the
    // old pins were reused, not refused.
    assert!(bed.pin_dir.join("EGRESS_SCOPES").exists());
    assert!(!bed.agent().log().contains("another map layout"));
}
