//! `egress check-config`: the effective configuration, as TOML with secrets redacted (rendered
//! from the settings' declarations, see `config::reference`), and warnings for cgroups that do
//! not exist (yet: a unit's cgroup exists only while it runs).

use crate::{
    config::{Settings, reference},
    kernel,
};

pub fn check_config(settings: &Settings) -> String {
    let mut out = reference::render(settings);
    for cgroup in &settings.targets.cgroups {
        if let Err(e) = kernel::cgroup_id(cgroup) {
            out.push_str(&format!("# warning: {e:#}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cgroups_are_warned_about_once() {
        let settings = Settings::from_toml("cgroups = [\"/nonexistent\"]");
        let text = check_config(&settings);
        assert_eq!(text.matches("/nonexistent").count(), 2, "{text}");
        assert!(text.contains("# warning: cgroup /nonexistent: "), "{text}");
    }
}
