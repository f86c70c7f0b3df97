//! A small LAN of network namespaces: a switch namespace holding a bridge, and hosts attached to
//! it with veth pairs. Nothing here is reachable from, or routes to, the machine's own network.

use anyhow::Result;

use crate::process::{quietly, run};

pub const PREFIX_LEN: u8 = 24;

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Result<Self> {
        quietly("ip", &["netns", "del", &name]);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME args...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip netns exec NAME program args...`
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// The path to give `nsenter --net=`: enters only the network namespace, keeping /sys
    /// (cgroupfs, bpffs) and the rest of the host's view.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Whether something listens on TCP `port` in this namespace.
    pub fn is_listening(&self, port: u16) -> bool {
        self.ss("-Hltn", port)
    }

    /// Whether something is bound to UDP `port` in this namespace.
    pub fn is_listening_udp(&self, port: u16) -> bool {
        self.ss("-Hlun", port)
    }

    fn ss(&self, flags: &str, port: u16) -> bool {
        self.exec("ss", &[flags, &format!("sport = :{port}")])
            .is_ok_and(|out| !out.trim().is_empty())
    }

    /// Adds a further IPv4 address to `eth0`, in the LAN's prefix.
    pub fn add_address(&self, addr: &str) -> Result<()> {
        self.ip(&["addr", "add", &format!("{addr}/{PREFIX_LEN}"), "dev", "eth0"])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        quietly("ip", &["netns", "del", &self.name]);
    }
}

/// Plugs `host` into the bridge `br0` of `switch` with `addr`/24 and `addr6`/64 on its `eth0`.
pub fn attach_host(switch: &Netns, host: &Netns, port_name: &str, addr: &str, addr6: &str) -> Result<()> {
    switch.ip(&[
        "link", "add", port_name, "type", "veth", "peer", "name", "eth0", "netns", &host.name,
    ])?;
    switch.ip(&["link", "set", port_name, "master", "br0", "up"])?;
    host.ip(&["addr", "add", &format!("{addr}/{PREFIX_LEN}"), "dev", "eth0"])?;
    // nodad: usable at once instead of after duplicate address detection.
    host.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{addr6}/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    host.ip(&["link", "set", "eth0", "up"])?;
    Ok(())
}

pub fn create_bridge(switch: &Netns) -> Result<()> {
    switch.ip(&["link", "add", "br0", "type", "bridge"])?;
    switch.ip(&["link", "set", "br0", "up"])?;
    Ok(())
}
