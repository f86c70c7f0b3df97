//! The settings read back from their declarations: `egress check-config`'s output, and the
//! configuration reference in `docs/configuration.md` (written by `cargo xtask docs`; a test
//! fails when the committed copy is stale).

use std::fmt::Write as _;

use clap::{Arg, Args};

use super::settings::Settings;
use crate::redact::redact_credentials;

/// Every declared setting, in declaration order (the shared groups at their place).
fn declared() -> Vec<Arg> {
    Settings::augment_args(clap::Command::new("egress"))
        .get_arguments()
        .cloned()
        .collect()
}

/// The settings' values as TOML values, by key.
fn values(settings: &Settings) -> toml::Table {
    let mut values = toml::Table::new();
    let parts = [
        toml::Table::try_from(settings),
        toml::Table::try_from(&settings.targets),
        toml::Table::try_from(&settings.engine),
        toml::Table::try_from(&settings.pins),
    ];
    for part in parts.into_iter().flatten() {
        values.extend(part);
    }
    values
}

/// The effective settings as a TOML file, in declaration order, grouped by section; settings
/// without a value are listed commented out. Credentials are masked.
pub fn render(settings: &Settings) -> String {
    let values = values(settings);
    let mut out = String::new();
    let mut section = None;
    for arg in declared() {
        let heading = arg.get_help_heading().unwrap_or("Other").to_owned();
        if section.as_ref() != Some(&heading) {
            let _ = writeln!(out, "\n# {heading}");
            section = Some(heading);
        }
        let key = arg.get_id().as_str();
        match values.get(key) {
            Some(value) => {
                let _ = writeln!(out, "{key} = {value}");
            }
            None => {
                let _ = writeln!(out, "# {key}: not set");
            }
        }
    }
    redact_credentials(out.trim_start())
}

/// The configuration reference, as Markdown (written to docs/configuration.md by the test
/// below, when asked).
#[cfg(test)]
pub fn markdown() -> String {
    let mut out = String::from(
        "# Configuration reference\n\n\
         <!-- Generated from egress-user/src/config/settings.rs by `cargo xtask docs`; do not edit. -->\n\n\
         Every setting of `egress run` (and of `check-config`, `explain` and `doctor`, which read the same\n\
         configuration). Each is a TOML key in the config file (`--config FILE`, default\n\
         `/etc/egress/egress.toml` if it exists) and a flag; list flags repeat. Sources, later wins:\n\
         the defaults below → Synapse's homeserver.yaml (`homeserver_config`: `http_proxy`,\n\
         `https_proxy`, `no_proxy_hosts`, `ip_range_blacklist`, `ip_range_whitelist`) → the config file →\n\
         the environment (the variables named below: any case, the lowercase spelling wins, as\n\
         Synapse reads them; empty counts as unset) → flags. Flags naming what is intercepted\n\
         (`--cgroup`, `--unit`, `--container`, `--pod-selector`) replace all of the file's targets.\n\
         `egress check-config` prints the effective configuration with credentials masked.\n",
    );
    let mut section = None;
    for arg in declared() {
        let heading = arg.get_help_heading().unwrap_or("Other").to_owned();
        if section.as_ref() != Some(&heading) {
            let _ = write!(out, "\n## {heading}\n");
            section = Some(heading);
        }
        let key = arg.get_id().as_str();
        let long = arg.get_long().unwrap_or(key);
        let value_name = arg
            .get_value_names()
            .and_then(|names| names.first())
            .map(|name| format!(" {name}"))
            .unwrap_or_default();
        let repeat = if matches!(arg.get_action(), clap::ArgAction::Append) {
            " (repeatable)"
        } else {
            ""
        };
        let _ = write!(out, "\n### `{key}`\n\n`--{long}{value_name}`{repeat}");
        if let Some(env) = arg.get_env() {
            let _ = write!(out, " · environment `{}`", env.to_string_lossy());
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .filter(|v| !v.is_empty())
            .collect();
        if !defaults.is_empty() {
            let _ = write!(out, " · default `{}`", defaults.join(", "));
        }
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        let _ = writeln!(out, "\n\n{}", help.trim());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/configuration.md is what the declarations say now. `cargo xtask docs` rewrites it
    /// (this test, with EGRESS_UPDATE_DOCS set).
    #[test]
    fn the_committed_reference_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let generated = markdown();
        if std::env::var_os("EGRESS_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &generated).unwrap();
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} is stale: run `cargo xtask docs`",
            path.display()
        );
    }

    #[test]
    fn the_reference_names_every_setting_with_its_flag_and_default() {
        let text = markdown();
        for (key, line) in [
            ("peek_timeout", "`--peek-timeout SECS` · default `0.5`"),
            ("cgroups", "`--cgroup PATH` (repeatable)"),
            ("https_proxy", "`--https-proxy URL` · environment `https_proxy`"),
            ("listen_port", "`--listen-port PORT` · default `1001`"),
        ] {
            let entry = text.split(&format!("### `{key}`\n")).nth(1).unwrap_or("");
            assert!(entry.trim_start().starts_with(line), "{key}: {entry}");
        }
        for key in super::super::sources::keys() {
            assert!(text.contains(&format!("### `{key}`\n")), "{key} missing");
        }
    }

    #[test]
    fn rendered_settings_are_valid_toml_without_secrets() {
        let settings =
            Settings::from_toml("https_proxy = \"http://u:s3cr3tpw@proxy:3128\"\nno_proxy = [\"a.example\"]");
        let text = render(&settings);
        assert!(!text.contains("s3cr3tpw"), "{text}");
        assert!(
            text.contains("https_proxy = \"http://u:***@proxy:3128\""),
            "{text}"
        );
        assert!(text.contains("# kube_api: not set"), "{text}");
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(
            parsed["no_proxy"].as_array().unwrap()[0].as_str(),
            Some("a.example")
        );
        assert_eq!(parsed["listen_port"].as_integer(), Some(1001));
    }
}
