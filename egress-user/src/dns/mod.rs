//! Names behind addresses: the record of the intercepted processes' own DNS answers (see
//! [`watch`] for how they arrive, [`record`] for what is kept), and synthetic DNS ([`synthetic`],
//! served by [`server`]), and the agent's own lookups of what the record cannot see
//! ([`lookup`]). [`Names`] answers the routing plan's question: which name does a connection to
//! this address go by?

pub mod lookup;
pub mod record;
pub mod server;
pub mod synthetic;
pub mod watch;

use std::{net::IpAddr, sync::Arc};

use crate::route::plan::{ClientName, Resolved};
pub use watch::Watch;

/// What the agent knows of the names behind addresses.
pub struct Names {
    /// The record of the intercepted processes' DNS answers.
    pub record: Arc<Watch>,
    /// Synthetic DNS, when configured.
    pub synthetic: Option<Arc<server::Synthesizer>>,
    /// The agent's own lookups of SRV targets, for connections.
    pub lookups: lookup::Lookups,
    /// The same for the admin listener's `/dns` (`egress explain`): its own bound, so that local
    /// users asking cannot take the connections' lookups.
    pub admin_lookups: lookup::Lookups,
}

impl Names {
    /// What the application in `netns` resolved about `address`, dialled on `port` (and the
    /// client's `name`): from the synthetic mappings for a synthetic address, else from the
    /// record of its DNS answers.
    pub fn resolved(&self, netns: u64, address: IpAddr, port: u16, name: Option<&str>) -> Resolved {
        let Some(synthetic) = self.synthetic.as_ref().filter(|s| s.contains(address)) else {
            return self.record.resolved(netns, address, port, name);
        };
        let dialled_name = synthetic.name_of(address);
        let client = match (name, &dialled_name) {
            (None, _) => ClientName::Unrecorded,
            (Some(n), Some(d)) if n.trim_end_matches('.').eq_ignore_ascii_case(d) => ClientName::Resolved,
            (Some(_), _) => ClientName::Elsewhere,
        };
        Resolved {
            client,
            dialled_name,
            synthetic: true,
            ..Resolved::default()
        }
    }
}
