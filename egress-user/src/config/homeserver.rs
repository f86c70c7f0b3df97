//! Proxy and IP-range settings imported from a Synapse `homeserver.yaml`, so an admin configures
//! them once. Only five top-level keys are read; everything else in the file is ignored. Values
//! are returned as written: the caller validates them with its own parsers.

use std::{fmt, path::Path};

use anyhow::{Context, Result};
use serde::{
    Deserialize, Deserializer,
    de::{self, SeqAccess, Visitor},
};

/// The keys egress shares with Synapse. `null`/`~` counts as absent.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(expecting = "a map of settings")]
pub struct SynapseSettings {
    #[serde(default, deserialize_with = "opt_string")]
    pub http_proxy: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub https_proxy: Option<String>,
    #[serde(default, deserialize_with = "opt_strings")]
    pub no_proxy_hosts: Option<Vec<String>>,
    #[serde(default, deserialize_with = "opt_strings")]
    pub ip_range_blacklist: Option<Vec<String>>,
    #[serde(default, deserialize_with = "opt_strings")]
    pub ip_range_whitelist: Option<Vec<String>>,
}

/// Reads and parses the file; errors name it.
pub fn read_homeserver_config(path: &Path) -> Result<SynapseSettings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading Synapse config {}", path.display()))?;
    parse_homeserver_config(&text, &path.display().to_string())
}

/// Parses the text of a homeserver.yaml; `origin` (the file name) goes into error messages.
pub fn parse_homeserver_config(text: &str, origin: &str) -> Result<SynapseSettings> {
    // The YAML crate's messages carry the key path and line (e.g. `ip_range_blacklist[1]: ...`).
    serde_norway::from_str(text).with_context(|| format!("Synapse config {origin}"))
}

// The YAML crate turns any scalar into a String on request (`8080` → "8080"). Synapse (PyYAML)
// would see a number or a boolean there, so a non-string is a mistake worth stopping on: these
// helpers ask for the value's own type (`deserialize_any`) and accept only strings.

fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<StrictString>::deserialize(d)?.map(|s| s.0))
}

fn opt_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    Ok(Option::<StrictStrings>::deserialize(d)?.map(|s| s.0))
}

struct StrictString(String);

impl<'de> Deserialize<'de> for StrictString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StrictString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StrictString, E> {
                Ok(StrictString(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

struct StrictStrings(Vec<String>);

impl<'de> Deserialize<'de> for StrictStrings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrictStrings;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictStrings, A::Error> {
                let mut out = Vec::new();
                while let Some(StrictString(s)) = seq.next_element()? {
                    out.push(s);
                }
                Ok(StrictStrings(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Option<Vec<String>> {
        Some(v.iter().map(|s| s.to_string()).collect())
    }

    /// Shaped like the file `synapse.app.homeserver --generate-config` writes, plus hand edits.
    const REALISTIC: &str = r#"# Configuration file for Synapse.
#
# This is a YAML file: see [1] for a quick introduction.
server_name: "example.org"
pid_file: /var/run/matrix-synapse.pid
listeners:
  - port: 8008
    tls: false
    type: http
    x_forwarded: true
    bind_addresses: ['::1', '127.0.0.1']
    resources:
      - names: [client, federation]
        compress: false
database:
  name: psycopg2
  args: &dbargs
    user: synapse_user
    password: "secretpassword"
    database: synapse
    host: localhost
    cp_min: 5
    cp_max: 10
replica_database_args: *dbargs
log_config: "/etc/matrix-synapse/example.org.log.config"
media_store_path: /var/lib/matrix-synapse/media
max_upload_size: 50M
enable_registration: false
report_stats: false
trusted_key_servers:
  - server_name: "matrix.org"

# Outbound traffic goes through the corporate proxy.
http_proxy: http://USERNAME:PASSWORD@10.0.1.1:8080/
https_proxy: "http://proxy.example.com:8080/"
no_proxy_hosts:
  - master.hostname.example.com
  - 10.1.0.0/16
  - 172.30.0.0/16   # the DMZ
ip_range_blacklist:
  - '127.0.0.0/8'
  - '10.0.0.0/8'
  - 'fe80::/10'
  - ::1/128
ip_range_whitelist: []
url_preview_ip_range_blacklist: [127.0.0.0/8]
"#;

    #[test]
    fn parses() {
        let all = SynapseSettings {
            http_proxy: Some("http://USERNAME:PASSWORD@10.0.1.1:8080/".into()),
            https_proxy: Some("http://proxy.example.com:8080/".into()),
            no_proxy_hosts: strings(&["master.hostname.example.com", "10.1.0.0/16", "172.30.0.0/16"]),
            ip_range_blacklist: strings(&["127.0.0.0/8", "10.0.0.0/8", "fe80::/10", "::1/128"]),
            ip_range_whitelist: strings(&[]),
        };
        let none = SynapseSettings::default();
        let cases: &[(&str, &str, SynapseSettings)] = &[
            ("realistic", REALISTIC, all),
            ("empty", "", none.clone()),
            ("only comments", "# nothing here\n", none.clone()),
            (
                "only other keys",
                "server_name: x\ndatabase: {name: sqlite3, args: {database: /x}}\n",
                none.clone(),
            ),
            (
                "http_proxy alone",
                "http_proxy: http://p:3128\n",
                SynapseSettings {
                    http_proxy: Some("http://p:3128".into()),
                    ..none.clone()
                },
            ),
            (
                "https_proxy alone",
                "https_proxy: 'https://p:443'\n",
                SynapseSettings {
                    https_proxy: Some("https://p:443".into()),
                    ..none.clone()
                },
            ),
            (
                "no_proxy_hosts alone",
                "no_proxy_hosts: [localhost, '*.example.org']\n",
                SynapseSettings {
                    no_proxy_hosts: strings(&["localhost", "*.example.org"]),
                    ..none.clone()
                },
            ),
            (
                "ip_range_blacklist alone",
                "ip_range_blacklist:\n  - 192.168.0.0/16\n",
                SynapseSettings {
                    ip_range_blacklist: strings(&["192.168.0.0/16"]),
                    ..none.clone()
                },
            ),
            (
                "ip_range_whitelist alone",
                "ip_range_whitelist: ['10.1.2.3']\n",
                SynapseSettings {
                    ip_range_whitelist: strings(&["10.1.2.3"]),
                    ..none.clone()
                },
            ),
            (
                "nulls are absent",
                "http_proxy: ~\nhttps_proxy: null\nno_proxy_hosts:\nip_range_blacklist: ~\nip_range_whitelist: null\n",
                none.clone(),
            ),
            (
                "alias to another key's value",
                "ip_range_blacklist: &ranges [10.0.0.0/8]\nurl_preview_ip_range_blacklist: *ranges\n",
                SynapseSettings {
                    ip_range_blacklist: strings(&["10.0.0.0/8"]),
                    ..none.clone()
                },
            ),
            (
                "quoted or tagged number is a string",
                "http_proxy: '8080'\nhttps_proxy: !!str 8080\n",
                SynapseSettings {
                    http_proxy: Some("8080".into()),
                    https_proxy: Some("8080".into()),
                    ..none.clone()
                },
            ),
            (
                "values are not validated",
                "http_proxy: ''\nip_range_blacklist: [not-a-range]\n",
                SynapseSettings {
                    http_proxy: Some(String::new()),
                    ip_range_blacklist: strings(&["not-a-range"]),
                    ..none.clone()
                },
            ),
        ];
        for (name, text, want) in cases {
            let got =
                parse_homeserver_config(text, "homeserver.yaml").unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(&got, want, "{name}");
        }
    }

    #[test]
    fn rejects() {
        // (case, text, what the message must mention besides the file name)
        let cases: &[(&str, &str, &str)] = &[
            ("http_proxy number", "http_proxy: 8080\n", "http_proxy"),
            ("http_proxy list", "http_proxy: [a]\n", "http_proxy"),
            ("https_proxy bool", "https_proxy: true\n", "https_proxy"),
            ("https_proxy map", "https_proxy: {host: p}\n", "https_proxy"),
            (
                "no_proxy_hosts string",
                "no_proxy_hosts: localhost\n",
                "no_proxy_hosts",
            ),
            (
                "no_proxy_hosts number item",
                "no_proxy_hosts: [a, 1]\n",
                "no_proxy_hosts",
            ),
            (
                "ip_range_blacklist string",
                "ip_range_blacklist: \"10.0.0.0/8\"\n",
                "ip_range_blacklist",
            ),
            (
                "ip_range_blacklist number item",
                "ip_range_blacklist: ['10.0.0.0/8', 10]\n",
                "ip_range_blacklist",
            ),
            (
                "ip_range_blacklist null item",
                "ip_range_blacklist: ['10.0.0.0/8', ~]\n",
                "ip_range_blacklist",
            ),
            (
                "ip_range_whitelist map",
                "ip_range_whitelist: {a: b}\n",
                "ip_range_whitelist",
            ),
            (
                "ip_range_whitelist nested list",
                "ip_range_whitelist: [[a]]\n",
                "ip_range_whitelist",
            ),
            (
                "ip_range_whitelist number",
                "ip_range_whitelist: 1\n",
                "ip_range_whitelist",
            ),
            ("invalid YAML", "server_name: [\nhttp_proxy: x\n", "line"),
            ("bad indentation", "database:\n  name: x\n args: y\n", "line"),
            (
                "a list, not a map",
                "- http_proxy\n- https_proxy\n",
                "expected a map",
            ),
            ("a scalar, not a map", "just text\n", "expected a map"),
            // PyYAML would take the last one; which one the admin meant is unclear, so stop.
            ("duplicate key", "http_proxy: a\nhttp_proxy: b\n", "http_proxy"),
            ("two documents", "http_proxy: a\n---\nhttp_proxy: b\n", "document"),
        ];
        for (name, text, needle) in cases {
            let err = parse_homeserver_config(text, "/etc/matrix-synapse/homeserver.yaml").expect_err(name);
            let msg = format!("{err:#}");
            assert!(
                msg.contains("/etc/matrix-synapse/homeserver.yaml"),
                "{name}: {msg}"
            );
            assert!(msg.contains(needle), "{name}: {msg}");
        }
    }

    #[test]
    fn reads_file() {
        let path = std::env::temp_dir().join(format!("egress-homeserver-test-{}.yaml", std::process::id()));
        std::fs::write(&path, "https_proxy: http://p:3128\nreport_stats: true\n").unwrap();
        let got = read_homeserver_config(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(got.unwrap().https_proxy.as_deref(), Some("http://p:3128"));

        // Missing file: the error names it.
        let err = read_homeserver_config(&path).unwrap_err();
        assert!(
            format!("{err:#}").contains(&path.display().to_string()),
            "{err:#}"
        );
    }
}
