//! Selective attachment: a container engine's parent cgroup attached so that only the
//! containers egress follows are intercepted (see `scope_verdict` in the kernel programs).
//!
//! Three pinned maps hold it: the scopes (parent cgroup id and level), the classification of
//! each child cgroup (intercept or pass; a child not classified yet is refused), and the names
//! of the followed containers, which the kernel never reads but which `egress attach
//! --container` and a restarted agent share through the pins.

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap, MapData};
use egress_common::{ContainerName, MAX_SCOPES, SCOPE_INTERCEPT, SCOPE_NESTED, SCOPE_PASS, Scope, maps};

pub struct ScopeMaps {
    scopes: Array<MapData, Scope>,
    scoped: HashMap<MapData, u64, u32>,
    followed: HashMap<MapData, ContainerName, u32>,
}

/// How a child cgroup of a scope is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Classification {
    Intercept,
    Pass,
    /// A scope itself (a QoS class of kubelet's): its children are classified in turn.
    Nested,
}

impl Classification {
    fn value(self) -> u32 {
        match self {
            Self::Intercept => SCOPE_INTERCEPT,
            Self::Pass => SCOPE_PASS,
            Self::Nested => SCOPE_NESTED,
        }
    }
}

impl ScopeMaps {
    /// Takes the three maps from the running agent's kernel programs.
    pub fn take(kernel: &crate::kernel::Kernel) -> Result<Self> {
        Self::from_maps(|name| kernel.take_map(name))
    }

    /// Takes the three maps from a running instance's programs loaded again (`egress attach`).
    pub fn from_instance(instance: &mut crate::kernel::Instance) -> Result<Self> {
        Self::from_maps(|name| instance.take_map(name))
    }

    fn from_maps(mut take: impl FnMut(&str) -> Result<aya::maps::Map>) -> Result<Self> {
        Ok(Self {
            scopes: Array::try_from(take(maps::SCOPES)?)?,
            scoped: HashMap::try_from(take(maps::SCOPED)?)?,
            followed: HashMap::try_from(take(maps::FOLLOWED)?)?,
        })
    }

    /// The maps of the instance pinned at `pin_dir` (for `egress status`).
    pub fn from_pins(pin_dir: &std::path::Path) -> Result<Self> {
        let open = |name: &str| {
            let path = pin_dir.join(name);
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        Ok(Self {
            scopes: Array::try_from(aya::maps::Map::Array(open(maps::SCOPES)?))?,
            scoped: HashMap::try_from(aya::maps::Map::HashMap(open(maps::SCOPED)?))?,
            followed: HashMap::try_from(aya::maps::Map::HashMap(open(maps::FOLLOWED)?))?,
        })
    }

    /// Adds the cgroup `id` at `level` as a scope (nothing if it is one already).
    pub fn add_scope(&mut self, id: u64, level: u32) -> Result<()> {
        let mut free = None;
        for i in 0..MAX_SCOPES {
            let scope = self.scopes.get(&i, 0)?;
            if scope.cgroup_id == id {
                return Ok(());
            }
            if scope.cgroup_id == 0 && free.is_none() {
                free = Some(i);
            }
        }
        let Some(slot) = free else {
            bail!("already {MAX_SCOPES} container engine cgroups attached selectively");
        };
        let scope = Scope {
            cgroup_id: id,
            level,
            _pad: 0,
        };
        self.scopes.set(slot, scope, 0)?;
        Ok(())
    }

    /// Stops treating cgroup `id` as a scope (its children's classifications go with the next
    /// round of the agent's follower).
    pub fn remove_scope(&mut self, id: u64) -> Result<()> {
        for i in 0..MAX_SCOPES {
            if self.scopes.get(&i, 0)?.cgroup_id == id {
                self.scopes.set(i, Scope::default(), 0)?;
            }
        }
        Ok(())
    }

    pub fn scopes(&self) -> Vec<Scope> {
        (0..MAX_SCOPES)
            .filter_map(|i| self.scopes.get(&i, 0).ok())
            .filter(|s| s.cgroup_id != 0)
            .collect()
    }

    pub fn classify(&mut self, child: u64, how: Classification) -> Result<()> {
        self.scoped
            .insert(child, how.value(), 0)
            .context("classifying a container cgroup (map full?)")
    }

    pub fn classification(&self, child: u64) -> Option<Classification> {
        match self.scoped.get(&child, 0).ok()? {
            SCOPE_INTERCEPT => Some(Classification::Intercept),
            SCOPE_PASS => Some(Classification::Pass),
            SCOPE_NESTED => Some(Classification::Nested),
            _ => None,
        }
    }

    /// Every classified child, for dropping those whose cgroup is gone.
    pub fn classified(&self) -> Vec<u64> {
        self.scoped.keys().filter_map(Result::ok).collect()
    }

    pub fn unclassify(&mut self, child: u64) {
        let _ = self.scoped.remove(&child);
    }

    /// Follows the container `reference` (a name or an id) from now on.
    pub fn follow(&mut self, reference: &str) -> Result<()> {
        self.followed
            .insert(encode_name(reference)?, 1, 0)
            .context("recording a followed container (map full?)")
    }

    pub fn followed(&self) -> Vec<String> {
        self.followed
            .keys()
            .filter_map(Result::ok)
            .map(|name| {
                let end = name.0.iter().position(|&b| b == 0).unwrap_or(name.0.len());
                String::from_utf8_lossy(&name.0[..end]).into_owned()
            })
            .collect()
    }
}

fn encode_name(reference: &str) -> Result<ContainerName> {
    let mut name = ContainerName([0; 128]);
    if reference.is_empty() || reference.len() >= name.0.len() {
        bail!("container {reference:?}: a name or id of 1 to 127 characters");
    }
    name.0[..reference.len()].copy_from_slice(reference.as_bytes());
    Ok(name)
}
