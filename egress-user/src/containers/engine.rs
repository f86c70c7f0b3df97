//! The container engine's API: Docker's, which Podman also serves (`podman system service`), on
//! a Unix socket. Only two reads are needed (a container by name or id, and the engine's info),
//! so this is a blocking HTTP/1.0 client (one request per connection, no chunked bodies) with
//! httparse for the response head.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Docker's socket; Podman's is /run/podman/podman.sock.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Largest response read (a container's inspect output is a few KiB).
const MAX_RESPONSE: u64 = 4 << 20;
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
        let what = || format!("the container engine at {}", self.socket.display());
        let mut stream = UnixStream::connect(&self.socket).with_context(what)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: engine\r\nAccept: application/json\r\n\r\n"
        )
        .with_context(what)?;
        // One deadline for the whole answer: a reply that trickles in must not hold egress.
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut response = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                bail!("{}: no complete answer to GET {path} within {TIMEOUT:?}", what());
            }
            stream.set_read_timeout(Some(left))?;
            let n = stream.read(&mut chunk).with_context(what)?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&chunk[..n]);
            if response.len() as u64 > MAX_RESPONSE {
                bail!(
                    "{}: response to GET {path} larger than {MAX_RESPONSE} bytes",
                    what()
                );
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut head = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(body_start) = head
            .parse(&response)
            .with_context(|| format!("{}: malformed response to GET {path}", what()))?
        else {
            bail!("{}: incomplete response to GET {path}", what());
        };
        match head.code {
            Some(200) => Ok(Some(response[body_start..].to_vec())),
            Some(404) => Ok(None),
            code => bail!("{}: GET {path} answered {code:?}", what()),
        }
    }
}
