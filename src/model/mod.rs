//! Domain types and ids. Pure: no I/O, no tonic, prost, sqlx or cloud SDK (README invariant 1).

pub mod agent;
pub mod capacity;
pub mod catalog;
pub mod data;
pub mod duration;
pub mod gpu;
pub mod identity;
pub mod job;
pub mod network;
pub mod presigned;
pub mod price;
pub mod retry;
pub mod secret;
pub mod site;
pub mod size;
pub mod state;
pub mod text;

/// Milliseconds since the Unix epoch; the broker's clock for stored timestamps.
pub type UnixMillis = i64;
