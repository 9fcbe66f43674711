//! hybroker: a hybrid-cloud GPU workload broker.
//!
//! Code map (each module is drawn as if it were a crate, listed bottom layer first; the README's
//! "Architecture" has the file-level map and "a job's path"; `docs/design.md` the long form):
//! - [`model`]: domain types, pure: the job spec, lifecycle, GPUs, identities, sites, prices, job
//!   data and presigned requests, the one `RetryPolicy`.
//! - [`placement`]: pure: the placement engine (the cheapest allowed site, typed rejections) and
//!   the one binding loop of jobs to agents' free resources; fair share between tenants (the
//!   queue order, GPU quotas, preemption victims).
//! - [`private_files`]: owner-only modes for the store, the local object store and private keys;
//!   atomic address files. [`telemetry`]: logs, traces, OTLP export.
//! - [`metrics`]: the Prometheus registry (lock-free per update), `process_*`, each service's
//!   `/metrics` endpoint. [`pki`]: development CA and role certificates.
//! - [`store`]: durable jobs (submission + status), attempts, agents and the event log (SQLite).
//! - [`tls`]: the mutual-TLS identity checks and the one TCP accept loop of every server with its
//!   limits on unfinished handshakes.
//! - [`storage`]: object stores for job data (S3, Azure Blob, the embedded local store) and presigning.
//! - [`pricing`]: price feeds (Azure Retail Prices, AWS Price List and spot, snapshot file) and the
//!   price book that refreshes, merges and persists them. [`error`]: API errors and their codes.
//! - [`capacity`]: cloud capacity providers (EC2, Azure VMs, local agent processes) behind one
//!   trait, and the user data that makes a launched instance enrol.
//! - [`config`]: the TOML configuration by role (`broker` with `tenants`, `storage`, `placement`;
//!   `gateway`; `agent`), environment overrides and `validate()`. [`proto`]: generated gRPC.
//! - [`broker`]: the control plane: the core (`broker::core`: a state machine, commands in,
//!   effects out; its driver commits each batch before releasing it) and the job, admin and agent
//!   services around it.
//! - [`gateway`]: the tenants' HTTP API (keys, rate limits, jobs, streams) in front of the broker.
//! - [`agent`]: the GPU node daemon: inventory (NVML), the per-attempt sandbox, staging, the stream
//!   to the broker.
//! - [`cli`]: `pki`, `quickstart`, the operators' commands (`tenants`, `admin`) and the tenants'
//!   client, sharing one error printer and exit-code table. [`bench`]: `hybroker bench`.
//!
//! Which module may import which, and who may read the environment: `tests/layers/`.

pub mod agent;
pub mod bench;
pub mod broker;
pub mod capacity;
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
