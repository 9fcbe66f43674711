//! Placement. Pure: decisions are functions of plain values (README invariant 1).
//!
//! For now one level: [`bind::first_fit`] binds a queued job to the first connected agent with free
//! GPUs, CPUs and memory. The placement issue adds the global, price-aware `place()` in front of it.

pub mod bind;
pub mod engine;
pub mod request;
pub mod synthetic;
pub mod world;
