//! `egress status`: the running agent's health (asked over its admin listener), the attached
//! cgroups and the kernel's decision counters (read from the pinned maps).

use std::path::Path;

use anyhow::Result;

use crate::kernel;

pub fn status(pin_dir: &Path, admin_addr: std::net::SocketAddr) -> Result<()> {
    println!("agent: {}", agent_health(admin_addr));
    for line in proxy_lines(admin_addr) {
        println!("{line}");
    }
    if !pin_dir.exists() {
        println!("not attached (no {})", pin_dir.display());
        return Ok(());
    }
    println!("pinned at {}", pin_dir.display());
    // Pinned by versions without containers support: then there is nothing selective.
    let scopes = crate::workloads::scopes::ScopeMaps::from_pins(pin_dir).ok();
    let selective: Vec<u64> = scopes
        .as_ref()
        .map(|s| s.scopes().iter().map(|s| s.cgroup_id).collect())
        .unwrap_or_default();
    for id in kernel::pinned_cgroups(pin_dir)? {
        let how = if selective.contains(&id) {
            " (selectively: followed containers and pods only)"
        } else {
            ""
        };
        match crate::workloads::cgroups::cgroup_path_by_id(id) {
            Some(path) => println!("attached cgroup {} (id {id}){how}", path.display()),
            None => println!("attached cgroup id {id} (no longer exists)"),
        }
    }
    if let Some(scopes) = &scopes {
        for name in scopes.followed() {
            println!("following container {name}");
        }
        if !selective.is_empty() {
            // Nested scopes (kubelet's QoS classes) are not containers or pods.
            let children: Vec<_> = scopes
                .classified()
                .into_iter()
                .filter_map(|id| scopes.classification(id))
                .filter(|c| *c != crate::workloads::scopes::Classification::Nested)
                .collect();
            let intercepted = children
                .iter()
                .filter(|c| **c == crate::workloads::scopes::Classification::Intercept)
                .count();
            println!(
                "containers and pods under them: {intercepted} intercepted, {} passed",
                children.len() - intercepted
            );
        }
    }
    for (name, value) in kernel::pinned_counters(pin_dir)? {
        println!("{name:>20} {value}");
    }
    Ok(())
}

/// Each upstream proxy as the running agent's data path knows it (from /proxies).
fn proxy_lines(admin_addr: std::net::SocketAddr) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct State {
        proxy: String,
        up: bool,
        why: Option<String>,
        down_for: Option<u64>,
        failovers: u64,
    }
    let Ok(body) = ask_agent(admin_addr, "/proxies") else {
        return Vec::new();
    };
    let states: Vec<State> = serde_json::from_str(&body).unwrap_or_default();
    states
        .into_iter()
        .map(|s| {
            let state = match (s.up, s.down_for, s.why) {
                (true, ..) => "up".to_owned(),
                (false, Some(secs), Some(why)) => format!("down for {secs}s ({why}), probed"),
                (false, ..) => "down, probed".to_owned(),
            };
            format!("proxy {}: {state}; failovers {}", s.proxy, s.failovers)
        })
        .collect()
}

/// The running agent's /health answer, or why there is none.
fn agent_health(admin_addr: std::net::SocketAddr) -> String {
    ask_agent(admin_addr, "/health")
        .map(|body| body.trim().to_owned())
        .unwrap_or_else(|e| format!("not reachable at {admin_addr} ({e})"))
}

/// The body of the running agent's answer to `GET path` on its admin listener.
pub fn ask_agent(admin_addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&admin_addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(response.clone(), |(_, body)| body.to_owned()))
}
