//! hybroker: a hybrid-cloud GPU workload broker.
//!
//! Code map (each module is drawn as if it were a crate; see README "Architecture"):
//! - [`model`]: domain types and ids (jobs, states, GPUs, identities); pure, no I/O.
//! - [`placement`]: pure binding of jobs to agents' free resources.
//! - [`pricing`]: price feeds (Azure Retail Prices, AWS Price List and spot, snapshot file) and the
//!   price book that refreshes, merges and persists them.
//! - [`store`]: durable jobs, attempts, agents and the append-only event log (SQLite).
//! - [`broker`]: the control plane: job service, agent streams, leases, dispatch.
//! - [`gateway`]: the tenants' HTTP API (keys, rate limits, jobs, streams) in front of the broker.
//! - [`storage`]: object stores for job data (S3, Azure Blob, the embedded local store) and presigning.
//! - [`agent`]: the GPU node daemon: inventory (NVML), executor, the stream to the broker.
//! - [`cli`]: `pki`, `quickstart` and the client commands.
//! - [`bench`]: `hybroker bench`: a broker child process, simulated agents and a job driver; numbers.
//! - [`pki`], [`tls`]: development CA, role certificates, the mutual-TLS identity checks, and the
//!   one TCP accept loop of every server with its limits on unfinished handshakes.
//! - [`metrics`]: the Prometheus registry and each service's `/metrics` endpoint.
//! - [`private_files`]: owner-only modes for the store, the local object store and private keys.
//! - [`config`]: the TOML configuration by role (`broker` with `tenants`, `storage`, `placement`;
//!   `gateway`; `agent`), environment overrides and `validate()`.
//! - [`telemetry`], [`error`], [`proto`]: logs and traces, errors, generated gRPC.
//!
//! Which module may import which, and who may read the environment: `tests/layers.rs`.

pub mod agent;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod config;
pub mod error;
pub mod gateway;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod placement;
pub mod pricing;
pub mod private_files;
pub mod proto;
pub mod storage;
pub mod store;
pub mod telemetry;
pub mod tls;
