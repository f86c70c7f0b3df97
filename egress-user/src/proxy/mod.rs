//! The data path, in the order a connection takes it:
//!
//! 1. [`accept`]: take a connection the kernel redirected, look up where it was going;
//! 2. [`sniff`]: learn the name it asks for from its first bytes (TLS SNI, HTTP Host);
//! 3. [`crate::route::plan`]: decide (deny, direct, CONNECT, forward);
//! 4. reach the destination directly or through the proxy ([`crate::upstream`]), or [`forward`]
//!    plain HTTP requests through it;
//! 5. [`relay`] (with [`splice`]): move the bytes both ways until both sides are done; DNS over
//!    TCP to the application's resolver goes message by message instead ([`dns_tcp`]);
//! 6. [`decision`]: one log line and the metrics for the connection, however it ended.
//!
//! It reads the running agent's state ([`crate::agent::Agent`]): the kernel's record of
//! original destinations, the names behind addresses, the routing in force, the metrics.

pub mod accept;
pub mod decision;
pub mod dns_tcp;
pub mod forward;
pub mod relay;
pub mod sniff;
pub mod splice;
