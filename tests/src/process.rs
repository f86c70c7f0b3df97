//! Running things: the one launcher for "run a program in a network namespace and a cgroup",
//! helper commands with errors that say what failed, daemons killed on drop, the `egress` CLI
//! under test, and a scratch directory removed on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

/// How a program enters a network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enter {
    /// `nsenter --net=/run/netns/NAME`: only the network namespace; /sys (cgroupfs, bpffs) and
    /// /etc stay the host's. For the agent, `egress status` and clients that join cgroups.
    Net,
    /// `ip netns exec NAME`: also /etc/netns/NAME/{resolv.conf,hosts} (the namespace's
    /// resolver), but /sys is remounted, hiding cgroupfs and bpffs.
    NetAndEtc,
    /// `nsenter --target PID --mount --net`: the network and mount namespaces of a host view's
    /// holder (see `peers::resolvers`): its hosts file, resolver and resolver daemons, with /sys
    /// as the host's.
    View(u32),
}

/// The one launcher: `program args...` in network namespace `netns` (if given, entered as
/// `enter` says) and in cgroup `cgroup` (if given). The cgroup is joined first, because entering
/// a namespace with `ip netns exec` hides the cgroup filesystem.
pub fn launch(
    netns: Option<&str>,
    enter: Enter,
    cgroup: Option<&Path>,
    program: impl AsRef<std::ffi::OsStr>,
    args: &[&str],
) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"[ -z "$0" ] || echo $$ > "$0/cgroup.procs" && exec "$@""#)
        .arg(cgroup.unwrap_or(Path::new("")));
    match (netns, enter) {
        (None, _) => {}
        (Some(ns), Enter::Net) => {
            command.arg("nsenter").arg(format!("--net=/run/netns/{ns}"));
        }
        (Some(ns), Enter::NetAndEtc) => {
            command.args(["ip", "netns", "exec", ns]);
        }
        (Some(_), Enter::View(pid)) => {
            command.args(["nsenter", "--target", &pid.to_string(), "--mount", "--net"]);
        }
    }
    command.arg(program).args(args);
    command
}

/// What a command printed and how it exited.
#[derive(Debug)]
pub struct ClientResult {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for ClientResult {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `command` to completion.
pub fn output(mut command: Command) -> Result<ClientResult> {
    Ok(command
        .output()
        .with_context(|| format!("running {command:?}"))?
        .into())
}

/// Runs `program args...`, failing with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    run_with_input(program, args, None)
}

/// Like [`run`], feeding `input` on stdin if given.
pub fn run_with_input(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    let stdin = child.stdin.take();
    if let (Some(mut stdin), Some(input)) = (stdin, input) {
        stdin.write_all(input.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Best effort, for cleanup paths: errors are ignored.
pub fn quietly(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The `egress` binary under test: $EGRESS_BIN, else the workspace's release build.
pub fn egress_bin() -> PathBuf {
    std::env::var_os("EGRESS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/egress"))
}

/// `egress args...` on the host, outside every test namespace and cgroup (the CLI commands
/// that need no topology: check-config, explain, --help).
pub fn egress(args: &[&str]) -> Result<ClientResult> {
    output(launch(None, Enter::Net, None, egress_bin(), args))
}

/// GET `url` with curl in network namespace `netns` (outside the intercepted cgroups), giving
/// up after `max_seconds`, with further curl arguments (headers) in `extra`. Returns the HTTP
/// status (0 when there was no answer) and the body.
pub fn http_get(netns: &str, url: &str, max_seconds: u32, extra: &[&str]) -> Result<(u16, String)> {
    let max_time = max_seconds.to_string();
    let mut args = vec!["-sS", "--max-time", &max_time, "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = output(launch(Some(netns), Enter::Net, None, "curl", &args))?;
    let (body, code) = out
        .stdout
        .rsplit_once('\n')
        .with_context(|| format!("curl {url}: {out:?}"))?;
    let code = code
        .trim()
        .parse()
        .with_context(|| format!("curl {url}: {out:?}"))?;
    Ok((code, body.to_owned()))
}

/// A process started by a test, killed (with its process group) on drop.
pub struct Daemon {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `command` in a process group of its own, so that its children (nginx workers,
    /// squid helpers) go with it; stdout and stderr go to `log`.
    pub fn spawn(name: &'static str, mut command: Command, log: &Path) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name,
            child,
            log: log.to_owned(),
        })
    }

    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// An error naming the daemon and its log if it has exited: for wait loops.
    pub fn check_alive(&mut self) -> Result<()> {
        if self.exited() {
            bail!(
                "{} exited:\n{}",
                self.name,
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Sends `signal` to the whole process group.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on the group we created.
        unsafe { libc::kill(-(self.child.id() as i32), signal) };
    }

    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scratch directory under the system's temp dir, removed on drop (kept, and named on
/// stderr, when the test panicked).
pub struct TempDir {
    pub path: PathBuf,
}

static TEMP_COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    pub fn new(name: &str) -> Result<Self> {
        let id = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("egress-{name}-{}x{id}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("files kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}
