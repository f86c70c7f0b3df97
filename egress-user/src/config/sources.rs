//! The configuration's sources as figment layers, each named, so that a refused value is
//! reported with where it came from: the declared defaults, Synapse's homeserver.yaml, the TOML
//! file, the environment and the command line.

use std::path::{Path, PathBuf};

use clap::{ArgMatches, Args, parser::ValueSource};
use figment::{
    Figment, Metadata, Profile, Provider,
    value::{Dict, Map, Value},
};

use super::{
    homeserver::SynapseSettings,
    settings::{Engine, PinDir, Settings, Targets},
};

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    Homeserver(PathBuf),
    File(PathBuf),
    Environment,
    CommandLine,
}

impl Source {
    /// How an error names the source of `key`'s value.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Source::Default => format!("the default of {key}"),
            Source::Homeserver(path) => {
                let synapse_key = if key == "no_proxy" { "no_proxy_hosts" } else { key };
                format!("homeserver.yaml {}: {synapse_key}", path.display())
            }
            Source::File(path) => format!("config file {}: {key}", path.display()),
            Source::Environment => format!("environment variable {key}"),
            Source::CommandLine => format!("--{}", flag_of(key)),
        }
    }

    fn name(&self) -> String {
        match self {
            Source::Default => "default".into(),
            Source::Homeserver(path) => format!("homeserver:{}", path.display()),
            Source::File(path) => format!("file:{}", path.display()),
            Source::Environment => "environment".into(),
            Source::CommandLine => "command line".into(),
        }
    }

    fn from_name(name: &str) -> Self {
        match name.split_once(':') {
            Some(("homeserver", path)) => Source::Homeserver(path.into()),
            Some(("file", path)) => Source::File(path.into()),
            _ if name == "environment" => Source::Environment,
            _ if name == "command line" => Source::CommandLine,
            _ => Source::Default,
        }
    }
}

/// One source's values, by setting key.
pub struct Layer {
    source: Source,
    values: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.source.name())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

/// Every setting's key (its clap id, which is also its serde name), in declaration order.
pub fn keys() -> Vec<String> {
    Settings::augment_args(clap::Command::new("egress"))
        .get_arguments()
        .map(|arg| arg.get_id().to_string())
        .collect()
}

/// The flag of the setting `key`.
pub fn flag_of(key: &str) -> String {
    Settings::augment_args(clap::Command::new("egress"))
        .get_arguments()
        .find(|arg| arg.get_id() == key)
        .and_then(|arg| arg.get_long().map(str::to_owned))
        .unwrap_or_else(|| key.replace('_', "-"))
}

/// The settings' values as one dictionary, the shared groups included.
fn values_of(settings: &Settings) -> anyhow::Result<Dict> {
    let mut values = Dict::new();
    for part in [
        Value::serialize(settings).map_err(refused)?,
        Value::serialize(&settings.targets).map_err(refused)?,
        Value::serialize(&settings.engine).map_err(refused)?,
        Value::serialize(&settings.pins).map_err(refused)?,
    ] {
        values.extend(part.into_dict().unwrap_or_default());
    }
    Ok(values)
}

/// Reads the merged values into settings, the shared groups included.
pub fn extract(figment: &Figment) -> anyhow::Result<Settings> {
    let mut settings: Settings = figment.extract().map_err(refused)?;
    settings.targets = figment.extract::<Targets>().map_err(refused)?;
    settings.engine = figment.extract::<Engine>().map_err(refused)?;
    settings.pins = figment.extract::<PinDir>().map_err(refused)?;
    Ok(settings)
}

pub fn defaults() -> Layer {
    Layer {
        source: Source::Default,
        values: values_of(&Settings::default()).expect("the defaults serialize"),
    }
}

/// The keys egress shares with Synapse's homeserver.yaml, under egress's names.
pub fn homeserver(path: &Path, synapse: SynapseSettings) -> Layer {
    let mut values = Dict::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            values.insert(key.to_owned(), value);
        }
    };
    put("https_proxy", synapse.https_proxy.map(Value::from));
    put("http_proxy", synapse.http_proxy.map(Value::from));
    put("no_proxy", synapse.no_proxy_hosts.map(Value::from));
    put("ip_range_blacklist", synapse.ip_range_blacklist.map(Value::from));
    put("ip_range_whitelist", synapse.ip_range_whitelist.map(Value::from));
    Layer {
        source: Source::Homeserver(path.to_owned()),
        values,
    }
}

/// The TOML file's table, whose keys were checked against the declared ones.
pub fn file(path: &Path, table: toml::Table) -> anyhow::Result<Layer> {
    Ok(Layer {
        source: Source::File(path.to_owned()),
        values: Value::serialize(table)
            .map_err(refused)?
            .into_dict()
            .unwrap_or_default(),
    })
}

/// The settings that have an environment variable (declared with `env = ...`), read as Synapse
/// (Python's `getproxies_environment`) reads them: the name in any case, the all-lowercase
/// spelling winning; an empty value counts as unset. A list setting's value is split at commas,
/// blank entries skipped.
pub fn environment(env: &[(String, String)]) -> Layer {
    let mut values = Dict::new();
    for arg in Settings::augment_args(clap::Command::new("egress")).get_arguments() {
        let Some(name) = arg.get_env().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(value) = env_value(env, name) else {
            continue;
        };
        let value = match arg.get_value_delimiter() {
            Some(delimiter) => Value::from(
                value
                    .split(delimiter)
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            ),
            None => Value::from(value),
        };
        values.insert(arg.get_id().to_string(), value);
    }
    Layer {
        source: Source::Environment,
        values,
    }
}

fn env_value(env: &[(String, String)], name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    let mut found = None;
    for (key, value) in env {
        if !key.eq_ignore_ascii_case(&lower) || value.is_empty() {
            continue;
        }
        if *key == lower {
            return Some(value.clone());
        }
        found.get_or_insert_with(|| value.clone());
    }
    found
}

/// The settings given on the command line (`args.given`), nothing else: clap's defaults are
/// the defaults layer's.
pub fn command_line(settings: &Settings, given: &[String]) -> anyhow::Result<Layer> {
    let mut values = values_of(settings)?;
    values.retain(|key, _| given.iter().any(|g| g == key));
    Ok(Layer {
        source: Source::CommandLine,
        values,
    })
}

/// The ids of the arguments in `matches` that were given on the command line.
pub fn given_on_command_line(matches: &ArgMatches) -> Vec<String> {
    matches
        .ids()
        .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect()
}

/// A value figment could not take, said once: where it came from, the setting, and why.
pub fn refused(error: figment::Error) -> anyhow::Error {
    let source = error
        .metadata
        .as_ref()
        .map_or(Source::Default, |m| Source::from_name(&m.name));
    let why = crate::redact::redact_credentials(&error.kind.to_string());
    match (error.path.first(), source) {
        (Some(key), source) => anyhow::anyhow!("{}: {why}", source.describe(key)),
        (None, Source::File(path)) => anyhow::anyhow!("config file {}: {why}", path.display()),
        (None, _) => anyhow::anyhow!("{why}"),
    }
}

/// `egress run`'s command line alone, for parsing argument lists in tests, with clap's own
/// reading of the environment turned off (the environment is a layer of its own).
#[cfg(test)]
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    super::RunArgs::command().mut_args(|arg| arg.env(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As Python's `getproxies_environment`: any case, the lowercase spelling wins wherever it
    /// stands, empty counts as unset.
    #[test]
    fn environment_variables_are_read_as_synapse_reads_them() {
        type Vars<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Vars, Option<&str>)] = &[
            (&[], None),
            (&[("HTTPS_PROXY", "upper")], Some("upper")),
            (&[("https_proxy", "lower")], Some("lower")),
            (
                &[("HTTPS_PROXY", "upper"), ("https_proxy", "lower")],
                Some("lower"),
            ),
            (
                &[("https_proxy", "lower"), ("HTTPS_PROXY", "upper")],
                Some("lower"),
            ),
            (&[("Https_Proxy", "mixed")], Some("mixed")),
            (&[("https_proxy", ""), ("HTTPS_PROXY", "upper")], Some("upper")),
            (&[("http_proxy", "other")], None),
        ];
        for (vars, expected) in cases {
            let env: Vec<(String, String)> =
                vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            assert_eq!(env_value(&env, "https_proxy").as_deref(), *expected, "{vars:?}");
        }
    }
}
