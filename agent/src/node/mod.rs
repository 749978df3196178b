//! The running agent on one node: the model (a [`crate::model::Datastore`])
//! drives the peering plan of the BGP speaker; IPAM's blocks become BGP
//! exports and blackholes; learned routes and pod routes become the FIB
//! reconciler's desired set. See docs/architecture.md for the flow and the
//! restart story.
//!
//! - [`config`]: the configuration file and what follows from it alone.
//! - `start`: the start-up phases, each a function, ending in the loop.
//! - `events`: the event loop that owns the node's state.
//! - `peering`: the speaker's peers brought to the plan, and draining.
//! - [`routes`]: the desired FIB, a pure function of the node's state.
//! - [`datastore_routes`]: with BGP off, the other nodes' blocks from the
//!   datastore instead of BGP.
//! - [`control`]: the control socket (`starlingctl`, the lab).

mod cleanup;
pub mod config;
pub mod control;
pub mod datastore_routes;
mod events;
pub mod ipam_ops;
mod peering;
pub mod routes;
mod start;

pub use config::{AgentConfig, DatastoreConfig};
pub use start::run;
