//! Placement. Pure: decisions are functions of plain values (README invariant 1).
//!
//! Two levels (docs/design.md §4): [`engine::place`] chooses the cheapest allowed site (and output
//! locations) for a job from a [`world::World`] of sites, capacity and prices, with every candidate
//! explained; [`bind::first_fit`] then binds the job to an agent of that site with free GPUs, CPUs
//! and memory, in the order [`fair::fair_order`] gives (weighted fair share between tenants, then
//! priority and age), within GPU quotas; [`fair::preempt`] picks the attempts a waiting job may
//! preempt. [`decision`] holds what a decision is (its JSON contract), [`rejection`] why a
//! candidate is rejected, and [`synthetic`] builds large worlds for the placement benchmark.

pub mod bind;
pub mod decision;
pub mod engine;
pub mod fair;
pub mod rejection;
pub mod request;
pub mod scale;
pub mod shape;
pub mod sizes;
pub mod synthetic;
pub mod wait;
pub mod world;
