//! A real Synapse homeserver (matrix-synapse from PyPI, SQLite) in the homeserver namespace and
//! the intercepted cgroup, with no proxy configuration of its own.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    process::{self, Daemon},
    topology::Testbed,
    wait,
};

/// The Synapse release the tests were written against (1.163 measured here).
/// The url-preview extra: lxml and beautifulsoup4, which previews of HTML pages need.
pub const SYNAPSE_REQUIREMENT: &str = "matrix-synapse[url-preview]>=1.136,<1.200";
pub const SERVER_NAME: &str = "hs.test";
pub const CLIENT_PORT: u16 = 8008;

/// The virtualenv holding Synapse: $EGRESS_SYNAPSE_VENV, or ~/.cache/egress/synapse-venv.
/// Installed on first use (about a minute, from PyPI); later calls only check a stamp file
/// that records what was installed.
/// Serialised with flock, since tests run in parallel.
pub fn venv() -> Result<PathBuf> {
    let venv = std::env::var_os("EGRESS_SYNAPSE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/egress/synapse-venv")
        });
    let stamp = venv.join("egress-installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == SYNAPSE_REQUIREMENT) {
        return Ok(venv);
    }
    let parent = venv.parent().context("venv path has no parent")?;
    std::fs::create_dir_all(parent)?;
    let lock = parent.join("synapse-venv.lock");
    let script = r#"set -e
[ "$(cat "$1/egress-installed" 2>/dev/null)" = "$2" ] && exit 0
rm -rf "$1"
python3 -m venv "$1"
"$1/bin/pip" install --quiet --disable-pip-version-check "$2"
echo "$2" > "$1/egress-installed""#;
    let out = Command::new("flock")
        .arg(&lock)
        .args(["sh", "-c", script, "install-synapse"])
        .arg(&venv)
        .arg(SYNAPSE_REQUIREMENT)
        .output()
        .context("running flock/python3 to install Synapse")?;
    if !out.status.success() {
        bail!(
            "installing Synapse into {} failed:\n{}{}",
            venv.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(venv)
}

pub struct Synapse {
    pub dir: PathBuf,
    pub venv: PathBuf,
    daemon: Daemon,
}

impl Synapse {
    /// Generates a configuration in `bed.dir/synapse`, adds `extra_config` (YAML, top-level keys
    /// override), and starts Synapse in the intercepted cgroup with the test CA trusted. Waits
    /// for /health.
    pub fn start(bed: &Testbed, extra_config: &str) -> Result<Self> {
        let venv = venv()?;
        let dir = bed.dir.join("synapse");
        let python = venv.join("bin/python");
        let d = dir.display();
        let overrides = format!(
            "listeners:
  - port: {CLIENT_PORT}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: {d}/homeserver.db
media_store_path: {d}/media_store
trusted_key_servers: []
suppress_key_server_warning: true
report_stats: false
{extra_config}"
        );
        let args = configure(&dir, SERVER_NAME, &overrides)?;
        let python_s = python.to_string_lossy().into_owned();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut command = bed.hs_command(Some(&bed.cgroup.path), &python_s, &args);
        command.current_dir(&dir).env("SSL_CERT_FILE", &bed.certs.ca);
        // Synapse must not learn of any proxy: egress is the only way out.
        for var in [
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "NO_PROXY",
        ] {
            command.env_remove(var);
        }
        let mut daemon = Daemon::spawn("synapse", command, &dir.join("stdout.log"))?;
        wait::ready("Synapse's /health to answer OK", Duration::from_secs(90), || {
            daemon.check_alive()?;
            Ok(client_get(bed, "/health", None).is_ok_and(|(code, body)| code == 200 && body.trim() == "OK"))
        })?;
        Ok(Self { dir, venv, daemon })
    }

    /// Registers `user` (shared-secret registration) and logs in; returns the access token.
    pub fn register_and_login(&self, bed: &Testbed, user: &str, password: &str) -> Result<String> {
        let register = self
            .venv
            .join("bin/register_new_matrix_user")
            .to_string_lossy()
            .into_owned();
        let config = self.dir.join("homeserver.yaml").to_string_lossy().into_owned();
        let url = format!("http://127.0.0.1:{CLIENT_PORT}");
        let args = ["-c", &config, "-u", user, "-p", password, "--no-admin", &url];
        let out = bed.run_in_hs(&register, &args)?;
        if out.code != Some(0) {
            bail!("register_new_matrix_user: {out:?}");
        }
        let body = format!(
            r#"{{"type":"m.login.password","identifier":{{"type":"m.id.user","user":"{user}"}},"password":"{password}"}}"#
        );
        let url = format!("http://127.0.0.1:{CLIENT_PORT}/_matrix/client/v3/login");
        let out = bed.run_in_hs("curl", &["-sS", "--max-time", "20", "-d", &body, &url])?;
        serde_json::from_str::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|answer| Some(answer.get("access_token")?.as_str()?.to_owned()))
            .with_context(|| format!("no access_token in the login answer: {out:?}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("homeserver.log")).unwrap_or_default()
            + &std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
    }

    /// Stops Synapse (SIGTERM), closing its pooled connections.
    pub fn stop(mut self) -> Result<()> {
        self.daemon.signal(libc::SIGTERM);
        wait::ready("Synapse to exit", Duration::from_secs(15), || {
            Ok(self.daemon.exited())
        })
    }
}

/// Generates Synapse's configuration for `server_name` in `dir` (signing key, homeserver.yaml,
/// with the venv's Python) and writes `overrides` (YAML; its top-level keys win) beside it.
/// Returns the arguments that run it: `-m synapse.app.homeserver --config-path ...`.
pub fn configure(dir: &Path, server_name: &str, overrides: &str) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("homeserver.yaml");
    let generated = Command::new(venv()?.join("bin/python"))
        .current_dir(dir)
        .args(["-m", "synapse.app.homeserver", "--server-name", server_name])
        .arg("--config-path")
        .arg(&config)
        .args(["--generate-config", "--report-stats=no"])
        .output()?;
    if !generated.status.success() {
        bail!(
            "generating Synapse's config: {}",
            String::from_utf8_lossy(&generated.stderr)
        );
    }
    let overrides_path = dir.join("overrides.yaml");
    std::fs::write(&overrides_path, overrides)?;
    Ok(vec![
        "-m".into(),
        "synapse.app.homeserver".into(),
        "--config-path".into(),
        config.to_string_lossy().into_owned(),
        "--config-path".into(),
        overrides_path.to_string_lossy().into_owned(),
    ])
}

/// GET `path` from Synapse's client listener, from the homeserver host outside the intercepted
/// cgroup (loopback is never intercepted anyway). Returns (status, body).
pub fn client_get(bed: &Testbed, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let url = format!("http://127.0.0.1:{CLIENT_PORT}{path}");
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let headers: Vec<&str> = auth.iter().flat_map(|a| ["-H", a.as_str()]).collect();
    process::http_get(&bed.hs.name, &url, 60, &headers)
}

/// Percent-encodes a URL for a query parameter.
pub fn query_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
