//! The container engine's API: Docker's, which Podman also serves (`podman system service`), on
//! a Unix socket. Only two reads are needed (a container by name or id, and the engine's info),
//! made as [`super::api::get`] makes them.

use std::{
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Largest response read (a container's inspect output is a few KiB).
const MAX_RESPONSE: usize = 4 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct Engine {
    socket: PathBuf,
}

/// What egress needs to know of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// Without the leading slash the API puts there.
    pub name: String,
    /// The main process as the host sees it, while the container runs.
    pub pid: Option<u32>,
}

#[derive(Deserialize)]
struct Inspect {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "State")]
    state: State,
}

#[derive(Deserialize)]
struct State {
    #[serde(rename = "Pid", default)]
    pid: u32,
    #[serde(rename = "Running", default)]
    running: bool,
}

#[derive(Deserialize)]
struct Info {
    #[serde(rename = "CgroupDriver", default)]
    cgroup_driver: String,
}

impl Engine {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The container `reference` (a name or an id, already validated), or None if the engine
    /// has none by that reference.
    pub fn inspect(&self, reference: &str) -> Result<Option<Container>> {
        let Some(body) = self.get(&format!("/containers/{reference}/json"))? else {
            return Ok(None);
        };
        let inspect: Inspect = serde_json::from_slice(&body).context("the engine's container description")?;
        Ok(Some(Container {
            id: inspect.id,
            name: inspect.name.trim_start_matches('/').to_owned(),
            pid: (inspect.state.running && inspect.state.pid != 0).then_some(inspect.state.pid),
        }))
    }

    /// The cgroup the engine puts containers under by default, relative to the cgroup2 root:
    /// `system.slice` with the systemd cgroup driver, `docker` with cgroupfs.
    pub fn default_parent(&self) -> Result<&'static str> {
        let body = self.get("/info")?.context("the engine has no /info")?;
        let info: Info = serde_json::from_slice(&body).context("the engine's info")?;
        Ok(match info.cgroup_driver.as_str() {
            "systemd" => "system.slice",
            _ => "docker",
        })
    }

    /// GET `path`: the body on 200, None on 404, an error naming the status otherwise.
    fn get(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let what = format!("the container engine at {}", self.socket.display());
        let mut stream = UnixStream::connect(&self.socket).with_context(|| what.clone())?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        let answer = super::api::get(
            &mut stream,
            &what,
            "engine",
            path,
            "Accept: application/json\r\n",
            TIMEOUT,
            MAX_RESPONSE,
        )?;
        match answer.status {
            200 => Ok(Some(answer.body)),
            404 => Ok(None),
            code => bail!("{what}: GET {path} answered {code}"),
        }
    }
}
