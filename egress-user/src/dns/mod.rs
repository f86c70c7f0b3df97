//! Names behind addresses: the record of the intercepted processes' own DNS answers (see
//! [`watch`] for how they arrive, [`record`] for what is kept), which the routing plan asks which
//! name a connection to an address goes by.

pub mod record;
pub mod server;
pub mod synthetic;
pub mod watch;

pub use watch::Watch;
